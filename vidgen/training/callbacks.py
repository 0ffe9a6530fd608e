"""Training callbacks shared by every task: EMA of weights and the non-finite step guard."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Any, Iterator

import lightning.pytorch as pl
import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from vidgen.errors import UserError
from vidgen.io.checkpoint import EMA_KEY
from vidgen.training.checkpoint import newest_checkpoint

log = logging.getLogger(__name__)


class EMA(pl.Callback):
    """Exponential moving average of the trainable parameters, saved in (and restored from) checkpoints.

    `decay` is reached with the warm-up `min(decay, (1 + n) / (10 + n))` (n = updates so far), so early
    averages are not dominated by the random init. The shadow weights are kept in fp32 on the module's
    device, sharded like the weights under FSDP2 (DTensors); `average_parameters(module)` swaps them in (sampling,
    validation, export) and back.
    """

    def __init__(self, decay: float = 0.999, update_every: int = 1, start_step: int = 0):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"callbacks.ema.decay={decay}: expected a value in (0, 1)")
        self.decay, self.update_every, self.start_step = decay, update_every, start_step
        self.shadow: dict[str, torch.Tensor] = {}
        self.num_updates = 0

    @property
    def state_key(self) -> str:
        return EMA_KEY  # where vidgen.io.checkpoint finds the shadow weights

    def _params(self, module: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
        return ((n, p) for n, p in module.named_parameters() if p.requires_grad)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for name, p in self._params(pl_module):
            if name not in self.shadow:
                self.shadow[name] = p.detach().float().clone()
            else:
                self._place(name, p)

    def _place(self, name: str, p: torch.Tensor) -> torch.Tensor:
        """The shadow of `p` next to it: restored from a checkpoint (whole tensors, loaded before or after
        `on_fit_start` depending on the strategy) it moves to p's device and, under FSDP2, is sharded like p."""
        shadow = self.shadow[name]
        if isinstance(p, DTensor) and not isinstance(shadow, DTensor):
            shadow = self.shadow[name] = distribute_tensor(shadow.to(p.device), p.device_mesh, p.placements)
        elif shadow.device != p.device:
            shadow = self.shadow[name] = shadow.to(p.device)
        return shadow

    @torch.no_grad()
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step < self.start_step or step % self.update_every:
            return
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for name, p in self._params(pl_module):
            self._place(name, p).lerp_(p.detach().float(), 1.0 - decay)

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
                    p.copy_(self._place(name, p).to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self._params(module):
                    if name in backup:
                        p.copy_(backup[name])

    def state_dict(self) -> dict[str, Any]:
        """Whole fp32 shadow tensors on the CPU: under FSDP2 each rank's shards are gathered (every rank calls this
        when a checkpoint is saved), so the checkpoint reader and exports see plain tensors."""
        whole = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in self.shadow.items()}
        return {"shadow": {k: v.cpu() for k, v in whole.items()}, "num_updates": self.num_updates, "decay": self.decay}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.shadow = dict(state_dict["shadow"])
        self.num_updates = int(state_dict["num_updates"])


def find_ema(trainer: pl.Trainer) -> EMA | None:
    """The EMA callback of a trainer, if it has one."""
    return next((cb for cb in trainer.callbacks if isinstance(cb, EMA)), None)


class NonFiniteStop(UserError, FloatingPointError):
    """The run diverged: the one line names the last checkpoint with finite weights (or says there is none)."""


class NonFiniteGuard(pl.Callback):
    """Skips optimizer steps with a non-finite loss or gradients, and keeps such weights out of checkpoints.

    - Skipping: a step whose loss or gradients are not finite drops every gradient (`set_to_none`), so the
      optimizer leaves weights and moments untouched; the step counter and LR schedule still advance. The
      count is logged as `train/nonfinite_skipped`.
    - Stopping: `max_consecutive` skipped steps in a row (the weights give a non-finite loss on every batch),
      weights that became non-finite (a finite step overflowed them), or checkpoints held back (below) for
      `max_consecutive` steps in a row raise `FloatingPointError` with one line naming the newest checkpoint
      on disk (or saying none was written yet).
    - Checkpoints: while the current weights are suspect, `ModelCheckpoint` writes nothing (the hold makes
      it skip the step, as after a save of that step; it also covers `save_on_exception`). Suspect: during
      a skip streak (these weights produced the non-finite loss), and after a step that made the largest
      weight grow over `max_weight_growth` times that of the last checkpointable weights (floored at 1; lr=1e30
      makes finite weights ~1e28 one step before the losses turn non-finite), until it is back in bound.
      So no skip streak or blown-up step writes a checkpoint, and none rotates the last good one away.
      Lightning runs `ModelCheckpoint` hooks after all other callbacks, so the hold comes first.

    Every decision is reduced across ranks, so sharded gradients and weights agree.
    """

    def __init__(self, max_consecutive: int = 20, max_weight_growth: float | None = 1000.0):
        if max_consecutive < 1:
            raise ValueError(f"callbacks.nonfinite_guard.max_consecutive={max_consecutive}: expected >= 1")
        if max_weight_growth is not None and not max_weight_growth > 1:
            raise ValueError(f"callbacks.nonfinite_guard.max_weight_growth={max_weight_growth}: expected > 1 or null")
        self.max_consecutive, self.max_weight_growth = max_consecutive, max_weight_growth
        self.skipped = 0
        self.consecutive = 0
        self.streak_start: int | None = None  # global step of the first skipped step of the current streak
        self._loss_finite: torch.Tensor | None = None  # all losses since the last optimizer step were finite
        self._trusted_scale: float | None = None  # max |w| of the last weights a checkpoint was allowed to hold
        self._checked_step: int | None = None
        self._held: str | None = None  # why checkpoints are held back now (None: they are not)
        self._held_since: int | None = None
        self._last_saved_step: int | None = None

    @property
    def state_key(self) -> str:
        return "NonFiniteGuard"

    @staticmethod
    def _local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t  # DTensor (FSDP2): this rank's shard

    @staticmethod
    def _max_abs(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        """max |t| of each (non-empty) tensor: NaN / inf when it holds one, never overflows; one fused kernel."""
        if hasattr(torch, "_foreach_norm"):
            return list(torch._foreach_norm(ts, float("inf")))
        return [torch.linalg.vector_norm(t, ord=float("inf")) for t in ts]

    @torch.no_grad()
    def _weight_stats(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[bool, float]:
        """(all trainable weights finite, max |w|) over every rank."""
        ts = [t for p in pl_module.parameters() if p.requires_grad and (t := self._local(p.detach())).numel()]
        device = trainer.strategy.root_device
        if ts:
            local = torch.stack([m.float().to(device) for m in self._max_abs(ts)]).max()
        else:
            local = torch.zeros((), device=device)
        stats = torch.stack([(~torch.isfinite(local)).float(), torch.nan_to_num(local, nan=0.0, posinf=0.0)])
        nonfinite, scale = trainer.strategy.reduce(stats, reduce_op="max").tolist()
        return nonfinite == 0, scale

    def _hold_checkpoints(self, trainer: pl.Trainer) -> None:
        """Make every ModelCheckpoint skip this step (it skips a step it has already saved)."""
        for cb in trainer.checkpoint_callbacks:
            if hasattr(cb, "_last_global_step_saved"):
                cb._last_global_step_saved = trainer.global_step

    def _stop(self, trainer: pl.Trainer, what: str) -> None:

        self._hold_checkpoints(trainer)
        folders = {str(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)}
        newest = newest_checkpoint(*sorted(folders | {str(trainer.default_root_dir)}))
        if newest is None:
            where = "No checkpoint has been written yet."
        else:
            where = f"The newest checkpoint, {newest}, was written before this and holds finite weights"
            if self.streak_start is not None and self._last_saved_step == self.streak_start:
                where += (f" (those of step {self.streak_start}, the first to give a non-finite loss: if resuming from "
                          f"it stops again, resume from an earlier one)")
            where += "."
        raise NonFiniteStop(f"{what}; stopping. No checkpoint was written while the weights were suspect. {where}")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for cb in trainer.checkpoint_callbacks:
            if not hasattr(cb, "_last_global_step_saved"):
                log.warning("NonFiniteGuard cannot hold back %s (no _last_global_step_saved): it may checkpoint "
                            "weights of a skip streak", type(cb).__name__)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        finite, scale = self._weight_stats(trainer, pl_module)
        self._trusted_scale = scale if finite else None
        self._checked_step = trainer.global_step

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        ok = torch.isfinite(loss.detach()).all()
        self._loss_finite = ok if self._loss_finite is None else self._loss_finite & ok

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        grads = [t for g in optimizer.param_groups for p in g["params"]
                 if p.grad is not None and (t := self._local(p.grad)).numel()]
        flags = [torch.isfinite(m) for m in self._max_abs(grads)] if grads else []
        if self._loss_finite is not None:
            flags.append(self._loss_finite)
        self._loss_finite = None
        finite = bool(torch.stack([f.to(flags[0].device) for f in flags]).all()) if flags else True  # one sync
        finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            if self.consecutive:
                log.info("step %d: finite again after %d skipped steps", trainer.global_step, self.consecutive)
            self.consecutive, self.streak_start = 0, None
            return
        optimizer.zero_grad(set_to_none=True)
        self.skipped += 1
        self.consecutive += 1
        if self.streak_start is None:
            self.streak_start = trainer.global_step
        log.warning("step %d: non-finite loss or gradients, optimizer step skipped (%d in a row, %d in all)",
                    trainer.global_step, self.consecutive, self.skipped)
        pl_module.log("train/nonfinite_skipped", float(self.skipped), rank_zero_only=True)
        if self.consecutive >= self.max_consecutive:
            self._stop(trainer, f"{self.consecutive} optimizer steps in a row (steps {self.streak_start}-"
                                f"{trainer.global_step}) had a non-finite loss or gradients "
                                f"(callbacks.nonfinite_guard.max_consecutive={self.max_consecutive})")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step != self._checked_step:  # an optimizer step ran: check the new weights
            self._checked_step = trainer.global_step
            finite, scale = self._weight_stats(trainer, pl_module)
            if not finite:
                self._stop(trainer, f"step {trainer.global_step}: the weights became non-finite (a finite optimizer "
                                    f"step overflowed them)")
            held = None
            if self.consecutive:
                held = f"the weights gave a non-finite loss or gradients since step {self.streak_start}"
            elif (self.max_weight_growth is not None and self._trusted_scale is not None
                  and scale > self.max_weight_growth * max(self._trusted_scale, 1.0)):
                held = (f"the largest |weight| is {scale:.3g}, over callbacks.nonfinite_guard.max_weight_growth="
                        f"{self.max_weight_growth:g} times {max(self._trusted_scale, 1.0):.3g} (that of the last "
                        f"checkpointable weights, at least 1)")
            if held is None:
                self._trusted_scale = scale
                if self._held:
                    log.info("step %d: checkpoints allowed again", trainer.global_step)
                self._held_since = None
            elif self._held is None:
                log.warning("step %d: checkpoints held back: %s", trainer.global_step, held)
                self._held_since = trainer.global_step
            self._held = held
            if held is not None and trainer.global_step - self._held_since >= self.max_consecutive:
                self._stop(trainer, f"step {trainer.global_step}: checkpoints held back for {self.max_consecutive} "
                                    f"steps in a row (callbacks.nonfinite_guard.max_consecutive), now because {held}")
        if self._held:
            self._hold_checkpoints(trainer)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._last_saved_step = trainer.global_step

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": self.consecutive, "streak_start": self.streak_start}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped, self.consecutive = int(state_dict["skipped"]), int(state_dict["consecutive"])
        self.streak_start = state_dict.get("streak_start")


class FinalCheckpoint(pl.callbacks.ModelCheckpoint):
    """Lightning's `ModelCheckpoint`, plus a save of the step a run ends at.

    With `every_n_train_steps: 250` and `max_steps: 400`, Lightning's callback leaves `last.ckpt` at step 250: the
    run's final 150 steps would reach no checkpoint and no export. This saves them (top-k and last) at the end of the
    batch that reaches `max_steps`, while the epoch is still in progress, so that raising `max_steps` and resuming
    continues that epoch where it stopped, exactly as an uninterrupted run (`tests/test_resume.py`); a run that ends
    otherwise (max_epochs) is saved in `on_train_end`. Nothing is written for a step already saved or while
    `NonFiniteGuard` holds checkpoints back (it marks the step as saved). A run stopped by an exception or SIGTERM
    reaches neither (`PreemptionCheckpoint`).
    """

    def _save_final(self, trainer: pl.Trainer) -> None:
        if trainer.global_step > self._last_global_step_saved and not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args)
        if trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step:
            self._save_final(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save_final(trainer)


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


class StepProgressBar(pl.callbacks.RichProgressBar):
    """Rich progress bar whose label counts optimizer steps of `trainer.max_steps` (runs are paced by steps:
    Lightning's "Epoch 74/-2" means nothing with max_epochs=-1).

    Where stdout is no terminal (a log file, CI) Rich draws nothing until the end, so every `log_every` of
    max_steps (5%) it also prints one plain line: `step N/M (P%), S steps/s, ETA T s`.
    """

    def __init__(self, *args: Any, log_every: float = 0.05, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.log_every = log_every
        self._plain_start: tuple[float, int] | None = None
        self._plain_last = -1

    def plain_line(self, step: int, max_steps: int, now: float | None = None) -> str | None:
        """The plain progress line due at optimizer step `step` (None between lines or without max_steps)."""
        if not max_steps or max_steps <= 0 or self.log_every <= 0:
            return None
        now = time.perf_counter() if now is None else now
        if self._plain_start is None:
            self._plain_start = (now, step)
        every = max(1, round(max_steps * self.log_every))
        if step // every == self._plain_last // every and step != max_steps:
            return None
        self._plain_last = step
        t0, s0 = self._plain_start
        rate = (step - s0) / (now - t0) if now > t0 and step > s0 else 0.0
        eta = f", ETA {(max_steps - step) / rate:.0f} s" if rate > 0 else ""
        return f"step {step}/{max_steps} ({100 * step / max_steps:.0f}%), {rate:.2f} steps/s{eta}"

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        total = f"/{trainer.max_steps}" if trainer.max_steps and trainer.max_steps > 0 else ""
        return f"step {trainer.global_step}{total} (epoch {current_epoch})"

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args)
        if self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(self.train_progress_bar_id,
                                 description=self._get_train_description(trainer.current_epoch))
        if trainer.is_global_zero and not sys.stdout.isatty():
            line = self.plain_line(trainer.global_step, trainer.max_steps)
            if line is not None:
                print(line, flush=True)
