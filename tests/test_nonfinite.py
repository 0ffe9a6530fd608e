"""The non-finite guard never lets a diverged run's weights into a checkpoint, and names the newest good one."""

from __future__ import annotations

import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from helpers.nonfinite import LrBlowUp
from runs import tiny_dit_overrides, train
from vidgen.training.callbacks import NonFiniteGuard
from vidgen.training.checkpoint import AtomicCheckpointIO, load_checkpoint

SANE = 1e3  # |w| above this is a blown-up weight (the tiny models' weights stay below ~10)
NEWEST = re.compile(r"The newest checkpoint, (.+?), was written before this and holds finite weights")


class Regression(pl.LightningModule):
    """y = x @ w (+ a LayerNorm, so the largest weight starts at 1); the loss is NaN from `nan_from` on."""

    def __init__(self, nan_from: int | None = None, sgd: bool = False):
        super().__init__()
        torch.manual_seed(0)  # the same weights whatever ran before (test order, xdist workers)
        self.net = torch.nn.Sequential(torch.nn.LayerNorm(4), torch.nn.Linear(4, 1))
        self.nan_from, self.sgd = nan_from, sgd

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        if self.nan_from is not None and self.global_step >= self.nan_from:
            loss = loss * float("nan")
        return loss

    def configure_optimizers(self):
        if self.sgd:
            return torch.optim.SGD(self.parameters(), lr=0.01)
        return torch.optim.AdamW(self.parameters(), lr=0.05)


def _loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


def _fit(tmp_path, model, callbacks, steps=40, **ckpt):
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="step{step:03d}", every_n_train_steps=1,
                                           auto_insert_metric_name=False, save_last=True, save_top_k=1, monitor="step",
                                           mode="max", **ckpt)
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, callbacks=[*callbacks, ckpt_cb], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         plugins=[AtomicCheckpointIO()])
    with pytest.raises(FloatingPointError) as info:
        trainer.fit(model, _loader())
    return str(info.value)


def _tensors(state: dict):
    """Every float tensor of a checkpoint's weights and callback states (EMA shadow included)."""
    def walk(x):
        if isinstance(x, torch.Tensor):
            if x.is_floating_point():
                yield x
        elif isinstance(x, dict):
            for v in x.values():
                yield from walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                yield from walk(v)
    yield from walk(state["state_dict"])
    yield from walk(state.get("callbacks", {}))


def _assert_sane(path: Path) -> dict:
    state = load_checkpoint(path)
    for t in _tensors(state):
        assert torch.isfinite(t).all(), f"{path}: non-finite weights"
        assert t.abs().max() < SANE, f"{path}: blown-up weights (max |w| = {t.abs().max():.3g})"
    return state


def _assert_all_sane(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    assert not [p for p in files if p.name.startswith(".")], "temporary files left behind"
    for p in files:
        if p.suffix == ".ckpt":
            _assert_sane(p)
    return files


def _named(message: str) -> Path:
    assert "\n" not in message
    m = NEWEST.search(message)
    assert m, message
    return Path(m.group(1))


def test_nan_streak_writes_nothing_and_keeps_the_last_checkpoint_through_rotation(tmp_path):
    """save_top_k=1 + every step: without the hold, the streak's saves rotate every good checkpoint away."""
    msg = _fit(tmp_path, Regression(nan_from=6), [NonFiniteGuard(max_consecutive=4)])
    assert "4 optimizer steps in a row (steps 6-9)" in msg and "max_consecutive=4" in msg, msg
    named = _named(msg)
    assert named.is_file() and _assert_sane(named)["global_step"] == 6
    assert "those of step 6, the first to give a non-finite loss" in msg  # written right before the streak
    steps = {p.name: load_checkpoint(p)["global_step"] for p in (tmp_path / "ckpt").glob("*.ckpt")}
    assert steps == {"step006.ckpt": 6, "last.ckpt": 6}, steps  # nothing from the skipped steps 7-9


def test_blown_up_weights_never_reach_a_checkpoint(tmp_path):
    """lr=1e30 from step 5: finite weights ~1e29 after step 5 (held back), then an infinite loss (skipped)."""
    guard = NonFiniteGuard(max_consecutive=3)
    msg = _fit(tmp_path, Regression(), [guard, LrBlowUp(step=5)])
    assert "steps 6-8" in msg and "non-finite loss" in msg, msg
    named = _named(msg)
    assert named.parent == tmp_path / "ckpt" and _assert_sane(named)["global_step"] == 5
    files = _assert_all_sane(tmp_path)
    assert {p.name for p in files} == {"step005.ckpt", "last.ckpt"}


def test_weights_blown_up_but_finite_stop_after_max_consecutive_held_steps(tmp_path):
    """lr=2e3 from step 3: weights ~2e3 with a finite loss; no checkpoint from them, stop after 3 held steps."""
    msg = _fit(tmp_path, Regression(), [NonFiniteGuard(max_consecutive=3), LrBlowUp(step=3, lr=2e3)])
    assert msg.startswith("step 7: checkpoints held back for 3 steps in a row"), msg
    assert "now because the largest |weight| is" in msg and "max_weight_growth=1000" in msg, msg
    assert _assert_sane(_named(msg))["global_step"] == 3
    assert {p.name for p in _assert_all_sane(tmp_path)} == {"step003.ckpt", "last.ckpt"}


def test_nonfinite_weights_stop_at_once(tmp_path):
    """A finite step that makes the weights non-finite (SGD at lr=inf): stop right there, checkpoint nothing more."""
    msg = _fit(tmp_path, Regression(sgd=True), [NonFiniteGuard(max_consecutive=10), LrBlowUp(step=3, lr=float("inf"))],
               save_on_exception=True)
    assert msg.startswith("step 4: the weights became non-finite"), msg
    assert _assert_sane(_named(msg))["global_step"] == 3
    assert {p.name for p in _assert_all_sane(tmp_path)} == {"step003.ckpt", "last.ckpt"}


def test_no_checkpoint_yet_is_said(tmp_path):
    msg = _fit(tmp_path, Regression(nan_from=0), [NonFiniteGuard(max_consecutive=2)])
    assert msg.endswith("No checkpoint has been written yet."), msg
    assert not list(tmp_path.rglob("*.ckpt"))


def test_isolated_nonfinite_steps_delay_only_their_checkpoint(tmp_path):
    """A bad batch is skipped; its step writes no checkpoint, the next finite step does."""
    class Some(Regression):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if self.global_step in (3, 4) else loss

    guard = NonFiniteGuard(max_consecutive=5)
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="step{step:03d}", every_n_train_steps=1,
                                           auto_insert_metric_name=False, save_top_k=-1)
    pl.Trainer(accelerator="cpu", max_steps=8, callbacks=[guard, ckpt_cb], logger=False, enable_progress_bar=False,
               enable_model_summary=False, plugins=[AtomicCheckpointIO()]).fit(Some(), _loader())
    assert guard.skipped == 2 and guard.consecutive == 0
    names = sorted(p.name for p in (tmp_path / "ckpt").glob("*.ckpt"))
    # saves after steps 4 and 5 hold the weights that gave NaN at steps 3 and 4: held back
    assert names == [f"step{s:03d}.ckpt" for s in (1, 2, 3, 6, 7, 8)], names


def test_guard_state_round_trips():
    guard = NonFiniteGuard()
    guard.skipped, guard.consecutive, guard.streak_start = 5, 2, 40
    other = NonFiniteGuard()
    other.load_state_dict(guard.state_dict())
    assert (other.skipped, other.consecutive, other.streak_start) == (5, 2, 40)
    other.load_state_dict({"skipped": 1, "consecutive": 0})  # written before streak_start was stored
    assert other.streak_start is None
    with pytest.raises(ValueError, match="max_weight_growth"):
        NonFiniteGuard(max_weight_growth=0.5)


# ------------------------------------------------------------------ the real train.py

def _dit_run(root, vae, shards, extra):
    base = [*tiny_dit_overrides(vae, shards), "trainer.max_steps=30",
            "callbacks.model_checkpoint.every_n_train_steps=2", "callbacks.model_checkpoint.save_top_k=1",
            "callbacks.nonfinite_guard.max_consecutive=3"]
    out = train([*base, *extra], root, check=False)
    assert out.returncode == 2, "the diverging run should stop with one line and exit 2"
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    return lines[0].removeprefix("error: "), root / "runs" / "quickstart_dit"


@pytest.mark.slow
def test_dit_run_diverging_at_lr_1e30_keeps_only_finite_checkpoints(demo_shards, tiny_vae_export, tmp_path):
    msg, run = _dit_run(tmp_path, tiny_vae_export, demo_shards,
                        ["+callbacks.blowup._target_=tests.helpers.nonfinite.LrBlowUp", "+callbacks.blowup.step=5"])
    print(msg)
    named = _named(msg)
    assert named.is_file() and named.parent == run / "checkpoints"
    assert _assert_sane(named)["global_step"] == 4  # checkpoints every 2 steps; step 5's update blew the weights up
    files = _assert_all_sane(run)
    assert {p.name for p in files if p.suffix == ".ckpt"} == {"step0000004.ckpt", "last.ckpt"}


@pytest.mark.slow
def test_dit_run_at_lr_1e30_from_the_start_writes_no_checkpoint(demo_shards, tiny_vae_export, tmp_path):
    msg, run = _dit_run(tmp_path, tiny_vae_export, demo_shards,
                        ["task.module.optimizer.lr=1e30", "callbacks.model_checkpoint.every_n_train_steps=1"])
    print(msg)
    assert msg.endswith("No checkpoint has been written yet."), msg
    assert not [p for p in _assert_all_sane(run) if p.suffix == ".ckpt"]
