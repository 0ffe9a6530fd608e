"""Wrapping for scale, applied from outside the model code in one place (as torchtitan's parallelize.py).

- FSDP: `fsdp_wrap_policy()` makes each transformer block (DiT blocks, text-encoder blocks) one shard unit.
- Activation checkpointing: each DiT block recomputed in backward.
- `torch.compile`: each DiT block compiled on its own with `fullgraph=True` (no graph breaks; repeated
  blocks share one compiled graph, so compile time does not grow with depth).
- Sequence parallelism (`scale.sequence_parallel=P`, DeepSpeed-Ulysses, `vidgen.training.sequence_parallel`): the
  ranks form groups of P consecutive ranks, and each group splits every DiT's tokens P ways. It needs
  torch.distributed initialised before the model is wrapped, i.e. a training loop of one's own:

      dist.init_process_group(...); parallelize(module, sequence_parallel=P)
      # every rank of a group: the same batch, the same noise and t; loss * P if gradients are averaged over all ranks

  train.py does not support it yet and stops at start-up with one line. What is missing there:
  (1) groups: train.py wraps the model before Lightning starts torch.distributed; build them in a `setup` hook;
  (2) data: the shard loaders (`vidgen.data.base.ShardDataModule`, `vidgen.data.pipeline`) split shards, the
      shuffle buffer and resampled draws by global rank; a group must read as data-parallel rank `rank // P`
      of `world_size // P`, so that its ranks get the same batch;
  (3) randomness: `vidgen.training.rng.step_generator(step, rank)` draws noise, t and text dropout per global
      rank; it must be keyed on `rank // P`;
  (4) gradients: each rank holds its tokens' share and DDP averages over all ranks: the loss must be scaled by P;
  (5) sampling: the sample-logging callback runs on rank 0 alone, where a sequence-parallel DiT would wait
      forever for its group; it must run on every rank of rank 0's group.
"""

from __future__ import annotations

import logging

import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

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


def sequence_parallel_group(size: int) -> dist.ProcessGroup:
    """This rank's group of `size` consecutive ranks, `[k*size, (k+1)*size)`; every rank must call it (collective)."""
    if not dist.is_initialized():
        raise UserError(f"scale.sequence_parallel={size}: needs torch.distributed running before the model is "
                        f"wrapped, which train.py does not do (nor feed one batch to each group, see "
                        f"vidgen/training/parallelize.py); use scale.sequence_parallel=1")
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
    sp_group = sequence_parallel_group(sequence_parallel) if sequence_parallel > 1 else None
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
