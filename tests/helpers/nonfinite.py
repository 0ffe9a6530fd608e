"""Test-only callback that makes a run diverge: from a given step on, every optimizer runs at a huge learning rate."""

from __future__ import annotations

import lightning.pytorch as pl


class LrBlowUp(pl.Callback):
    """From `global_step == step` on, set every param group's lr to `lr` (1e30: finite, garbage weights, then NaN)."""

    def __init__(self, step: int, lr: float = 1e30):
        self.step, self.lr = step, lr

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= self.step:  # again every step: the LR scheduler rewrites lr after each one
            for opt in trainer.optimizers:
                for group in opt.param_groups:
                    group["lr"] = self.lr
