"""Learning-rate schedules shared by the training tasks (Hydra: `scheduler: {_target_: ..., _partial_: true}`)."""

from __future__ import annotations

import math

import torch


def warmup_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int = 1000, decay: str = "constant",
                    total_steps: int | None = None, min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup_steps`, then constant or cosine decay to `min_lr_ratio` at `total_steps`."""
    if decay not in ("constant", "cosine"):
        raise ValueError(f"scheduler.decay={decay!r}; expected 'constant' or 'cosine'")
    if decay == "cosine" and not total_steps:
        raise ValueError("scheduler.decay=cosine needs scheduler.total_steps (e.g. ${trainer.max_steps})")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if decay == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
