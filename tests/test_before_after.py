"""Style fine-tune tooling: styled shards (the look measurably there), prior-preservation shards the loader reads,
and the before/after comparison (a checkpoint against its own export: no drift, no style shift)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from data_prep.prior_shards import main as prior_main
from data_prep.style_shards import main as style_main, read_samples
from test_sample import tiny_vae_dir, trained  # noqa: F401  (module fixtures: a tiny DiT trained 3 steps)
from vidgen.data import ClipDataModule
from vidgen.errors import one_line_errors
from vidgen.eval import before_after
from vidgen.eval.before_after import main as before_after_main, style_score
from vidgen.io.checkpoint import read_parts, write_export
from vidgen.io.video import read_video

SIZE = ["--num-frames", "5", "--height", "32", "--width", "32", "--steps", "2", "--guidance", "2", "--device", "cpu"]
PROMPTS = ["bikes on a street", "a rabbit in a meadow"]


@pytest.fixture(scope="module")
def style_dir(tmp_path_factory, demo_shards) -> Path:
    out = tmp_path_factory.mktemp("style") / "shards"
    assert style_main(["--input", str(demo_shards), "--output", str(out), "--style", "warm"]) == 0
    return out


@pytest.fixture()
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def test_style_shards_shift_the_style_score(style_dir, demo_shards):
    src, out = (json.loads((d / "manifest.json").read_text()) for d in (demo_shards, style_dir))
    assert out["num_samples"] == src["num_samples"] > 0 and out["shards"] == src["shards"]
    assert out["style"]["style_score_after"] - out["style"]["style_score_before"] > 40
    name = src["shards"][0]["name"]
    originals = dict(read_samples(demo_shards / name))
    for key, members in read_samples(style_dir / name):  # decode the re-encoded H.264 back
        before, _ = read_video(originals[key]["mp4"])
        after, _ = read_video(members["mp4"])
        assert after.shape == before.shape
        assert style_score(after) - style_score(before) > 40, key
        meta, old = json.loads(members["json"]), json.loads(originals[key]["json"])
        assert meta == {**old, "style": "warm"}  # the caption is kept; the trigger comes at training time


def test_prior_shards_are_read_by_the_datamodule(trained, prompts_file, tmp_path):  # noqa: F811
    out = tmp_path / "prior"
    assert prior_main(["--ckpt", str(trained / "checkpoints" / "last.ckpt"), "--prompts", str(prompts_file),
                       "--seeds", "0,1", "--output", str(out), "--shard-size", "3", *SIZE]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 4 and [s["num_samples"] for s in manifest["shards"]] == [3, 1]
    assert manifest["histogram"]["resolution"] == {"32x32": 4}
    dm = ClipDataModule(str(out), buckets=[[5, 32, 32]], batch_size=2, rank=0, world_size=1, log_stats=False,
                        shuffle_buffer=0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert tuple(batch["video"].shape) == (2, 3, 5, 32, 32) and set(batch["caption"]) <= set(PROMPTS)


def test_before_after_of_a_checkpoint_and_its_export(trained, style_dir, prompts_file, tmp_path):  # noqa: F811
    ckpt = trained / "checkpoints" / "last.ckpt"
    export = write_export(read_parts(ckpt), tmp_path / "export")
    out = tmp_path / "ba"
    assert before_after_main(["--base", str(ckpt), "--tuned", str(export), "--prompts", str(prompts_file),
                              "--trigger", "sks", "--seeds", "0,1", "--out", str(out), "--style-shards",
                              str(style_dir), "--style-clips", "4", *SIZE]) == 0
    settings = json.loads((out / "settings.json").read_text())
    assert settings["prior_drift"] == 0.0 and settings["toward_style"] == 0.0  # same weights, same seeds
    assert settings["style_leak"] == 0.0
    assert settings["style_reference"]["clips"] == 4 and settings["style_reference"]["minus_base"] != 0
    assert settings["seeds"] == [0, 1] and settings["trigger"] == "sks" and settings["steps"] == 2
    assert settings["videos"]["000_with_s0"]["prompt"] == "sks bikes on a street"  # as data.trigger prepends it
    assert settings["videos"]["001_without_s1"]["prompt"] == "a rabbit in a meadow"
    for label in ("base", "tuned"):
        assert len(list((out / label).glob("*.mp4"))) == len(PROMPTS) * 2 * 2  # prompts x {with, without} x seeds
    frames, _ = read_video(out / "tuned" / "000_with_s0.mp4")
    assert frames.shape == (5, 32, 32, 3)
    k, cols, rows = before_after.GRID_FRAMES, 2 * 2, len(PROMPTS) * 2
    cell = k * 32 + (k - 1) * before_after.GAP + before_after.PAD
    expected = (before_after.LABEL_WIDTH + cols * cell, before_after.HEADER_HEIGHT + rows * (32 + before_after.PAD))
    assert Image.open(out / "grid.png").size == expected


def test_a_bad_setting_is_one_line(prompts_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        one_line_errors(before_after_main)(["--base", str(tmp_path), "--tuned", str(tmp_path), "--prompts",
                                            str(prompts_file), "--seeds", "0,x", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err == "error: --seeds=0,x: expected comma-separated integers like 0,1"
