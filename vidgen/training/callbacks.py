"""Training callbacks shared by every task: EMA of weights and the non-finite step guard."""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import lightning.pytorch as pl
import torch

log = logging.getLogger(__name__)


class EMA(pl.Callback):
    """Exponential moving average of the trainable parameters, saved in (and restored from) checkpoints.

    `decay` is reached with the warm-up `min(decay, (1 + n) / (10 + n))` (n = updates so far), so early
    averages are not dominated by the random init. The shadow weights are kept in fp32 on the module's
    device; `average_parameters(module)` swaps them in (sampling, validation, export) and back.
    """

    def __init__(self, decay: float = 0.999, update_every: int = 1, start_step: int = 0):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"callbacks.ema.decay={decay}: expected a value in (0, 1)")
        self.decay, self.update_every, self.start_step = decay, update_every, start_step
        self.shadow: dict[str, torch.Tensor] = {}
        self.num_updates = 0

    @property
    def state_key(self) -> str:
        return "EMA"

    def _params(self, module: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
        return ((n, p) for n, p in module.named_parameters() if p.requires_grad)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for name, p in self._params(pl_module):
            if name not in self.shadow:
                self.shadow[name] = p.detach().float().clone()
            else:  # restored from a checkpoint: move next to the weights
                self.shadow[name] = self.shadow[name].to(p.device)

    @torch.no_grad()
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step < self.start_step or step % self.update_every:
            return
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for name, p in self._params(pl_module):
            self.shadow[name].lerp_(p.detach().float(), 1.0 - decay)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Validate the weights that get exported and sampled: the EMA shadow (no checkpoint is written
        # inside validation with step-based checkpointing, so the swap never reaches a checkpoint).
        self._val_ctx = self.average_parameters(pl_module)
        self._val_ctx.__enter__()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ctx, self._val_ctx = getattr(self, "_val_ctx", None), None
        if ctx is not None:
            ctx.__exit__(None, None, None)

    @contextlib.contextmanager
    def average_parameters(self, module: torch.nn.Module) -> Iterator[None]:
        """Temporarily load the EMA weights into `module` (no-op before the first update)."""
        if not self.shadow:
            yield
            return
        backup = {}
        with torch.no_grad():
            for name, p in self._params(module):
                if name in self.shadow:
                    backup[name] = p.detach().clone()
                    p.copy_(self.shadow[name].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self._params(module):
                    if name in backup:
                        p.copy_(backup[name])

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": {k: v.cpu() for k, v in self.shadow.items()}, "num_updates": self.num_updates,
                "decay": self.decay}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.shadow = dict(state_dict["shadow"])
        self.num_updates = int(state_dict["num_updates"])


def find_ema(trainer: pl.Trainer) -> EMA | None:
    """The EMA callback of a trainer, if it has one."""
    return next((cb for cb in trainer.callbacks if isinstance(cb, EMA)), None)


def ema_state_from_checkpoint(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The EMA shadow weights stored in a Lightning checkpoint by the `EMA` callback (module-level names)."""
    state = checkpoint.get("callbacks", {}).get("EMA")
    return state["shadow"] if state else None


class NonFiniteGuard(pl.Callback):
    """Skips optimizer steps whose gradients are not finite; `max_consecutive` in a row stop the run.

    A skipped step drops every gradient (`set_to_none`), so the optimizer leaves weights and moments
    untouched; the step counter and LR schedule still advance. The count is logged as
    `train/nonfinite_skipped`. The decision is reduced across ranks so sharded gradients agree.
    Stopping raises before any further checkpoint is written, so the last good checkpoint stays intact.
    """

    def __init__(self, max_consecutive: int = 20):
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0

    @property
    def state_key(self) -> str:
        return "NonFiniteGuard"

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        finite = all(torch.isfinite(p.grad).all() for g in optimizer.param_groups for p in g["params"] if p.grad is not None)
        finite = trainer.strategy.reduce_boolean_decision(bool(finite), all=True)
        if finite:
            self.consecutive = 0
            return
        optimizer.zero_grad(set_to_none=True)
        self.skipped += 1
        self.consecutive += 1
        log.warning("step %d: non-finite loss or gradients, optimizer step skipped (%d in a row, %d in all)",
                    trainer.global_step, self.consecutive, self.skipped)
        pl_module.log("train/nonfinite_skipped", float(self.skipped), rank_zero_only=True)
        if self.consecutive >= self.max_consecutive:
            raise FloatingPointError(f"{self.consecutive} optimizer steps in a row had non-finite gradients "
                                     f"(callbacks.nonfinite_guard.max_consecutive={self.max_consecutive}); stopping. "
                                     f"The last checkpoint was written before this and is intact.")

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped, self.consecutive = int(state_dict["skipped"]), int(state_dict["consecutive"])


class PreemptionCheckpoint(pl.Callback):
    """On SIGTERM (cluster preemption, `scancel`), save `preempted.ckpt` after the current step, then stop.

    Lightning raises on SIGTERM right after `on_train_batch_end`; saving here records the step just
    finished, so `resume=auto` repeats nothing. SIGUSR1 (SLURM's warning before the time limit) is
    handled by Lightning's SLURM environment: it saves `hpc_ckpt_N.ckpt` and requeues the job;
    `resume=auto` picks whichever of the two is newest.
    """

    def __init__(self, dirpath: str):
        self.dirpath = dirpath
        self.saved = False

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.received_sigterm and not self.saved:
            path = f"{self.dirpath}/preempted.ckpt"
            log.warning("SIGTERM: saving %s at step %d before stopping", path, trainer.global_step)
            trainer.save_checkpoint(path)
            self.saved = True
