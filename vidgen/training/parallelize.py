"""Wrapping for scale, applied from outside the model code in one place (as torchtitan's parallelize.py).

- FSDP2: `apply_fsdp` shards each transformer block (DiT blocks, text-encoder blocks) as one `fully_shard` unit
  (`trainer=fsdp`: `FSDP2Strategy`, Lightning's `ModelParallelStrategy` on a 1D mesh, which calls the module's
  `configure_model`);
  `fsdp_wrap_policy()` is the same unit choice for FSDP1 wrappers.
- Activation checkpointing: each DiT block recomputed in backward.
- `torch.compile`: each DiT block compiled on its own with `fullgraph=True` (no graph breaks; repeated
  blocks share one compiled graph, so compile time does not grow with depth).
- Sequence parallelism (`scale.sequence_parallel=P`, DeepSpeed-Ulysses, `vidgen.training.sequence_parallel`): the
  ranks form groups of P consecutive ranks, and each group splits every DiT's tokens P ways. With torch.distributed
  running, `parallelize` builds the groups at once; otherwise (train.py wraps the model before Lightning starts
  the processes) it records `module.sequence_parallel = P` and the training module builds them in `setup`
  (`build_sequence_parallel`). A group is one data-parallel rank: its ranks read the same batches
  (`vidgen.data.position.DataPositionMixin` divides rank and world size by P), draw the same noise (the step
  generator is keyed on `rank // P`) and scale their loss by P (each rank's gradients are its tokens' share, and
  DDP / FSDP average over all ranks). The sample-logging callback (rank 0 alone) is refused with it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from lightning.pytorch.strategies import ModelParallelStrategy

from vidgen.errors import UserError
from vidgen.models.dit import DiT, DiTBlock
from vidgen.models.text import EncoderBlock
from vidgen.training.sequence_parallel import enable_sequence_parallel

log = logging.getLogger(__name__)


def wrap_unit_classes() -> set[type[nn.Module]]:
    """Module classes that form one FSDP unit / checkpoint unit: the DiT blocks and the text encoder's blocks."""
    return {DiTBlock, EncoderBlock}


def fsdp_wrap_policy() -> ModuleWrapPolicy:
    """FSDP auto-wrap policy: every transformer block is one unit (its params gathered just in time)."""
    return ModuleWrapPolicy(wrap_unit_classes())


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's `ModelParallelStrategy` with every rank data-parallel (a 1D mesh of world_size ranks: FSDP2, no
    tensor parallelism); the module shards itself in `configure_model` (`apply_fsdp`). Keyword arguments: those of
    `ModelParallelStrategy` other than the two sizes (e.g. `process_group_backend`, `save_distributed_checkpoint`)."""

    def __init__(self, **kwargs: Any):
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # every rank; read when the mesh is built
        super().setup_environment()


def apply_fsdp(modules: list[nn.Module], mesh, mixed_precision: bool = False) -> None:
    """FSDP2 (`torch.distributed.fsdp.fully_shard`, Zhao et al. 2023 / torchtitan): in place, each transformer block
    (`wrap_unit_classes`) of every module in `modules` becomes one shard unit, then each module its own root unit.

    mesh: the data-parallel `DeviceMesh` (Lightning's `ModelParallelStrategy` gives `module.device_mesh`);
    mixed_precision: bf16 parameters in forward/backward with fp32 gradient reduction (GPU); False keeps fp32.
    Parameters become DTensors sharded along dim 0; the optimizer, EMA (`vidgen.training.callbacks.EMA`) and
    distributed checkpoints hold shards.
    """
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision
              else MixedPrecisionPolicy())
    units = tuple(wrap_unit_classes())
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, units):
                fully_shard(sub, mesh=mesh, mp_policy=policy)
        fully_shard(module, mesh=mesh, mp_policy=policy)
    log.info("FSDP2: %d module(s) sharded over %d rank(s), each block one unit, mixed precision=%s", len(modules),
             mesh.size(), mixed_precision)


def build_sequence_parallel(module: nn.Module) -> None:
    """Split every DiT of `module` over its sequence-parallel group, when `parallelize` deferred it (no process
    group yet); a no-op for `module.sequence_parallel` 1 or when already done. Collective: call it on every rank."""
    size = getattr(module, "sequence_parallel", 1)
    dits = [m for m in module.modules() if isinstance(m, DiT)]
    if size > 1 and any(dit.sp is None for dit in dits):
        group = sequence_parallel_group(size)
        for dit in dits:
            enable_sequence_parallel(dit, group)


def sequence_parallel_group(size: int) -> dist.ProcessGroup:
    """This rank's group of `size` consecutive ranks, `[k*size, (k+1)*size)`; every rank must call it (collective)."""
    if not dist.is_initialized():
        raise UserError(f"scale.sequence_parallel={size}: needs several processes (e.g. trainer=ddp with "
                        f"trainer.devices a multiple of {size}); this run has one")
    world = dist.get_world_size()
    if world % size:
        raise UserError(f"scale.sequence_parallel={size} does not divide the world size {world}")
    groups = [dist.new_group(list(range(start, start + size))) for start in range(0, world, size)]
    return groups[dist.get_rank() // size]


def parallelize(module: nn.Module, *, activation_checkpointing: bool = False, compile: bool = False,
                compile_mode: str | None = None, compile_backend: str = "inductor",
                sequence_parallel: int = 1) -> nn.Module:
    """Apply checkpointing / per-block compilation / sequence parallelism to every DiT in `module` (in place).

    Returns `module`. `sequence_parallel > 1` builds the process groups (`sequence_parallel_group`).
    """
    if sequence_parallel < 1:
        raise UserError(f"scale.sequence_parallel={sequence_parallel}: expected a positive number of ranks")
    dits = [m for m in module.modules() if isinstance(m, DiT)]
    if sequence_parallel > 1 and not dits:
        raise UserError(f"scale.sequence_parallel={sequence_parallel}: splits a DiT's tokens, and this model has "
                        f"no DiT")
    module.sequence_parallel = sequence_parallel  # the data split, noise keys and loss scale of a group follow it
    sp_group = None
    if sequence_parallel > 1 and dist.is_initialized():
        sp_group = sequence_parallel_group(sequence_parallel)
    for dit in dits:
        if sp_group is not None:
            enable_sequence_parallel(dit, sp_group)
        if activation_checkpointing:
            dit.gradient_checkpointing = True
        if compile:
            for block in dit.blocks:
                block.compile(fullgraph=True, mode=compile_mode, backend=compile_backend, dynamic=False)
    if dits and (activation_checkpointing or compile or sp_group is not None):
        log.info("parallelize: %d DiT(s), activation_checkpointing=%s, compile=%s, sequence_parallel=%d", len(dits),
                 activation_checkpointing, compile, sequence_parallel)
    return module
