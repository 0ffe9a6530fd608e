"""Exact resume: a DiT run SIGKILLed mid-training and resumed with resume=auto equals an uninterrupted run."""

from __future__ import annotations

import pytest

from runs import tiny_dit_overrides, train
from vidgen.io.checkpoint import load_checkpoint

STEPS, KILL_AT = 10, 5


def _run(root, vae, shards, extra):
    base = [*tiny_dit_overrides(vae, shards), f"trainer.max_steps={STEPS}",
            "callbacks.model_checkpoint.every_n_train_steps=2", "task.module.cond_prob=0.5"]
    return train([*base, *extra], root, check=False)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a.values(), b.values()))


@pytest.mark.slow
@pytest.mark.parametrize("accumulate", [1, 2])
def test_sigkill_and_resume_equals_uninterrupted(demo_shards, tiny_vae_export, tmp_path, accumulate):
    """Also with gradient accumulation: each micro-batch draws its own t and noise from (seed, step, micro, rank)."""
    ref_root, cut_root = tmp_path / "ref", tmp_path / "cut"
    ref_root.mkdir(), cut_root.mkdir()
    acc = [f"trainer.accumulate_grad_batches={accumulate}"]
    ref = _run(ref_root, tiny_vae_export, demo_shards, acc)
    assert ref.returncode == 0, ref.stderr[-3000:]

    killed = _run(cut_root, tiny_vae_export, demo_shards,
                  [*acc, "+callbacks.kill._target_=tests.helpers.callbacks.KillAtStep", f"+callbacks.kill.step={KILL_AT}"])
    assert killed.returncode == -9, f"expected a SIGKILL death, got {killed.returncode}: {killed.stderr[-2000:]}"
    ckpts = cut_root / "runs" / "quickstart_dit" / "checkpoints"
    assert load_checkpoint(ckpts / "last.ckpt")["global_step"] == KILL_AT - 1  # checkpoints every 2 steps

    resumed = _run(cut_root, tiny_vae_export, demo_shards, [*acc, "resume=auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a = load_checkpoint(ref_root / "runs" / "quickstart_dit" / "checkpoints" / "last.ckpt")
    b = load_checkpoint(ckpts / "last.ckpt")
    assert a["global_step"] == b["global_step"] == STEPS
    assert a["epoch"] == b["epoch"] and (a["epoch"] >= 1 or accumulate > 1), "the run should cross an epoch boundary"
    # Same batches, same noise, same t, same optimizer moments: equal to float32 round-off.
    d_params = _max_diff(a["state_dict"], b["state_dict"])
    d_ema = _max_diff(a["callbacks"]["EMA"]["shadow"], b["callbacks"]["EMA"]["shadow"])
    print(f"resume vs uninterrupted after {STEPS} steps: max |dw| = {d_params:.3g}, max |d ema| = {d_ema:.3g}")
    assert d_params <= 1e-6 and d_ema <= 1e-6
    exp_a, exp_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert max((exp_a[k]["exp_avg_sq"] - exp_b[k]["exp_avg_sq"]).abs().max().item() for k in exp_a) <= 1e-9
    assert a["datamodule_hyper_parameters"] == b["datamodule_hyper_parameters"]


@pytest.mark.slow
def test_training_longer_from_the_final_checkpoint_equals_one_run(demo_shards, tiny_vae_export, tmp_path):
    """A run to max_steps=5 (checkpoints every 2 steps: its step 5 is saved by FinalCheckpoint) resumed to 10
    equals one 10-step run: the final save keeps the epoch in progress, so the resumed run continues it."""
    ref_root, cut_root = tmp_path / "ref", tmp_path / "cut"
    ref_root.mkdir(), cut_root.mkdir()
    assert _run(ref_root, tiny_vae_export, demo_shards, []).returncode == 0
    first = _run(cut_root, tiny_vae_export, demo_shards, ["trainer.max_steps=5"])
    assert first.returncode == 0, first.stderr[-3000:]
    ckpts = cut_root / "runs" / "quickstart_dit" / "checkpoints"
    assert load_checkpoint(ckpts / "last.ckpt")["global_step"] == 5
    longer = _run(cut_root, tiny_vae_export, demo_shards, ["resume=auto"])
    assert longer.returncode == 0, longer.stderr[-3000:]
    a = load_checkpoint(ref_root / "runs" / "quickstart_dit" / "checkpoints" / "last.ckpt")
    b = load_checkpoint(ckpts / "last.ckpt")
    assert a["global_step"] == b["global_step"] == STEPS and a["epoch"] == b["epoch"]
    d_params = _max_diff(a["state_dict"], b["state_dict"])
    print(f"5 steps + resume to {STEPS} vs {STEPS} in one run: max |dw| = {d_params:.3g}")
    assert d_params <= 1e-6


@pytest.mark.slow
def test_sigterm_saves_preempted_checkpoint_then_resumes(demo_shards, tiny_vae_export, tmp_path):
    """SIGTERM (preemption): the step in flight finishes, `preempted.ckpt` is written, resume=auto continues from it."""
    out = _run(tmp_path, tiny_vae_export, demo_shards,
               ["+callbacks.term._target_=tests.helpers.callbacks.SignalAtStep", "+callbacks.term.step=3",
                "callbacks.model_checkpoint.every_n_train_steps=100"])
    ckpts = tmp_path / "runs" / "quickstart_dit" / "checkpoints"
    preempted = load_checkpoint(ckpts / "preempted.ckpt")
    assert preempted["global_step"] == 4, out.stderr[-2000:]  # the step running when the signal came completed
    resumed = _run(tmp_path, tiny_vae_export, demo_shards, ["resume=auto", "trainer.max_steps=6"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert load_checkpoint(ckpts / "last.ckpt")["global_step"] == 6
