"""The `Conditioner`: named entries, each turning its part of a batch into keyword tensors for the DiT.

    cond = conditioner(batch, drop=True, generator=g)    # training: with classifier-free-guidance dropout
    cond = conditioner({"caption": prompts})              # sampling: what the user asked for
    neg = conditioner({"caption": [negative_prompt]})     # the unconditional branch of CFG

An entry is an `nn.Module` with `forward(batch, drop, generator) -> {kwarg: tensor}` (its keys are the DiT's
keyword arguments, mapped there through a named embedder), `spec()` (what a checkpoint records to rebuild it
around its encoder) and `encoder_module()` (the model a checkpoint stores as a part, or None). Today there is
`text` (`vidgen.conditioning.text`); an image, reference or audio entry is a new file beside it plus a config.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Conditioner(nn.Module):
    """Named conditioning entries -> one dict of DiT keyword tensors; Hydra builds it from `task.module.conditioner`."""

    def __init__(self, **entries: nn.Module):
        super().__init__()
        if not entries:
            raise ValueError("task.module.conditioner: needs at least one entry (e.g. text)")
        self.entries = nn.ModuleDict(entries)

    def forward(self, batch: dict[str, Any], drop: bool = False,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Batch (or sampling inputs) -> {kwarg: tensor}; `drop`: each entry's CFG dropout, drawn from `generator`."""
        cond: dict[str, torch.Tensor] = {}
        for name, entry in self.entries.items():
            out = entry(batch, drop=drop, generator=generator)
            clash = set(out) & set(cond)
            if clash:
                raise ValueError(f"conditioner entry {name!r} repeats keyword(s) {sorted(clash)}")
            cond.update(out)
        return cond

    def spec(self) -> dict[str, Any]:
        """{entry: its spec} as recorded in checkpoints (class, dropout, the encoder part's name)."""
        return {name: entry.spec() for name, entry in self.entries.items()}

    def encoders(self) -> dict[str, tuple[nn.Module, bool]]:
        """{entry: (encoder module, trainable)} for entries that have one."""
        out = {}
        for name, entry in self.entries.items():
            enc = entry.encoder_module()
            if enc is not None:
                out[name] = (enc, entry.trainable)
        return out
