"""Classifier-free guidance (Ho & Salimans 2022), written once: conditional and unconditional in ONE forward.

    v = v_u + scale * (v_c - v_u)          (eq. 6 of the paper, applied to the flow velocity)

`v_u` is the prediction under the negative prompt (the empty caption's embedding by default). Both branches
are stacked along the batch so the network runs once per step; text contexts of different lengths are
right-padded with zeros and masked out. The training side (dropping the text with probability p) lives with
the objective: `RectifiedFlow.drop_captions` / `drop_embeddings`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from vidgen.diffusion.flow import pad_tokens

Cond = dict[str, Any]


def batch_conds(cond: Cond, uncond: Cond, batch: int) -> Cond:
    """Stack two conditioning dicts along the batch -> `[2B, ...]` (cond first), padding `context` tokens.

    `uncond` may have batch 1 (one negative prompt for all samples): it is broadcast to `batch`.
    Keys other than `context` / `context_mask` must be tensors with a batch dimension (or equal non-tensors).
    """
    cond, uncond = dict(cond), dict(uncond)
    if "context" in cond:
        for c in (cond, uncond):
            if c.get("context_mask") is None:
                c["context_mask"] = torch.ones(c["context"].shape[:2], dtype=torch.bool, device=c["context"].device)
        length = max(cond["context"].shape[1], uncond["context"].shape[1])
        cond["context"], cond["context_mask"] = pad_tokens(cond["context"], cond["context_mask"].bool(), length)
        uncond["context"], uncond["context_mask"] = pad_tokens(uncond["context"], uncond["context_mask"].bool(),
                                                               length)
    out = {}
    for key, a in cond.items():
        b = uncond[key]
        if torch.is_tensor(a):
            b = b.to(a.device, a.dtype)
            out[key] = torch.cat([a.expand(batch, *a.shape[1:]), b.expand(batch, *b.shape[1:])])
        elif a == b:
            out[key] = a
        else:
            raise ValueError(f"conditioning key {key!r} differs between branches and is not a tensor")
    return out


@dataclass
class ClassifierFreeGuidance:
    """`guide(fn, x, t, cond, uncond) -> v`: one batched call of `fn(x [2B..], t [2B..], cond) -> v`, then CFG.

    uncond None runs the conditional branch alone (callers skip CFG at scale 1 by passing None; the batched
    path at scale 1 equals the conditional prediction, which the tests check). x `[B,C,T,H,W]`, t `[B]`/`[B,T]`.
    """

    scale: float = 5.0

    def __post_init__(self) -> None:
        if not self.scale >= 0:
            raise ValueError(f"guidance={self.scale}: expected a scale >= 0 (1 = no guidance, 5 = Wan's default)")

    def __call__(self, fn: Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor], x: torch.Tensor,
                 t: torch.Tensor, cond: Cond, uncond: Cond | None = None) -> torch.Tensor:
        if uncond is None:
            return fn(x, t, cond)
        b = x.shape[0]
        v_c, v_u = fn(torch.cat([x, x]), torch.cat([t, t]), batch_conds(cond, uncond, b)).chunk(2)
        return v_u + self.scale * (v_c - v_u)
