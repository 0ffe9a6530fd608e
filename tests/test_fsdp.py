"""FSDP2 for real: the tiny DiT trained by 2 gloo ranks under trainer=fsdp_cpu (Lightning's ModelParallelStrategy,
fully_shard per block) equals the same run under DDP; its distributed checkpoint consolidates and samples."""

from __future__ import annotations

import pytest
import torch

from runs import tiny_dit_overrides, train
from vidgen.io.checkpoint import main as export_main, read_parts
from vidgen.pipeline import DiTPipeline

STEPS = 3


def _max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.slow
def test_fsdp_equals_ddp_then_consolidates_and_samples(demo_shards, tiny_vae_export, tmp_path):
    common = [*tiny_dit_overrides(tiny_vae_export, demo_shards), "data.val_split=null", "data.num_workers=0",
              f"trainer.max_steps={STEPS}", "task.module.optimizer.lr=1e-2", "task.module.scheduler.warmup_steps=1"]
    for name in ("ddp", "fsdp"):
        (tmp_path / name).mkdir()
        train([*common, f"trainer={name}_cpu"], tmp_path / name)
    ddp_ckpt = tmp_path / "ddp" / "runs" / "quickstart_dit" / "checkpoints" / "last.ckpt"
    fsdp_ckpt = tmp_path / "fsdp" / "runs" / "quickstart_dit" / "checkpoints" / "last.ckpt"
    assert fsdp_ckpt.is_dir() and (fsdp_ckpt / ".metadata").is_file()  # a distributed (DCP) checkpoint

    raw = {name: read_parts(path, ema=False) for name, path in (("ddp", ddp_ckpt), ("fsdp", fsdp_ckpt))}
    ema = {name: read_parts(path, ema=True) for name, path in (("ddp", ddp_ckpt), ("fsdp", fsdp_ckpt))}
    assert raw["fsdp"].info["global_step"] == raw["ddp"].info["global_step"] == STEPS
    base = read_parts(ddp_ckpt, ema=False)
    weights = _max_diff(raw["fsdp"].parts["dit"].state, raw["ddp"].parts["dit"].state)
    averages = _max_diff(ema["fsdp"].parts["dit"].state, ema["ddp"].parts["dit"].state)
    text = _max_diff(raw["fsdp"].parts["cond.text"].state, raw["ddp"].parts["cond.text"].state)
    print(f"FSDP2 vs DDP after {STEPS} steps: DiT weights max |diff| {weights:.2e}, EMA {averages:.2e}, "
          f"text encoder {text:.2e}")
    assert weights < 1e-4 and averages < 1e-4 and text < 1e-4  # lr 1e-2: updates of ~1e-2, float32 sums in another order
    assert ema["fsdp"].info["ema_used"] and _max_diff(ema["fsdp"].parts["dit"].state, base.parts["dit"].state) > 0

    assert export_main([str(fsdp_ckpt), str(tmp_path / "export")]) == 0
    samples = [DiTPipeline.from_pretrained(path, device="cpu")(["bikes"], 5, 32, 32, steps=2, seed=3).video
               for path in (tmp_path / "export", ddp_ckpt)]
    print(f"samples from the consolidated FSDP export vs the DDP checkpoint: max |diff| "
          f"{(samples[0] - samples[1]).abs().max().item():.2e}")
    assert torch.allclose(samples[0], samples[1], atol=1e-4)

    # the 2-rank distributed checkpoint resumes on 1 rank (DCP reshards weights, optimizer state and EMA)
    (tmp_path / "resumed").mkdir()
    out = train([*common, "trainer=fsdp_cpu", "trainer.devices=1", f"resume={fsdp_ckpt}",
                 f"trainer.max_steps={STEPS + 2}"], tmp_path / "resumed")
    resumed = read_parts(tmp_path / "resumed" / "runs" / "quickstart_dit" / "checkpoints" / "last.ckpt", ema=False)
    assert resumed.info["global_step"] == STEPS + 2, out.stdout[-2000:]
    assert _max_diff(resumed.parts["dit"].state, raw["fsdp"].parts["dit"].state) > 0  # it trained on from there
