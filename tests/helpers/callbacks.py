"""Test-only Lightning callbacks, added to real `train.py` runs with `+callbacks.NAME._target_=...`."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import signal as signal_module
from pathlib import Path

import lightning.pytorch as pl


class RankReport(pl.Callback):
    """Writes `OUT/rank{r}.json`: the sample keys this rank trained on and a hash of its final weights."""

    def __init__(self, out: str):
        self.out, self.keys, self.epoch_keys = Path(out), [], {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.keys.extend(batch.get("key", []))
        self.epoch_keys.setdefault(str(trainer.current_epoch), []).extend(batch.get("key", []))

    def on_train_end(self, trainer, pl_module):
        digest = hashlib.sha256()
        for name, tensor in sorted(pl_module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        self.out.mkdir(parents=True, exist_ok=True)
        report = {"rank": trainer.global_rank, "world_size": trainer.world_size, "keys": self.keys, "epoch_keys": self.epoch_keys,
                  "weights_sha256": digest.hexdigest(), "global_step": trainer.global_step}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


class KillAtStep(pl.Callback):
    """SIGKILLs its own training process when `global_step` reaches `step` (a real, unclean death)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class SignalAtStep(pl.Callback):
    """Sends `signal` (e.g. SIGTERM, as a cluster preempting the job) to its own process at `global_step == step`."""

    def __init__(self, step: int, signal: str = "SIGTERM"):
        self.step, self.signal = step, getattr(signal_module, signal)
        self.sent = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signal)
