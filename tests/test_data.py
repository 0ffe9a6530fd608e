"""The clip loader on real H.264 files: decoding backends, clip sampling, buckets, node/worker splits, corrupt skips."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from omegaconf import OmegaConf

from vidgen.data import (Bucket, BucketAssigner, ClipDataModule, DataConfigError, clip_indices, decode_frames,
                         frame_step, max_clip_frames, open_video)
from vidgen.data import decode as decode_mod
from vidgen.io.video import encode_video, read_video

ROOT = Path(__file__).resolve().parents[1]
BUCKETS = [[9, 64, 64], [9, 48, 112], [1, 64, 64]]


# ---- fixtures: small shards written here with TarWriter + real H.264 --------------------------------------------
def _write_shards(folder: Path, shards: list[list[dict]]) -> Path:
    """Each sample dict: {"key", "mp4": bytes | None, "json": dict | bytes | None}; writes tars + manifest.json."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, samples in enumerate(shards):
        name = f"clips-{i:06d}.tar"
        with wds.TarWriter(str(folder / name)) as sink:
            for s in samples:
                item = {"__key__": s["key"]}
                if s.get("mp4") is not None:
                    item["mp4"] = s["mp4"]
                if s.get("json") is not None:
                    item["json"] = s["json"] if isinstance(s["json"], bytes) else json.dumps(s["json"]).encode()
                sink.write(item)
        entries.append({"name": name, "num_samples": len(samples)})
    manifest = {"num_samples": sum(e["num_samples"] for e in entries), "shards": entries, "dropped": {}, "options": {}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _sample(key: str, frames: np.ndarray, fps: float, caption: str = "a clip") -> dict:
    t, h, w, _ = frames.shape
    meta = {"caption": caption, "fps": fps, "num_frames": t, "width": w, "height": h, "source": "test",
            "start": 0.0, "end": t / fps, "motion": 1.0}
    return {"key": key, "mp4": encode_video(frames, fps), "json": meta}


@pytest.fixture(scope="module")
def real_frames(demo_clips_dir) -> np.ndarray:
    """carphone (176x144, 29.97 fps): real content, cheap to decode -> uint8 [120, 144, 176, 3]."""
    frames, _ = read_video(demo_clips_dir / "carphone_pristine.mp4")
    return frames


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory, real_frames) -> Path:
    """4 shards: wide / square videos, 1-frame images, and one sample each that is too short / too small."""
    f = real_frames
    wide, square = f[:25, 36:108, 24:152], f[:25, 8:136, 24:152]  # 72x128 and 128x128
    shards = [
        [_sample("wide0", wide, 30.0), _sample("square0", square, 30.0), _sample("img0", f[:1, :96, :96], 1.0)],
        [_sample("wide1", wide[3:], 25.0), _sample("img1", f[5:6, 8:136, 24:152], 1.0),
         _sample("short", square[:5], 30.0)],
        [_sample("square1", square[2:], 30.0), _sample("tiny", f[:20, :32, :32], 30.0)],
        [_sample("wide2", f[30:55, 36:108, 24:152], 30.0), _sample("img2", f[9:10, :64, :96], 1.0)],
    ]
    return _write_shards(tmp_path_factory.mktemp("mixed"), shards)


@pytest.fixture(scope="module")
def corrupt_shards(tmp_path_factory, real_frames) -> Path:
    """3 good samples among garbage mp4 bytes, bad json, a missing mp4 member, and a tar cut inside a member."""
    sq = real_frames[:20, 8:136, 24:152]
    good = _sample("good0", sq, 30.0)
    shards = [
        [good, {**_sample("garbage", sq, 30.0), "mp4": b"\x00garbage" * 500}],
        [{**_sample("badjson", sq, 30.0), "json": b"{not json"}, {"key": "nomp4", "json": good["json"]},
         _sample("good1", sq[1:], 30.0)],
        [_sample("good2", sq[2:], 30.0), _sample("cut", real_frames[:40, 8:136, 24:152], 30.0)],
    ]
    folder = _write_shards(tmp_path_factory.mktemp("corrupt"), shards)
    tar = folder / "clips-000002.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) - 8192])  # ends inside cut.mp4 (json is written first, then mp4)
    return folder


def _keys_in(folder: Path) -> list[str]:
    keys = set()
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as t:
            keys |= {m.name.split(".")[0] for m in t.getmembers()}
    return sorted(keys)


def _batches(dm: ClipDataModule, epochs: int = 1, val: bool = False) -> list[list[dict]]:
    dm.setup("fit")
    loader = dm.val_dataloader() if val else dm.train_dataloader()
    return [list(loader) for _ in range(epochs)]


# ---- decoding ----------------------------------------------------------------------------------------------------
def test_decord_and_pyav_agree_frame_for_frame(demo_shards):
    """Both backends return the same frames (any order, repeats) for real make_shards clips with B-frames."""
    samples = list(wds.WebDataset(str(demo_shards / "clips-{000000..000003}.tar"), shardshuffle=False))
    assert len(samples) >= 6
    rng = np.random.default_rng(0)
    for s in samples[:6]:
        n = open_video(s["mp4"], "pyav").num_frames
        assert n == json.loads(s["json"])["num_frames"] == open_video(s["mp4"], "decord").num_frames
        for idx in (list(range(n)), [int(i) for i in rng.integers(0, n, 7)]):
            a, b = decode_frames(s["mp4"], idx, "decord"), decode_frames(s["mp4"], idx, "pyav")
            assert a.dtype == b.dtype == np.uint8 and a.shape == b.shape == (len(idx), *a.shape[1:])
            assert np.abs(a.astype(int) - b).max() <= 1, s["__key__"]


def test_decoder_falls_back_to_pyav_without_decord(monkeypatch):
    monkeypatch.setattr(decode_mod, "_decord_importable", lambda: False)
    assert decode_mod.resolve_backend("decord") == "pyav"
    with pytest.raises(ValueError, match="decoder="):
        decode_mod.resolve_backend("opencv")


# ---- clip sampling -----------------------------------------------------------------------------------------------
def test_frame_steps_and_fillable_lengths():
    assert frame_step(30, 15) == 2.0 and frame_step(24, 30) == 1.0 and frame_step(30, None, 3) == 3.0
    assert clip_indices(17, 9, 2.0) == [0, 2, 4, 6, 8, 10, 12, 14, 16]
    assert clip_indices(20, 7, 25 / 15) == [4, 6, 7, 9, 11, 12, 14]  # nearest source frames, centred
    assert max_clip_frames(17, 2.0) == 9 and max_clip_frames(16, 2.0) == 8 and max_clip_frames(17, 25 / 15) == 10


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_target_fps_picks_the_nearest_source_frames(tmp_path, backend):
    """Source 30 fps, target 15 -> every 2nd frame; frame identity is read back from its grey level."""
    levels = 16 + 6 * np.arange(33)  # distinct flat grey per frame survives H.264 within +-2
    frames = np.broadcast_to(levels[:, None, None, None], (33, 64, 64, 3)).astype(np.uint8)
    folder = _write_shards(tmp_path / "fps", [[_sample("ramp", frames, 30.0)]])
    dm = ClipDataModule(folder, val_shards=folder, buckets=[[9, 64, 64]], batch_size=1, target_fps=15, decoder=backend)
    (batch,), = _batches(dm, val=True)  # validation: centred clip, deterministic
    got = ((batch["video"][0, 0, :, 32, 32] + 1) * 127.5).numpy()
    found = [int(np.abs(levels - g).argmin()) for g in got]
    assert found == clip_indices(33, 9, 2.0) == [8 + 2 * i for i in range(9)]
    assert batch["fps"].tolist() == [15.0]


# ---- buckets, shapes, drops --------------------------------------------------------------------------------------
def test_bucket_rule():
    a = BucketAssigner(BUCKETS, target_fps=15)
    assert a.assign(25, 30, 128, 72).bucket == Bucket(9, 48, 112)  # 16:9 is nearer 7:3 than 1:1
    assert a.assign(25, 30, 128, 128).bucket == Bucket(9, 64, 64)
    assert a.assign(1, 1, 96, 96).bucket == Bucket(1, 64, 64)  # images go to 1-frame buckets
    assert a.assign(5, 30, 128, 128) == "too_few_frames"  # 3 frames at 15 fps
    assert a.assign(25, 30, 32, 32) == "too_small"
    assert BucketAssigner([[9, 64, 64]]).assign(1, 1, 96, 96) == "no_bucket"
    longest = BucketAssigner([[9, 64, 64], [17, 64, 64]], target_fps=15)
    assert longest.assign(33, 30, 64, 64).bucket.frames == 17 and longest.assign(25, 30, 64, 64).bucket.frames == 9


def test_batches_hold_one_bucket_with_right_shape_dtype_range(mixed_shards):
    dm = ClipDataModule(mixed_shards, buckets=BUCKETS, batch_size=2, target_fps=15, shuffle_buffer=4)
    (batches,) = _batches(dm)
    seen = {}
    for b in batches:
        B, C, T, H, W = b["video"].shape
        assert [T, H, W] in BUCKETS and C == 3 and b["video"].dtype == torch.float32
        assert -1.0 <= b["video"].min() and b["video"].max() <= 1.0 and b["video"].std() > 0.05
        assert len(b["caption"]) == len(b["key"]) == B and b["fps"].shape == (B,) and b["fps"].dtype == torch.float32
        assert set(b) == {"video", "caption", "key", "fps"}
        seen.update({k: (T, H, W) for k in b["key"]})
    assert {k: v for k, v in seen.items()} == {
        "wide0": (9, 48, 112), "wide1": (9, 48, 112), "wide2": (9, 48, 112), "square0": (9, 64, 64),
        "square1": (9, 64, 64), "img0": (1, 64, 64), "img1": (1, 64, 64), "img2": (1, 64, 64)}
    stats = dm.data_stats()
    assert stats["data/dropped_too_few_frames"] == 1 and stats["data/dropped_too_small"] == 1
    assert stats["data/skipped_corrupt"] == 0


def test_same_seed_and_epoch_same_clips(mixed_shards):
    """Deterministic given (seed, epoch); a new epoch draws new clip starts / crops."""
    def run(seed):
        dm = ClipDataModule(mixed_shards, buckets=BUCKETS, batch_size=1, target_fps=15, seed=seed, shuffle_buffer=4)
        return [{k: b["video"] for b in ep for k in b["key"]} for ep in _batches(dm, epochs=2)]

    a, b = run(0), run(0)
    assert all(torch.equal(a[0][k], b[0][k]) for k in a[0]) and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
    assert any(not torch.equal(a[0][k], a[1][k]) for k in a[0] if a[0][k].shape[1] > 1)


# ---- distribution: every sample exactly once; resampled epoch length ---------------------------------------------
def test_two_nodes_two_workers_see_each_sample_once(demo_shards, monkeypatch):
    """2 simulated ranks x 2 DataLoader worker processes: the union of keys is every sample, no duplicates.

    Rank 0 is given explicitly; rank 1 comes from the RANK / WORLD_SIZE environment (what torchrun sets).
    """
    expected = _keys_in(demo_shards)
    for epoch in range(2):
        keys = []
        for rank in range(2):
            explicit = dict(rank=0, world_size=2) if rank == 0 else {}
            with monkeypatch.context() as env:
                if rank == 1:
                    env.setenv("RANK", "1")
                    env.setenv("WORLD_SIZE", "2")
                dm = ClipDataModule(demo_shards, buckets=BUCKETS, batch_size=2, target_fps=15, num_workers=2,
                                    shuffle_buffer=8, **explicit)
                dm.setup("fit")
                loader = dm.train_dataloader()
            assert loader.pipeline[0].num_workers == 2  # 4 shards = 2 ranks x 2 workers: nobody idles
            loader.set_epoch(epoch)
            keys += [k for b in loader for k in b["key"]]
        assert sorted(keys) == expected


def test_too_few_shards_for_ranks_is_a_clear_error(mixed_shards):
    dm = ClipDataModule(mixed_shards, buckets=BUCKETS, rank=4, world_size=5)
    dm.setup("fit")
    with pytest.raises(DataConfigError, match="rank 4 gets none"):
        dm.train_dataloader()


def test_resampled_mode_has_the_configured_epoch_length(demo_shards):
    manifest = json.loads((demo_shards / "manifest.json").read_text())
    dm = ClipDataModule(demo_shards, buckets=BUCKETS, batch_size=2, target_fps=15, resampled=True,
                        rank=1, world_size=2)
    dm.setup("fit")
    loader = dm.train_dataloader()
    expected = manifest["num_samples"] // (2 * 2)
    assert len(loader) == expected
    assert [len(list(loader)) for _ in range(2)] == [expected, expected]


# ---- bad input ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_samples_are_skipped_and_counted(corrupt_shards, num_workers):
    dm = ClipDataModule(corrupt_shards, buckets=[[9, 64, 64]], batch_size=1, target_fps=15, num_workers=num_workers)
    (batches,) = _batches(dm)
    assert sorted(k for b in batches for k in b["key"]) == ["good0", "good1", "good2"]
    stats = dm.data_stats()
    # garbage mp4, bad json, no mp4 member, and the sample the truncation cut short (json only)
    assert stats["data/skipped_corrupt"] == 4 and stats["data/tar_errors"] == 1


def test_missing_shard_folder_stops_setup_with_one_line(tmp_path):
    cfg = OmegaConf.create({"paths": {"data_dir": str(tmp_path)}, "seed": 0,
                            "data": OmegaConf.load(ROOT / "configs" / "data" / "demo.yaml")})
    from hydra.utils import instantiate

    dm = instantiate(cfg.data)
    assert isinstance(dm, ClipDataModule)
    with pytest.raises(DataConfigError) as err:
        dm.setup("fit")
    msg = str(err.value)
    assert "\n" not in msg and "data.train_shards" in msg and str(tmp_path / "demo_shards") in msg


def test_skip_counts_reach_the_logged_metrics(corrupt_shards):
    """Through a real Trainer: the data module attaches DataStatsCallback and `data/skipped_corrupt` is logged."""
    import lightning.pytorch as pl

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            return (batch["video"].mean() - self.w).pow(2)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = ClipDataModule(corrupt_shards, buckets=[[9, 64, 64]], batch_size=1, target_fps=15)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(Tiny(), datamodule=dm)
    assert trainer.callback_metrics["data/skipped_corrupt"] == 4


def test_inspect_counts_buckets_and_drops_from_metadata(mixed_shards, capsys):
    from data_prep.inspect_data import inspect
    from rich.console import Console

    from vidgen.data.report import scan_metadata

    assigner = BucketAssigner(BUCKETS, target_fps=15)
    report = scan_metadata(sorted(str(p) for p in mixed_shards.glob("*.tar")), assigner)
    assert {b.key: n for b, n in report.buckets.items()} == {"9x48x112": 3, "9x64x64": 2, "1x64x64": 3}
    assert dict(report.dropped) == {"too_few_frames": 1, "too_small": 1}
    cfg = OmegaConf.create({"_target_": "vidgen.data.ClipDataModule", "train_shards": str(mixed_shards),
                            "buckets": BUCKETS, "batch_size": 2, "target_fps": 15})
    assert inspect(cfg, Console(width=120)) == 0
    out = capsys.readouterr().out
    assert "9x48x112" in out and "first train batch" in out


def test_generic_clips_config_builds_a_resampled_loader(demo_shards):
    """configs/data/clips.yaml: `???` shards; given a folder it holds out 1 shard and sizes the epoch from manifests."""
    from hydra.utils import instantiate

    cfg = OmegaConf.create({"seed": 0, "data": OmegaConf.load(ROOT / "configs" / "data" / "clips.yaml")})
    assert OmegaConf.is_missing(cfg.data, "train_shards")
    cfg.data.train_shards = str(demo_shards)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    manifest = json.loads((demo_shards / "manifest.json").read_text())
    held_out = manifest["shards"][-1]["num_samples"]
    assert len(dm.val_set.urls) == 1
    assert len(dm.train_dataloader()) == (manifest["num_samples"] - held_out) // 8


def test_token_budget_batch_sizes():
    """batch x latent tokens stays within the budget for every bucket; small buckets get bigger batches."""
    from vidgen.data.buckets import batch_sizes_per_bucket, latent_tokens, parse_buckets

    buckets = {b.key: b for b in parse_buckets([[49, 320, 576], [17, 256, 256], [1, 256, 256]])}
    sizes = batch_sizes_per_bucket({"tokens": 32768, "max": 64}, buckets.values())
    assert latent_tokens(buckets["49x320x576"]) == 13 * 20 * 36
    # 32768 // 9360, 32768 // 1280, 32768 // 256 capped at 64
    assert [sizes[buckets[k]] for k in ("49x320x576", "17x256x256", "1x256x256")] == [3, 25, 64]
    assert all(sizes[b] * latent_tokens(b) <= 32768 for b in buckets.values())
    with pytest.raises(ValueError, match="token budget"):
        batch_sizes_per_bucket({"tokens": 100, "nope": 1}, buckets.values())
