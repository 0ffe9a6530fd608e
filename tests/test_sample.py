"""train.py (DiT) -> checkpoint -> sample.py end to end, export -> same samples, image-to-video, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from test_dit_training import make_tiny_vae_export
from vidgen.io.video import read_video
from vidgen.io.checkpoint import load_checkpoint, main as export_main, read_parts
from vidgen.io.fingerprint import fingerprint_folder
from vidgen.pipeline import DiTPipeline

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}  # tiny models: 1 thread is fastest


def run(script: str, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *overrides], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=ENV)


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory) -> Path:
    clips = torch.rand(2, 3, 5, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return make_tiny_vae_export(tmp_path_factory.mktemp("tiny_vae"), clips)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_shards, tiny_vae_dir) -> Path:
    """`train.py experiment=quickstart_dit`, shrunk to a tiny DiT / 3 steps at 5x32x32; returns the run folder."""
    tmp = tmp_path_factory.mktemp("dit_run")
    out = run("train.py", "experiment=quickstart_dit", f"paths.root_dir={tmp}", f"hydra.run.dir={tmp}/run",
              f"data.train_shards={demo_shards}", "data.buckets=[[5,32,32]]", f"task.module.vae_path={tiny_vae_dir}",
              "model.dit.dim=32", "model.dit.depth=1", "model.dit.num_heads=2", "model.dit.ffn_dim=64",
              "model.dit.freq_dim=32", "model.text.dim=32", "model.text.depth=1", "trainer.max_steps=3",
              "trainer.val_check_interval=3", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1",
              "trainer.enable_progress_bar=false",
              "callbacks.model_checkpoint.every_n_train_steps=3", "callbacks.sample_logging.prompts=[bikes]",
              "callbacks.sample_logging.num_frames=5", "callbacks.sample_logging.height=32",
              "callbacks.sample_logging.width=32", "callbacks.sample_logging.steps=2")
    assert out.returncode == 0, out.stderr[-3000:]
    return tmp / "run"


def test_checkpoint_describes_itself(trained, tiny_vae_dir):
    ckpt = load_checkpoint(trained / "checkpoints" / "last.ckpt")  # weights_only=True
    meta = ckpt["vidgen"]
    assert meta["task"] == meta["kind"] == "dit" and ckpt["global_step"] == 3 and meta["format"] == 2
    assert meta["parts"]["dit"]["class"] == "vidgen.models.dit.DiT"
    assert meta["parts"]["dit"]["config"]["in_channels"] == 4  # wired to the VAE export's latent channels
    assert meta["meta"]["conditioner"] == {"text": {"class": "vidgen.conditioning.text.TextCondition", "dropout": 0.1}}
    vae = meta["meta"]["vae"]
    assert vae["path"] == str(tiny_vae_dir.resolve()) and vae["fingerprint"] == fingerprint_folder(tiny_vae_dir)
    assert not any(k.startswith("vae") for k in ckpt["state_dict"])
    assert "EMA" in ckpt["callbacks"]
    metrics = (trained / "csv" / "metrics.csv").read_text()
    assert "val/loss_t0.5" in metrics and "train/loss" in metrics
    # the sample-logging callback ran at the end of training
    assert sorted(p.name for p in (trained / "samples" / "step_0000003").iterdir()) == [
        "00_bikes_s0.mp4", "00_bikes_s0.png", "00_bikes_s1.mp4", "00_bikes_s1.png"]  # 2 seeds per prompt
    assert "eval/diversity" in metrics and "eval/flicker" in metrics


def test_sample_py_writes_video_sheet_and_settings(trained, tmp_path):
    out = run("sample.py", f"ckpt={trained}/checkpoints/last.ckpt", "prompt=bikes", "num_frames=5", "height=32",
              "width=48", "steps=2", "seed=7", f"out_dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    (mp4,) = tmp_path.glob("*.mp4")
    frames, _ = read_video(mp4)
    assert frames.shape == (5, 32, 48, 3)
    assert mp4.with_suffix(".png").is_file()
    settings = json.loads(mp4.with_suffix(".json").read_text())
    assert settings["prompt"] == "bikes" and settings["seed"] == 7 and settings["steps"] == 2
    assert settings["ema_used"] is True and settings["sampler"] == "euler" and settings["latent_shape"] == [4, 2, 4, 6]
    assert str(tmp_path) in out.stdout


def test_export_samples_equal_checkpoint_samples(trained, tmp_path):
    ckpt = trained / "checkpoints" / "last.ckpt"
    folder = tmp_path / "export"
    assert export_main([str(ckpt), str(folder)]) == 0  # python -m vidgen.io.checkpoint CKPT OUT
    assert json.loads((folder / "vidgen.json").read_text())["kind"] == "dit"
    assert {p.name for p in folder.iterdir()} == {"vidgen.json", "dit", "cond.text", "vae"}
    a_parts, b_parts = read_parts(ckpt), read_parts(folder)  # the two forms read into equal parts
    assert a_parts.kind == b_parts.kind and a_parts.parts.keys() == b_parts.parts.keys()
    for name, part in a_parts.parts.items():
        other = b_parts.parts[name]
        assert part.cls == other.cls and part.config == other.config
        assert part.state.keys() == other.state.keys() and all(torch.equal(part.state[k], other.state[k])
                                                                for k in part.state)
    kwargs = dict(prompts=["bikes", "bunny"], num_frames=5, height=32, width=32, steps=3, guidance=3.0, seed=11)
    a = DiTPipeline.from_pretrained(ckpt, device="cpu")(**kwargs)
    b = DiTPipeline.from_pretrained(folder, device="cpu")(**kwargs)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.video, b.video)
    raw = DiTPipeline.from_pretrained(ckpt, ema=False, device="cpu")(**kwargs)
    assert not torch.equal(raw.latents, a.latents)  # EMA weights are what both sampled


def test_image_to_video_holds_frame_zero(trained):
    pipe = DiTPipeline.from_pretrained(trained / "checkpoints" / "last.ckpt", device="cpu")
    image = np.random.default_rng(0).integers(0, 256, (1, 40, 40, 3), dtype=np.uint8)
    out = pipe(["bikes"], num_frames=9, height=32, width=32, steps=2, image=image)
    assert out.settings["num_clean_latent_frames"] == 1
    assert torch.equal(out.latents[:, :, :1], pipe.encode_frames(image, 32, 32))
    clip = np.random.default_rng(1).integers(0, 256, (9, 40, 48, 3), dtype=np.uint8)
    ext = pipe(["bikes"], num_frames=9, height=32, width=32, steps=2, video=clip, video_frames=5)
    assert torch.equal(ext.latents[:, :, :2], pipe.encode_frames(clip[:5], 32, 32))
    default = pipe(["bikes"], num_frames=9, height=32, width=32, steps=2, video=clip)  # all but 1 latent frame
    assert default.settings["conditioning"] == {"source_frames": 9, "source_size": [40, 48], "held_frames": 5,
                                                "resized_to": [32, 38], "centre_crop_to": [32, 32]}


def test_wrong_kind_checkpoint_is_one_line_and_exit_1(tmp_path):
    vae_ckpt = tmp_path / "vae.ckpt"
    torch.save({"vidgen": {"task": "vae", "config": {}}, "state_dict": {}}, vae_ckpt)
    out = run("sample.py", f"ckpt={vae_ckpt}", "prompt=x", f"out_dir={tmp_path}")
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    expected = f"error: ckpt={vae_ckpt}: a 'vae' checkpoint, expected a 'dit' checkpoint or export folder"
    assert out.returncode == 2 and lines == [expected], out.stderr


def test_bad_settings_and_missing_inputs_are_sampling_errors(trained, tmp_path):
    """What sample.py's main turns into one `error: ...` line and exit 2 (checked above for a wrong-kind ckpt)."""
    from sample import run as sample_run

    base = OmegaConf.load(ROOT / "configs" / "sample.yaml")
    base.out_dir = str(tmp_path)
    for key, value, needle in [("ckpt", str(tmp_path / "nope.ckpt"), "no such checkpoint"),
                               ("prompts_file", str(tmp_path / "nope.txt"), "prompts_file="),
                               ("image", str(tmp_path / "nope.png"), "image="),
                               ("num_frames", 6, "num_frames=6: .* 1 \\+ 4k frames"),
                               ("height", 40, "height=40, width=.*multiples of 16"),
                               ("sampler", "ddim", "sampler=ddim"), ("guidance", -5, "guidance=-5"),
                               ("steps", 0, "steps=0")]:
        cfg = base.copy()
        cfg.ckpt = str(trained / "checkpoints" / "last.ckpt")
        cfg.prompt = None if key == "prompts_file" else "x"
        cfg.merge_with({"num_frames": 5, "height": 32, "width": 32, "steps": 1, key: value})
        with pytest.raises(ValueError, match=needle):
            sample_run(cfg)


def test_prompts_file_jsonl_with_seeds(trained, tmp_path):
    from sample import run as sample_run

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "bikes", "seed": 5, "name": "a"}\n{"prompt": "bunny"}\n')
    cfg = OmegaConf.load(ROOT / "configs" / "sample.yaml")
    cfg.merge_with({"ckpt": str(trained / "checkpoints" / "last.ckpt"), "prompts_file": str(prompts),
                    "num_frames": 1, "height": 32, "width": 32, "steps": 1, "batch_size": 2,
                    "out_dir": str(tmp_path / "out")})
    written = sample_run(cfg)
    assert written[0].name == "a.mp4" and written[1].name.startswith("001_bunny_s1_")  # prompt, seed, settings hash
    assert json.loads(written[1].with_suffix(".json").read_text())["seed"] == 1  # seed + line index
    again = sample_run(cfg)  # the same settings again: new files, nothing overwritten
    assert [p.name for p in again] == ["a_2.mp4", written[1].stem + "_2.mp4"]
    cfg.merge_with({"prompts_file": None, "prompt": "bunny", "seed": 2, "batch_size": 1})
    other_seed = sample_run(cfg)[0]
    assert other_seed.name.startswith("000_bunny_s2_") and other_seed.name[-10:] == written[1].name[-10:]


@pytest.fixture(scope="module")
def trained_causal(tmp_path_factory, demo_shards, tiny_vae_dir) -> Path:
    """The tiny DiT trained causal (chunks of 1 latent frame, window 2 + sink 1) with Diffusion Forcing; exported."""
    tmp = tmp_path_factory.mktemp("causal_run")
    out = run("train.py", "experiment=quickstart_dit", f"paths.root_dir={tmp}", f"hydra.run.dir={tmp}/run",
              f"data.train_shards={demo_shards}", "data.buckets=[[9,32,32]]", f"task.module.vae_path={tiny_vae_dir}",
              "model.dit.dim=32", "model.dit.depth=1", "model.dit.num_heads=2", "model.dit.ffn_dim=64",
              "model.dit.freq_dim=32", "model.text.dim=32", "model.text.depth=1", "trainer.max_steps=2",
              "model.dit.attention=causal", "model.dit.window_chunks=2", "model.dit.sink_chunks=1",
              "task.module.flow.per_frame_t=true", "task.module.cond_prob=0.5", "trainer.limit_val_batches=0",
              "trainer.enable_progress_bar=false", "~callbacks.sample_logging", "logger=none")
    assert out.returncode == 0, out.stderr[-3000:]
    assert export_main([str(tmp / "run" / "checkpoints" / "last.ckpt"), str(tmp / "export")]) == 0
    return tmp / "export"


def test_stream_writes_a_long_video_with_a_prompt_switch(trained_causal, tmp_path):
    """sample.py mode=stream: 3 s at 8 fps (24 frames), the prompt switching at 1.5 s; mp4, sheet, settings."""
    meta = read_parts(trained_causal).parts["dit"].config
    assert (meta["attention"], meta["window_chunks"], meta["sink_chunks"]) == ("causal", 2, 1)  # recorded
    out = run("sample.py", f"ckpt={trained_causal}", "mode=stream", "seconds=3", "fps=8", "height=32", "width=32",
              "steps=2", "prompts=[{at: 0, prompt: bikes}, {at: 1.5, prompt: carphone}]", f"out_dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    (mp4,) = tmp_path.glob("*.mp4")
    frames, fps = read_video(mp4)
    assert frames.shape == (24, 32, 32, 3) and fps == 8
    settings = json.loads(mp4.with_suffix(".json").read_text())
    assert settings["frames"] == 24 and settings["prompts"][1] == {"at": 1.5, "prompt": "carphone"}
    assert settings["attention"]["attention"] == "causal" and mp4.with_suffix(".png").is_file()
    assert "frames/s" in out.stdout and not list(tmp_path.glob("*.partial"))


def test_stream_is_refused_for_a_bidirectional_dit_and_bad_schedules(trained, trained_causal, tmp_path):
    from sample import run as sample_run

    base = OmegaConf.load(ROOT / "configs" / "sample.yaml")
    base.merge_with({"out_dir": str(tmp_path), "mode": "stream", "seconds": 1, "fps": 8, "height": 32, "width": 32,
                     "steps": 1})
    for ckpt, extra, needle in [
            (trained / "checkpoints" / "last.ckpt", {"prompt": "x"}, "attention=full .* needs a causal DiT"),
            (trained_causal, {"prompts": [{"at": 1, "prompt": "x"}]}, "must start with a prompt at 0 s"),
            (trained_causal, {"prompts": [{"prompt": "x"}]}, "expected \\{at: SECONDS, prompt: TEXT\\}"),
            (trained_causal, {"prompt": "x", "strength": 0.5}, "strength= are window-mode settings")]:
        cfg = base.copy()
        cfg.merge_with({"ckpt": str(ckpt), **extra})
        with pytest.raises(ValueError, match=needle):
            sample_run(cfg)


def test_remix_through_sample_py(trained, demo_clips_dir, tmp_path):
    """video=clip strength=0: the clip's own latents come back (decoded); strength=1: text-to-video, same seed."""
    pipe = DiTPipeline.from_pretrained(trained / "checkpoints" / "last.ckpt", device="cpu")
    clip = read_video(demo_clips_dir / "bikes.mp4")[0][:9]
    same = pipe(["bikes"], 9, 32, 32, steps=3, seed=5, video=clip, strength=0.0)
    assert torch.equal(same.latents, pipe.encode_frames(clip, 32, 32)) and same.settings["remix_strength"] == 0.0
    new = pipe(["bikes"], 9, 32, 32, steps=3, seed=5, video=clip, strength=1.0)
    assert torch.equal(new.latents, pipe(["bikes"], 9, 32, 32, steps=3, seed=5).latents)
    out = run("sample.py", f"ckpt={trained}/checkpoints/last.ckpt", "prompt=carphone", f"video={demo_clips_dir}/bikes.mp4",
              "strength=0.6", "num_frames=9", "height=32", "width=32", "steps=4", f"out_dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    (mp4,) = tmp_path.glob("*.mp4")
    assert read_video(mp4)[0].shape == (9, 32, 32, 3)
    assert json.loads(mp4.with_suffix(".json").read_text())["remix_strength"] == 0.6
