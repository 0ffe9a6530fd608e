"""data_prep/make_shards.py on real files: shard contents vs decoded video, scene splits, filters,
captions, determinism across runs and worker counts, and resume after a real SIGKILL."""

from __future__ import annotations

import io
import json
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from data_prep.make_shards import build_shards, clip_key, segment_frames
from vidgen.data.scan import load_caption_manifest
from vidgen.io.video import write_video

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "data_prep" / "make_shards.py"
# The same options as the `demo_shards` fixture (tests/conftest.py), spelled for the CLI.
DEMO_ARGS = ["--max-side", "128", "--min-frames", "17", "--max-frames", "33", "--shard-size", "4",
             "--workers", "1", "--seed", "0", "--no-progress"]
FIELDS = {"caption", "fps", "num_frames", "width", "height", "source", "start", "end", "motion", "has_audio"}
AUDIO_FIELDS = {"audio_rate", "audio_channels", "audio_samples", "audio_offset", "audio_pad_start", "audio_pad_end",
                "audio_source"}  # when has_audio (tests/test_audio_data.py checks the audio itself)


def read_shards(folder: Path) -> dict[str, list[tuple[str, dict, bytes]]]:
    """{shard name: [(key, json meta, mp4 bytes), ...]} in tar order, for every clips-*.tar in `folder`."""
    out = {}
    for shard in sorted(folder.glob("clips-*.tar")):
        files: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                files.setdefault(key, {})[ext] = tar.extractfile(m).read()
        out[shard.name] = [(k, json.loads(v["json"]), v["mp4"]) for k, v in files.items()]
    return out


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("clips-*.tar"))}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_manifest_tars_and_decoded_metadata_agree(demo_shards):
    import decord

    manifest = json.loads((demo_shards / "manifest.json").read_text())
    shards = read_shards(demo_shards)
    assert [s["name"] for s in manifest["shards"]] == list(shards)
    assert [s["num_samples"] for s in manifest["shards"]] == [len(v) for v in shards.values()]
    samples = [s for v in shards.values() for s in v]
    assert manifest["num_samples"] == len(samples) == sum(manifest["histogram"]["resolution"].values()) > 0
    assert set(manifest["dropped"]) == {"too_short", "too_small", "static", "unreadable"}
    assert manifest["sources"] == 3 and manifest["no_caption"] == 0
    assert manifest["options"]["max_side"] == 128 and manifest["options"]["max_frames"] == 33
    for key, meta, mp4 in samples:
        assert re.fullmatch(r"[A-Za-z0-9_]+", key), key
        assert set(meta) == FIELDS | (AUDIO_FIELDS if meta["has_audio"] else set())
        assert meta["has_audio"] == (meta["source"] == "bigbuckbunny.mp4")  # the one demo clip with a soundtrack
        assert meta["source"] in {"bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4"}
        assert meta["caption"] and meta["motion"] >= 0.5
        assert 17 <= meta["num_frames"] <= 33
        assert max(meta["width"], meta["height"]) == 128 and meta["width"] % 2 == meta["height"] % 2 == 0
        vr = decord.VideoReader(io.BytesIO(mp4))
        assert len(vr) == meta["num_frames"]
        assert vr[0].shape == (meta["height"], meta["width"], 3)
        assert vr.get_avg_fps() == pytest.approx(meta["fps"], rel=1e-3)
        assert meta["end"] - meta["start"] == pytest.approx(meta["num_frames"] / meta["fps"], abs=1e-3)


def test_bikes_is_split_at_scene_cuts(demo_shards):
    clips = sorted((m for v in read_shards(demo_shards).values() for _, m, _ in v if m["source"] == "bikes.mp4"),
                   key=lambda m: m["start"])
    assert len(clips) >= 4
    starts = [round(m["start"] * m["fps"]) for m in clips]
    ends = [round(m["end"] * m["fps"]) for m in clips]
    assert all(e <= s for e, s in zip(ends, starts[1:]))  # consecutive, never overlapping
    # Fixed 33-frame chunking alone would start every clip at a multiple of 33: cuts moved some.
    assert any(s % 33 for s in starts)


def test_workers_do_not_change_the_shards(demo_input, demo_shards, tmp_path):
    manifest = build_shards(demo_input, tmp_path, max_side=128, min_frames=17, max_frames=33, shard_size=4,
                            workers=2, seed=0, progress=False)
    assert shard_bytes(tmp_path) == shard_bytes(demo_shards)  # byte-identical, same order
    clean = json.loads((demo_shards / "manifest.json").read_text())
    assert {**manifest, "options": None} == {**clean, "options": None}


def test_resume_after_sigkill_equals_a_clean_run(demo_input, demo_shards, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--input", str(demo_input), "--output", str(out),
                             *DEMO_ARGS], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list(out.glob(".work/*/*.tar")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert 1 <= len(list(out.glob(".work/*/*.tar"))) < 3 and not (out / "manifest.json").exists()

    result = run_cli("--input", str(demo_input), "--output", str(out), *DEMO_ARGS)
    assert result.returncode == 0, result.stderr
    clean = json.loads((demo_shards / "manifest.json").read_text())
    assert f"{clean['num_samples']} samples in {len(clean['shards'])} shards" in result.stdout
    assert shard_bytes(out) == shard_bytes(demo_shards)
    keys = [k for v in read_shards(out).values() for k, _, _ in v]
    assert len(keys) == len(set(keys))

    # A kill during packing leaves a temp tar, a missing shard and no manifest; stale shards of an
    # earlier, larger run must not survive either.
    (out / "manifest.json").unlink()
    (out / "clips-000001.tar").unlink()
    (out / ".clips-000002.tar.abc123.tmp").write_bytes(b"partial")
    (out / "clips-000099.tar").write_bytes(b"stale")
    build_shards(demo_input, out, max_side=128, min_frames=17, max_frames=33, shard_size=4, workers=1, seed=0,
                 progress=False)
    assert shard_bytes(out) == shard_bytes(demo_shards)
    assert not list(out.glob(".clips-*"))


def _moving(t: int, h: int, w: int) -> np.ndarray:
    """A smooth horizontal sawtooth drifting 2 px per frame -> uint8 [t, h, w, 3] (motion, no scene cut)."""
    x = (np.arange(w)[None, :] + 2 * np.arange(t)[:, None]) % 64 * 4  # [t, w]
    return np.repeat(np.repeat(x[:, None, :, None], h, 1), 3, 3).astype(np.uint8)


def test_bad_files_images_and_captions(tmp_path):
    from PIL import Image

    import decord

    src = tmp_path / "in"
    (src / "clips").mkdir(parents=True)
    write_video(src / "clips" / "moving.mp4", _moving(24, 64, 96), fps=24)
    (src / "clips" / "moving.txt").write_text("a drifting stripe pattern\n")
    write_video(src / "still.mp4", np.full((24, 64, 96, 3), 120, np.uint8), fps=24)
    (src / "still.txt").write_text("a grey wall")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(src / "photo.png")
    (src / "photo.json").write_text(json.dumps({"caption": "a noisy photo", "source": "camera"}))
    Image.fromarray(rng.integers(0, 255, (70, 100, 3), dtype=np.uint8)).save(src / "from_csv.jpg")
    Image.fromarray(rng.integers(0, 255, (50, 50, 3), dtype=np.uint8)).save(src / "nocap.png")
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(src / "tiny.png")
    (src / "x.mp4").write_bytes(rng.integers(0, 255, 4096, dtype=np.uint8).tobytes())
    (src / "empty.mp4").write_bytes(b"")
    captions = tmp_path / "captions.csv"
    captions.write_text('file,caption\nfrom_csv.jpg,"a jpeg, from the csv"\n')

    manifest = build_shards(src, tmp_path / "out", max_side=64, min_side=32, min_frames=8, max_frames=16,
                            shard_size=3, workers=1, progress=False, captions=captions)
    assert manifest["dropped"] == {"too_short": 0, "too_small": 1, "static": 2, "unreadable": 2}
    assert sorted(e["source"] for e in manifest["unreadable_sources"]) == ["empty.mp4", "x.mp4"]
    assert manifest["no_caption"] == 1 and manifest["sources"] == 8
    samples = [s for v in read_shards(tmp_path / "out").values() for s in v]
    assert len(samples) == manifest["num_samples"] == 5
    by_source: dict[str, list[dict]] = {}
    for _, meta, mp4 in samples:
        by_source.setdefault(meta["source"], []).append(meta)
        assert len(decord.VideoReader(io.BytesIO(mp4))) == meta["num_frames"]
    assert sorted(m["num_frames"] for m in by_source["clips/moving.mp4"]) == [8, 16]
    assert by_source["clips/moving.mp4"][0]["caption"] == "a drifting stripe pattern"
    assert by_source["photo.png"][0]["caption"] == "a noisy photo"
    assert by_source["from_csv.jpg"][0]["caption"] == "a jpeg, from the csv"
    assert by_source["nocap.png"][0]["caption"] == ""
    photo = by_source["photo.png"][0]
    assert (photo["num_frames"], photo["width"], photo["height"]) == (1, 64, 48)  # an image is a 1-frame clip
    assert manifest["histogram"]["duration"]["image"] == 3


def test_cli_errors_are_one_clear_line(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no media here")
    for folder, expected in [(tmp_path / "missing", "input folder not found"),
                             (tmp_path / "notes", "no videos or images")]:
        result = run_cli("--input", str(folder), "--output", str(tmp_path / "out"), "--no-progress")
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0] and "Traceback" not in result.stderr
    assert run_cli("--help").returncode == 0


def test_segments_keys_and_caption_manifests(tmp_path):
    segs = [(start, list(frames)) for start, frames in segment_frames(range(10), {4}, max_frames=3)]
    assert segs == [(0, [0, 1, 2]), (3, [3]), (4, [4, 5, 6]), (7, [7, 8, 9])]
    a, b = clip_key("a.b/c d.mp4", 3), clip_key("a_b/c_d.mp4", 3)
    assert re.fullmatch(r"[A-Za-z0-9_]+", a) and a != b and a == clip_key("a.b/c d.mp4", 3)
    jsonl = tmp_path / "caps.jsonl"
    jsonl.write_text('{"file": "./sub/a.mp4", "caption": "a cat"}\n\n{"file": "b.png", "caption": "a dog"}\n')
    assert load_caption_manifest(jsonl) == {"sub/a.mp4": "a cat", "b.png": "a dog"}
    jsonl.write_text('{"path": "a.mp4"}\n')
    with pytest.raises(ValueError, match="'file' and 'caption'"):
        load_caption_manifest(jsonl)
