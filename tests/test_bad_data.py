"""Bad data never hangs training: when no sample survives (every clip corrupt, too short for every bucket, a json
without fps/width/height, a non-UTF-8 caption, a tar that is not a tar) the loader stops by itself within seconds
with one line naming the shard folder, the drops by reason and the setting to change, resampled or not, with or
without DataLoader worker processes. A bad sample among good ones is a counted skip, never a crash."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from omegaconf import OmegaConf

from runs import ROOT, tiny_vae_overrides, train
from vidgen.data import ClipDataModule, DataStarvedError
from vidgen.data.latents import LatentDataModule
from vidgen.io.video import encode_video

FRAMES = 24  # at 30 fps: 12 frames at target_fps=15, enough for a 9-frame bucket
BUCKETS = [[9, 64, 64]]
META = {"caption": "a clip", "fps": 30.0, "num_frames": FRAMES, "width": 64, "height": 64}


def _frames(n: int = FRAMES, seed: int = 0) -> np.ndarray:
    """Smooth moving gradients (real H.264 content, cheap to encode) -> uint8 [n, 64, 64, 3]."""
    t, y, x = np.meshgrid(np.arange(n), np.arange(64), np.arange(64), indexing="ij")
    base = (x * 3 + y * 2 + t * 5 + seed * 40) % 256
    return np.stack([base, (base + 85) % 256, (base + 170) % 256], axis=-1).astype(np.uint8)


def _write(folder: Path, shards: list[list[dict]]) -> Path:
    """Shards of raw members ({"__key__", "mp4": bytes, "json": bytes}) + manifest.json."""
    folder.mkdir(parents=True)
    entries = []
    for i, samples in enumerate(shards):
        name = f"clips-{i:06d}.tar"
        with wds.TarWriter(str(folder / name)) as sink:
            for s in samples:
                sink.write(s)
        entries.append({"name": name, "num_samples": len(samples)})
    manifest = {"num_samples": sum(e["num_samples"] for e in entries), "shards": entries}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _sample(key: str, mp4: bytes, meta: dict | bytes) -> dict:
    return {"__key__": key, "mp4": mp4, "json": meta if isinstance(meta, bytes) else json.dumps(meta).encode()}


def _all(make) -> list[list[dict]]:
    """2 shards x 3 samples, each made by make(key)."""
    return [[make(f"s{i}k{j}") for j in range(3)] for i in range(2)]


@pytest.fixture(scope="module")
def good_mp4() -> bytes:
    return encode_video(_frames(), 30.0)


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory, good_mp4) -> dict[str, Path]:
    """One folder per way of having no usable sample (2 shards of 3 samples each)."""
    root = tmp_path_factory.mktemp("bad")
    short = encode_video(_frames(3), 30.0)
    latin1 = json.dumps({**META, "caption": "caf\u00e9 au lait"}, ensure_ascii=False).encode("latin-1")
    folders = {
        "corrupt": _write(root / "corrupt", _all(lambda k: _sample(k, b"\x00garbage" * 500, META))),
        "too_short": _write(root / "too_short", _all(lambda k: _sample(k, short, {**META, "num_frames": 3}))),
        "no_meta": _write(root / "no_meta", _all(lambda k: _sample(k, good_mp4, {"caption": "x", "num_frames": 24}))),
        "latin1": _write(root / "latin1", _all(lambda k: _sample(k, good_mp4, latin1))),
    }
    not_tar = root / "not_tar"
    not_tar.mkdir()
    for i in range(2):
        (not_tar / f"clips-{i:06d}.tar").write_bytes(b"this is not a tar archive\n" * 200)
    (not_tar / "manifest.json").write_text(json.dumps({"num_samples": 6, "shards": [
        {"name": f"clips-{i:06d}.tar", "num_samples": 3} for i in range(2)]}))
    folders["not_tar"] = not_tar
    return folders


# What each message must say: the reason with an example, and the setting to change.
EXPECTED = {
    "corrupt": [r"dropped corrupt \d+ \(e\.g\. s\dk\d: .*(decord|video)", r"point data\.train_shards at readable "
                r"shards \(re-make them with data_prep/make_shards\.py\)$"],
    "too_short": [r"dropped too_few_frames \d+ \(e\.g\. s\dk\d: 3 frame\(s\) at 30 fps", r"lower data\.target_fps "
                  r"\(or data\.frame_stride\) or add buckets with fewer frames to data\.buckets$"],
    "no_meta": [r"dropped corrupt \d+ \(e\.g\. s\dk\d: json lacks width/height\)", r"point data\.train_shards at "],
    "latin1": [r"dropped corrupt \d+ \(e\.g\. s\dk\d: json is not UTF-8", r"point data\.train_shards at "],
    "not_tar": [r": unreadable shards \d+ \(e\.g\. clips-00000\d\.tar: ReadError", r"point data\.train_shards at "],
}


def _drain(dm: ClipDataModule) -> float:
    """Iterate the train loader to its end -> seconds taken (the tests expect it to raise)."""
    dm.setup("fit")
    start = time.monotonic()
    for _ in dm.train_dataloader():
        pass
    return time.monotonic() - start


@pytest.mark.timeout(60)
@pytest.mark.parametrize("num_workers", [0, 1])
@pytest.mark.parametrize("resampled", [False, True])
@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_no_surviving_sample_stops_with_one_line(bad_shards, case, resampled, num_workers):
    folder = bad_shards[case]
    dm = ClipDataModule(folder, buckets=BUCKETS, batch_size=2, target_fps=15, num_workers=num_workers,
                        resampled=resampled, samples_per_epoch=10_000, shuffle_buffer=8, rank=0, world_size=1)
    start = time.monotonic()
    with pytest.raises(DataStarvedError) as err:
        _drain(dm)
    assert time.monotonic() - start < 30
    msg = str(err.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    assert msg.startswith(f"data.train_shards={folder}: no sample survived "), msg
    if resampled:
        assert re.search(r"survived \d+ resampled shard draw\(s\) in worker 0, covering all 2 shard\(s\): ", msg), msg
    else:
        assert "survived a whole train pass over 2 shard(s): " in msg, msg
    for pattern in EXPECTED[case]:
        assert re.search(pattern, msg), (pattern, msg)


@pytest.mark.timeout(60)
def test_empty_shards_stop_too(tmp_path):
    folder = _write(tmp_path / "empty", [[], []])
    for resampled in (False, True):
        dm = ClipDataModule(folder, buckets=BUCKETS, resampled=resampled, samples_per_epoch=100, rank=0, world_size=1)
        with pytest.raises(DataStarvedError, match=r"no sample survived .*: the shards hold no samples; point "
                                                   r"data\.train_shards at shards that hold samples$"):
            _drain(dm)


@pytest.mark.timeout(60)
def test_drop_last_with_too_few_samples_names_the_setting(tmp_path, good_mp4):
    folder = _write(tmp_path / "one", [[_sample("only", good_mp4, META)]])
    dm = ClipDataModule(folder, buckets=BUCKETS, batch_size=2, target_fps=15, drop_last=True, rank=0, world_size=1)
    with pytest.raises(DataStarvedError, match=r"no batch formed in a whole train pass over 1 shard\(s\): 1 "
                                               r"sample\(s\) survived but none made a full batch; set "
                                               r"data\.drop_last=false or lower data\.batch_size$"):
        _drain(dm)


@pytest.mark.timeout(60)
def test_resampled_gives_up_after_max_empty_draws(tmp_path):
    """Many shards, all bad: the stream stops after data.max_empty_draws draws and names that setting (null: once
    every shard has been drawn)."""
    folder = _write(tmp_path / "many", [[_sample(f"s{i}", b"\x00bad" * 100, META)] for i in range(40)])
    dm = ClipDataModule(folder, buckets=BUCKETS, target_fps=15, resampled=True, samples_per_epoch=100,
                        shuffle_buffer=0, max_empty_draws=3, rank=0, world_size=1)
    with pytest.raises(DataStarvedError) as err:
        _drain(dm)
    msg = str(err.value)
    assert re.search(r"survived 3 resampled shard draw\(s\) in worker 0, covering [1-3] of 40 shard\(s\)", msg), msg
    assert msg.endswith("(or raise data.max_empty_draws if most shards are expected to yield nothing)"), msg
    dm = ClipDataModule(folder, buckets=BUCKETS, target_fps=15, resampled=True, samples_per_epoch=100,
                        shuffle_buffer=0, max_empty_draws=None, rank=0, world_size=1)  # no limit: every shard once
    with pytest.raises(DataStarvedError, match=r"in worker 0, covering all 40 shard\(s\): dropped corrupt "):
        _drain(dm)


@pytest.mark.timeout(120)
def test_resampled_with_some_good_shards_never_starves(tmp_path, good_mp4):
    """2 of 3 shards all corrupt, one with good clips: every epoch fills, nothing raises."""
    folder = _write(tmp_path / "mixed", [[_sample(f"bad{i}{j}", b"\x00bad" * 100, META) for j in range(3)]
                                         for i in range(2)] + [[_sample("good0", good_mp4, META),
                                                                _sample("good1", good_mp4, META)]])
    dm = ClipDataModule(folder, buckets=BUCKETS, batch_size=1, target_fps=15, resampled=True, samples_per_epoch=4,
                        shuffle_buffer=4, max_empty_draws=50, num_workers=1, rank=0, world_size=1)
    dm.setup("fit")
    loader = dm.train_dataloader()
    for _ in range(3):
        keys = [k for b in loader for k in b["key"]]
        assert len(keys) == 4 and set(keys) <= {"good0", "good1"}
    assert dm.data_stats()["data/skipped_corrupt"] > 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("num_workers", [0, 1])
def test_bad_json_among_good_samples_is_a_counted_skip(tmp_path, good_mp4, num_workers):
    latin1 = json.dumps({**META, "caption": "\u00e9t\u00e9"}, ensure_ascii=False).encode("latin-1")
    folder = _write(tmp_path / "some_bad", [
        [_sample("good0", good_mp4, META), _sample("latin1", good_mp4, latin1),
         _sample("no_meta", good_mp4, {"caption": "x", "num_frames": FRAMES}),
         _sample("fps_text", good_mp4, {**META, "fps": "thirty"}), _sample("good1", good_mp4, META)]])
    dm = ClipDataModule(folder, buckets=BUCKETS, batch_size=1, target_fps=15, num_workers=num_workers,
                        rank=0, world_size=1)
    dm.setup("fit")
    keys = sorted(k for b in dm.train_dataloader() for k in b["key"])
    assert keys == ["good0", "good1"]
    assert dm.data_stats()["data/skipped_corrupt"] == 3


@pytest.mark.timeout(60)
@pytest.mark.parametrize("resampled", [False, True])
def test_corrupt_latent_shards_stop_with_one_line(tmp_path, resampled):
    folder = tmp_path / "latents"
    folder.mkdir()
    for i in range(2):
        with wds.TarWriter(str(folder / f"latents-r00-{i:06d}.tar")) as sink:
            for j in range(2):
                sink.write({"__key__": f"k{i}{j}", "latent.safetensors": b"not safetensors",
                            "json": json.dumps({"caption": "x", "bucket": [9, 32, 32]}).encode()})
    (folder / "manifest.json").write_text(json.dumps({
        "vae": {"fingerprint": "0" * 64}, "num_samples": 4, "options": {"buckets": [[9, 32, 32]]},
        "shards": [{"name": f"latents-r00-{i:06d}.tar", "num_samples": 2} for i in range(2)]}))
    dm = LatentDataModule(str(folder), check_fingerprint=False, batch_size=2, resampled=resampled, rank=0,
                          world_size=1, num_workers=1)
    dm.setup("fit")
    with pytest.raises(DataStarvedError) as err:
        list(dm.train_dataloader())
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"data.shards={folder}: no sample survived "), msg
    assert re.search(r"dropped corrupt \d+ \(e\.g\. k\d\d: ", msg) and msg.endswith(
        "point data.shards at readable latent shards (re-make them with data_prep/encode_latents.py)"), msg


@pytest.mark.timeout(120)
@pytest.mark.parametrize("resampled", [False, True])
def test_train_py_stops_with_the_one_line(bad_shards, tmp_path, resampled):
    """Through train.py (Lightning, one DataLoader worker process): exit code 2, one error line, no traceback."""
    folder = bad_shards["corrupt"]
    overrides = [*tiny_vae_overrides(folder), "data.val_split=null", "data.buckets=[[9,64,64]]",
                 "data.num_workers=1", f"data.resampled={str(resampled).lower()}", "trainer.max_steps=2"]
    start = time.monotonic()
    out = train(overrides, tmp_path, timeout=100, check=False)
    assert time.monotonic() - start < 90
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert out.returncode == 2 and len(errors) == 1, out.stderr[-3000:]
    assert errors[0].startswith(f"error: data.train_shards={folder}: no sample survived ") and "corrupt" in errors[0]
    assert "Traceback" not in out.stderr + out.stdout, out.stderr[-3000:]


# ---- data_prep/inspect_data.py -----------------------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", ["corrupt", "not_tar", "latin1"])
def test_inspect_decodes_and_reports_nothing_survives(bad_shards, case, capsys):
    """json says every clip is fine; decoding says none is: the table shows it and one error line ends it."""
    from rich.console import Console

    from data_prep.inspect_data import inspect

    folder = bad_shards[case]
    cfg = OmegaConf.create({"_target_": "vidgen.data.ClipDataModule", "train_shards": str(folder),
                            "buckets": BUCKETS, "batch_size": 2, "target_fps": 15, "resampled": True,
                            "samples_per_epoch": 100})
    assert inspect(cfg, Console(width=200), decode=8) == 1
    out, err = capsys.readouterr()
    kept = re.search(r"kept by json\s*│\s*(\d+)", out)
    assert kept and int(kept.group(1)) == (6 if case == "corrupt" else 0), out
    if case != "not_tar":
        assert re.search(r"kept after decoding\s*│\s*~0\s*│\s*0\.0%", out), out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"inspect_data: error: data.train_shards={folder}: no sample "
                                                   "survived the "), err
    assert "Traceback" not in out + err


@pytest.mark.timeout(60)
def test_inspect_cli_ends_with_its_table_not_a_traceback(bad_shards):
    import subprocess
    import sys

    folder = bad_shards["corrupt"]
    out = subprocess.run([sys.executable, "data_prep/inspect_data.py", "data=demo", f"data.train_shards={folder}",
                          "data.val_split=null", "data.buckets=[[9,64,64]]", "--decode", "4"],
                         cwd=ROOT, capture_output=True, text=True, timeout=50)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "kept after decoding" in out.stdout and "Traceback" not in out.stdout + out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(f"inspect_data: error: data.train_shards={folder}: ")
