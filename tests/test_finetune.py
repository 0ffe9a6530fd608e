"""Fine-tuning through the real train.py: a full fine-tune starts from an export (`task.module.init_from`), a
misfit base stops in one line naming the tensor, and a LoRA run (experiment=finetune_lora, mixing a trigger-word
style set with a prior-preservation set) checkpoints only its adapters and resumes exactly after a SIGKILL."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from runs import train
from vidgen.io.checkpoint import load_checkpoint, read_parts, write_export

LORA_STEPS, KILL_AT, RANK = 8, 5, 4
TINY_MODEL = ["model.dit.dim=32", "model.dit.depth=2", "model.dit.num_heads=2", "model.dit.ffn_dim=64",
              "model.dit.freq_dim=32", "model.text.dim=16", "model.text.depth=1", "model.text.num_heads=2"]
QUIET = ["logger=none", "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false", "num_threads=1"]
_CACHE: dict = {}  # runs shared with test_lora_export.py (one base, one LoRA run per session)


def base_export(tmp_path_factory, demo_shards: Path, vae: Path) -> Path:
    """A tiny DiT trained 3 steps with a large lr (so its output is far from zero), exported with its VAE."""
    if "base" not in _CACHE:
        root = tmp_path_factory.mktemp("base")
        train(["experiment=quickstart_dit", f"task.module.vae_path={vae}", f"data.train_shards={demo_shards}",
               *TINY_MODEL, "~callbacks.sample_logging", *QUIET, "trainer.max_steps=3",
               "task.module.optimizer.lr=1e-2", "task.module.scheduler.warmup_steps=1"], root)
        ckpt = root / "runs" / "quickstart_dit" / "checkpoints" / "last.ckpt"
        _CACHE["base"] = write_export(read_parts(ckpt), root / "export")
    return _CACHE["base"]


def lora_overrides(base: Path, shards: Path, steps: int = LORA_STEPS) -> list[str]:
    """experiment=finetune_lora shrunk to the tiny base: 3:1 style set (trigger sks) : prior set, on the CPU."""
    return ["experiment=finetune_lora", "data=demo", "trainer=cpu", f"task.module.init_from={base}", *TINY_MODEL,
            *QUIET, "data.train_shards=null", "data.buckets=[[9,48,112]]", "data.samples_per_epoch=6",
            f"data.sources=[{{shards: {shards}, weight: 3, trigger: sks}}, {{shards: {shards}, weight: 1}}]",
            f"task.module.lora.rank={RANK}", "task.module.lora.alpha=6", "task.module.optimizer.lr=1e-2",
            "task.module.scheduler.warmup_steps=1", "task.module.cond_prob=0.5", f"trainer.max_steps={steps}",
            "callbacks.model_checkpoint.every_n_train_steps=2"]


def lora_run(tmp_path_factory, demo_shards: Path, vae: Path) -> Path:
    """The uninterrupted LoRA run of LORA_STEPS steps: its last.ckpt."""
    if "lora" not in _CACHE:
        base = base_export(tmp_path_factory, demo_shards, vae)
        root = tmp_path_factory.mktemp("lora")
        train(lora_overrides(base, demo_shards), root)
        _CACHE["lora"] = root / "runs" / "finetune_lora" / "checkpoints" / "last.ckpt"
    return _CACHE["lora"]


def _max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_full_finetune_starts_from_the_export(tmp_path_factory, demo_shards, tiny_vae_export, tmp_path):
    """lr=0: after one step the weights are exactly the base's (DiT and the trained text encoder); meta says so."""
    base = base_export(tmp_path_factory, demo_shards, tiny_vae_export)
    train(["experiment=finetune_full", "data=demo", "trainer=cpu", f"task.module.init_from={base}", *TINY_MODEL,
           *QUIET, f"data.train_shards={demo_shards}", "data.buckets=[[9,48,112]]", "trainer.max_steps=1",
           "task.module.optimizer.lr=0", "scale.activation_checkpointing=false"], tmp_path)
    ckpt = load_checkpoint(tmp_path / "runs" / "finetune_full" / "checkpoints" / "last.ckpt")
    started = ckpt["vidgen"]["meta"]["init_from"]
    assert started["path"] == str(base.resolve()) and set(started["parts"]) == {"dit", "cond.text"}
    parts = read_parts(base)
    for name, prefix in (("dit", "dit."), ("cond.text", "conditioner.entries.text.encoder.")):
        saved = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
        assert _max_diff(saved, parts.parts[name].state) == 0.0, name


def test_init_from_a_misfit_base_is_one_line(tmp_path_factory, demo_shards, tiny_vae_export, tmp_path):
    base = base_export(tmp_path_factory, demo_shards, tiny_vae_export)
    out = train(["experiment=finetune_full", "data=demo", "trainer=cpu", f"task.module.init_from={base}",
                 *TINY_MODEL, "model.dit.dim=48", *QUIET, f"data.train_shards={demo_shards}"], tmp_path, check=False)
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error: ")]
    assert out.returncode == 2 and len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    line = errors[0]
    assert line.startswith(f"error: task.module.init_from={base} [dit]: weights do not fit vidgen.models.dit.DiT: ")
    assert "wrong shape key(s) (e.g. blocks.0." in line and "[32] vs [48])" in line, line
    assert line.endswith("; the base was built with model.dit.dim=32"), line


@pytest.mark.slow
def test_lora_checkpoints_only_adapters_and_resumes_exactly(tmp_path_factory, demo_shards, tiny_vae_export,
                                                            tmp_path):
    ref = load_checkpoint(lora_run(tmp_path_factory, demo_shards, tiny_vae_export))
    base = base_export(tmp_path_factory, demo_shards, tiny_vae_export)
    # Only the adapters: A and B for each of the 10 adapted linears (attn1/attn2 q k v out, ffn fc1 fc2) x 2 blocks.
    keys = sorted(ref["state_dict"])
    assert len(keys) == 2 * 10 * 2 and all(".lora_A." in k or ".lora_B." in k for k in keys), keys[:3]
    assert sorted(ref["callbacks"]["EMA"]["shadow"]) == keys  # the EMA averages the trainable adapters only
    assert [k for g in ref["optimizer_states"][0]["param_groups"] for k in g["params"]] == list(range(len(keys)))
    described = ref["vidgen"]
    assert described["meta"]["init_from"]["path"] == str(base.resolve())
    assert described["meta"]["adapters"]["lora"]["rank"] == RANK and len(described["meta"]["adapters"]["lora"][
        "modules"]) == 20
    assert described["parts"]["dit"]["base"] and described["parts"]["cond.text"]["base"]

    killed = train([*lora_overrides(base, demo_shards), "+callbacks.kill._target_=tests.helpers.callbacks.KillAtStep",
                    f"+callbacks.kill.step={KILL_AT}"], tmp_path, check=False)
    assert killed.returncode == -9, f"expected a SIGKILL death, got {killed.returncode}: {killed.stderr[-2000:]}"
    ckpts = tmp_path / "runs" / "finetune_lora" / "checkpoints"
    assert load_checkpoint(ckpts / "last.ckpt")["global_step"] == KILL_AT - 1
    train([*lora_overrides(base, demo_shards), "resume=auto"], tmp_path)
    resumed = load_checkpoint(ckpts / "last.ckpt")
    assert resumed["global_step"] == ref["global_step"] == LORA_STEPS and resumed["epoch"] == ref["epoch"] >= 1
    d_params = _max_diff(ref["state_dict"], resumed["state_dict"])
    d_ema = _max_diff(ref["callbacks"]["EMA"]["shadow"], resumed["callbacks"]["EMA"]["shadow"])
    print(f"LoRA resume vs uninterrupted after {LORA_STEPS} steps: max |dA,dB| = {d_params:.3g}, ema {d_ema:.3g}")
    assert d_params <= 1e-6 and d_ema <= 1e-6
    assert max(v.abs().max().item() for k, v in ref["state_dict"].items() if ".lora_B." in k) > 1e-3  # it trained
