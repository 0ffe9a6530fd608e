"""Wrapping for scale, applied from outside the model code in one place (as torchtitan's parallelize.py).

- FSDP: `fsdp_wrap_policy()` makes each transformer block (DiT blocks, text-encoder blocks) one shard unit.
- Activation checkpointing: each DiT block recomputed in backward.
- `torch.compile`: each DiT block compiled on its own with `fullgraph=True` (no graph breaks; repeated
  blocks share one compiled graph, so compile time does not grow with depth).
"""

from __future__ import annotations

import logging

from torch import nn
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from vidgen.models.dit import DiT, DiTBlock
from vidgen.models.text import EncoderBlock

log = logging.getLogger(__name__)


def wrap_unit_classes() -> set[type[nn.Module]]:
    """Module classes that form one FSDP unit / checkpoint unit: the DiT blocks and the text encoder's blocks."""
    return {DiTBlock, EncoderBlock}


def fsdp_wrap_policy() -> ModuleWrapPolicy:
    """FSDP auto-wrap policy: every transformer block is one unit (its params gathered just in time)."""
    return ModuleWrapPolicy(wrap_unit_classes())


def parallelize(module: nn.Module, *, activation_checkpointing: bool = False, compile: bool = False,
                compile_mode: str | None = None, compile_backend: str = "inductor") -> nn.Module:
    """Apply checkpointing / per-block compilation to every DiT inside `module` (in place); returns `module`."""
    dits = [m for m in module.modules() if isinstance(m, DiT)]
    for dit in dits:
        if activation_checkpointing:
            dit.gradient_checkpointing = True
        if compile:
            for block in dit.blocks:
                block.compile(fullgraph=True, mode=compile_mode, backend=compile_backend, dynamic=False)
    if dits and (activation_checkpointing or compile):
        log.info("parallelize: %d DiT(s), activation_checkpointing=%s, compile=%s", len(dits),
                 activation_checkpointing, compile)
    return module
