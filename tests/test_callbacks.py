"""EMA and the non-finite guard on a real Lightning fit (a small regression model)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from vidgen.training.callbacks import EMA, FinalCheckpoint, NonFiniteGuard, StepProgressBar
from vidgen.training.checkpoint import AtomicCheckpointIO, load_checkpoint


class Regression(pl.LightningModule):
    """y = x @ w; the loss is made NaN on the steps listed in `nan_steps`."""

    def __init__(self, nan_steps=()):
        super().__init__()
        self.net = torch.nn.Linear(4, 1)
        self.nan_steps = set(nan_steps)
        self.weights_seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.weights_seen.append(self.net.weight.detach().clone())
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        if self.global_step in self.nan_steps:
            loss = loss * float("nan")
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.05)


def _loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


def _trainer(tmp_path, callbacks, steps):
    return pl.Trainer(accelerator="cpu", max_steps=steps, callbacks=callbacks, logger=False, enable_progress_bar=False,
                      enable_checkpointing=any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks),
                      default_root_dir=tmp_path, plugins=[AtomicCheckpointIO()])


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    model = Regression(nan_steps={2, 3})
    guard = NonFiniteGuard(max_consecutive=5)
    _trainer(tmp_path, [guard], steps=6).fit(model, _loader())
    w = model.weights_seen
    assert guard.skipped == 2
    assert torch.equal(w[3], w[2]) and torch.equal(w[4], w[3])  # NaN steps 2 and 3 left the weights alone
    assert not torch.equal(w[2], w[1]) and not torch.equal(w[5], w[4])  # finite steps do update
    assert all(torch.isfinite(t).all() for t in w)


def test_nonfinite_in_a_row_stops_with_last_checkpoint_intact(tmp_path):
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    model = Regression(nan_steps=set(range(4, 100)))
    with pytest.raises(FloatingPointError, match="max_consecutive=3"):
        _trainer(tmp_path, [NonFiniteGuard(max_consecutive=3), ckpt_cb], steps=20).fit(model, _loader())
    ckpts = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert ckpts, "the checkpoints written before the failure must remain"
    for path in ckpts:
        state = load_checkpoint(path)
        assert all(torch.isfinite(v).all() for v in state["state_dict"].values())


def test_ema_tracks_and_round_trips_through_checkpoint(tmp_path):
    ema = EMA(decay=0.9)
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    model = Regression()
    _trainer(tmp_path, [ema, ckpt_cb], steps=8).fit(model, _loader())
    assert ema.num_updates == 8
    shadow = ema.shadow["net.weight"]
    assert not torch.equal(shadow, model.net.weight.detach())  # an average, not a copy
    with ema.average_parameters(model):
        assert torch.equal(model.net.weight.detach(), shadow)
    assert not torch.equal(model.net.weight.detach(), shadow)  # swapped back
    state = load_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert torch.equal(state["callbacks"]["EMA"]["shadow"]["net.weight"], shadow)
    assert state["callbacks"]["EMA"]["num_updates"] == 8


def test_progress_prints_plain_lines_every_5_percent_without_a_terminal():
    bar = StepProgressBar()
    lines = {step: bar.plain_line(step, 200, now=10.0 + step * 0.5) for step in range(1, 201)}  # 2 steps/s
    printed = {step: line for step, line in lines.items() if line is not None}
    assert sorted(printed) == [1, *range(10, 201, 10)]  # the first step, every 10 of 200, and the last
    assert printed[100] == "step 100/200 (50%), 2.00 steps/s, ETA 50 s"
    assert printed[200] == "step 200/200 (100%), 2.00 steps/s, ETA 0 s"
    assert StepProgressBar().plain_line(5, -1) is None  # no max_steps: nothing to count against


@pytest.mark.parametrize("callback, last_step", [(pl.callbacks.ModelCheckpoint, 3), (FinalCheckpoint, 5)])
def test_the_final_steps_reach_last_ckpt(tmp_path, callback, last_step):
    """every_n_train_steps=3, max_steps=5: Lightning's callback leaves last.ckpt at step 3; ours saves step 5."""
    ckpt_cb = callback(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_last=True, save_top_k=2,
                       monitor="step", mode="max")
    _trainer(tmp_path, [ckpt_cb], steps=5).fit(Regression(), _loader())
    assert load_checkpoint(tmp_path / "ckpt" / "last.ckpt")["global_step"] == last_step


def test_final_checkpoint_writes_nothing_while_the_guard_holds_checkpoints(tmp_path):
    """NaN losses from step 3 on: the final save does not write the suspect weights of the last step."""
    ckpt_cb = FinalCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_last=True, save_top_k=-1)
    _trainer(tmp_path, [NonFiniteGuard(max_consecutive=10), ckpt_cb], steps=5).fit(Regression(nan_steps={3, 4}),
                                                                                    _loader())
    assert load_checkpoint(tmp_path / "ckpt" / "last.ckpt")["global_step"] == 2
