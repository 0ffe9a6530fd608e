"""Audio from make_shards to the batch, on real files written with PyAV: each clip keeps its soundtrack (muxed AAC,
a lossless sidecar FLAC that wins over a muxed track, muxed FLAC that starts late and ends early), clips without
audio are kept and counted, and the loader's waveform is, to the sample, the source's audio over the sampled frames.

Every source frame j has the grey level 10 + 5 j, so the loader's first frame says which source frame it is; the
audio is a chirp with a click at every fourth frame's start, so timing is also checked against the signal itself.
Two more sources have video that starts 0.2 s after their audio, and video whose frames do not keep the time its
re-encoded clips claim (a 1 s gap): that one keeps its clips, without audio, counted as out of sync.
"""

from __future__ import annotations

import json
import math
import tarfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from data_prep.make_shards import build_shards, format_summary
from vidgen.data.audio import audio_fit_frames, audio_span, decode_flac
from vidgen.data.pipeline import ClipLoader, build_clip_dataset
from vidgen.data.sampling import clip_span

FPS, FRAMES, SIDE, RATE = 15, 48, 64, 24000
CLICK_EVERY = 4  # frames
LATE = (0.2, 2.9)  # seconds of the video the late source's audio covers
SHIFT = 3  # frames (0.2 s) by which shift.mp4's video starts after its audio
BUCKETS = [(9, SIDE, SIDE), (1, SIDE, SIDE)]
STRIDE = 2
DATA = dict(buckets=BUCKETS, batch_size=4, frame_stride=STRIDE, decoder="pyav", audio=True, audio_rate=RATE,
            audio_channels=1)


def _signal(sr: int, seconds: float, tone: bool = False) -> np.ndarray:
    """A quiet chirp with a click (0.9) at every fourth frame's start -> float32 [2, n] (both channels alike)."""
    t = np.arange(int(round(sr * seconds))) / sr
    x = 0.2 * np.sin(2 * np.pi * (440 if tone else 150 + 400 * t) * t)
    if not tone:
        x[(np.arange(0, int(seconds * FPS), CLICK_EVERY) * sr // FPS)] = 0.9
    return np.stack([x, x]).astype(np.float32)


def _write_video(path: Path, audio: tuple[str, int, np.ndarray, float] | None = None, pts=lambda j: j) -> None:
    """FRAMES grey frames at FPS, frame j at pts(j) / FPS seconds (+ an audio stream (codec, rate, float [2, n],
    start seconds)) -> mp4 file."""
    with av.open(str(path), "w", format="mp4") as c:
        video = c.add_stream("libx264", rate=FPS)
        video.width = video.height = SIDE
        video.pix_fmt = "yuv420p"
        if audio is not None:
            codec, sr, x, start = audio
            stream = c.add_stream(codec, rate=sr)
            stream.layout = "stereo"
            fmt = stream.codec_context.format
            if fmt.name.startswith("s16"):
                x = (x * 32767).round().astype(np.int16)
            for k in range(0, x.shape[1], 1024):
                chunk = x[:, k:k + 1024] if fmt.is_planar else np.ascontiguousarray(x[:, k:k + 1024].T).reshape(1, -1)
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format=fmt.name, layout="stereo")
                frame.sample_rate, frame.time_base, frame.pts = sr, Fraction(1, sr), k + round(start * sr)
                for packet in stream.encode(frame):
                    c.mux(packet)
            for packet in stream.encode(None):
                c.mux(packet)
        for j in range(FRAMES):
            frame = av.VideoFrame.from_ndarray(np.full((SIDE, SIDE, 3), 10 + 5 * j, np.uint8), format="rgb24")
            frame.pts, frame.time_base = pts(j), Fraction(1, FPS)
            for packet in video.encode(frame):
                c.mux(packet)
        for packet in video.encode(None):
            c.mux(packet)


def _write_flac(path: Path, sr: int, x: np.ndarray) -> None:
    with av.open(str(path), "w", format="flac") as c:
        stream = c.add_stream("flac", rate=sr)
        stream.layout, stream.format = "stereo", "s16"
        pcm = np.ascontiguousarray((x * 32767).round().astype(np.int16).T).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="stereo")
        frame.sample_rate, frame.pts = sr, 0
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            c.mux(packet)


def _reference(path: Path) -> tuple[np.ndarray, Fraction]:
    """The test's own decode: first audio stream -> PyAV resampler (s16, mono, RATE) -> (float32 [N], start s)."""
    resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
    out, start = [], None
    with av.open(str(path)) as c:
        for frame in c.decode(c.streams.audio[0]):
            start = frame.pts * frame.time_base if start is None else start
            out += [f.to_ndarray()[0] for f in resampler.resample(frame)]
    out += [f.to_ndarray()[0] for f in resampler.resample(None)]
    return np.concatenate(out).astype(np.float32) / 32768, start


def _video_start(path: Path) -> Fraction:
    """The first frame's presentation time (s)."""
    with av.open(str(path)) as c:
        frame = next(c.decode(video=0))
        return frame.pts * frame.time_base


def _nearest(x: Fraction) -> int:
    return math.floor(x + Fraction(1, 2))


def _offset(sources: Path, meta: dict, j: int, start: Fraction) -> int:
    """Where source frame j falls in the reference waveform starting at `start` (s on its file's clock): muxed audio
    shares the video's clock, a sidecar starts at the first frame."""
    video_start = _video_start(sources / meta["source"])
    zero = start + (video_start if meta["audio_source"] != meta["source"] else 0)
    return _nearest((video_start + Fraction(j, FPS) - zero) * RATE)


def _cut(wave: np.ndarray, offset: int, length: int) -> np.ndarray:
    """wave[offset: offset + length], zeros outside."""
    out = np.zeros(length, np.float32)
    lo, hi = max(0, offset), min(len(wave), offset + length)
    out[lo - offset:hi - offset] = wave[lo:hi]
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("audio_src")
    _write_video(src / "aac.mp4", ("aac", 48000, _signal(48000, FRAMES / FPS), 0.0))
    _write_video(src / "side.mp4", ("aac", 48000, _signal(48000, FRAMES / FPS, tone=True), 0.0))  # loses to side.flac
    _write_flac(src / "side.flac", 44100, _signal(44100, FRAMES / FPS))
    late = _signal(44100, FRAMES / FPS)[:, round(LATE[0] * 44100):round(LATE[1] * 44100)]
    _write_video(src / "late.mp4", ("flac", 44100, late, LATE[0]))
    _write_video(src / "shift.mp4", ("aac", 48000, _signal(48000, FRAMES / FPS + 0.2), 0.0), pts=lambda j: j + SHIFT)
    _write_video(src / "gap.mp4", ("aac", 48000, _signal(48000, 4.2), 0.0), pts=lambda j: j + (15 if j >= 24 else 0))
    _write_video(src / "mute.mp4")
    _write_video(src / "broken.mp4")
    (src / "broken.wav").write_bytes(b"RIFF not really a wave file" * 10)
    from PIL import Image

    Image.fromarray(np.full((SIDE, SIDE, 3), 90, np.uint8)).save(src / "photo.png")
    return src


@pytest.fixture(scope="module")
def shards(sources, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("audio_shards")
    build_shards(sources, out, max_side=SIDE, min_side=32, min_frames=17, max_frames=24, shard_size=4, workers=1,
                 progress=False, audio_rate=RATE, audio_channels=1)
    return out


def _samples(folder: Path) -> dict[str, dict]:
    """{key: {"json": dict, "flac": bytes?}} of every shard."""
    out: dict[str, dict] = {}
    for shard in sorted(folder.glob("clips-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                data = tar.extractfile(m).read()
                out.setdefault(key, {})[ext] = json.loads(data) if ext == "json" else data
    return out


def test_make_shards_keeps_audio(shards, sources):
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["num_samples"] == 15  # 7 videos x 2 clips + the photo
    audio = manifest["audio"]
    assert (audio["with_audio"], audio["without_audio"], audio["unreadable"], audio["out_of_sync"]) == (8, 7, 1, 2)
    assert audio["unreadable_sources"][0]["source"] == "broken.mp4"
    assert audio["unreadable_sources"][0]["error"].startswith("broken.wav: ")
    summary = format_summary(manifest)
    assert "audio: 8 clips with, 7 without (2 out of sync)" in summary
    assert "audio unreadable: broken.mp4: broken.wav: " in summary
    assert manifest["options"]["audio_rate"] == RATE and manifest["options"]["audio_channels"] == 1

    for key, s in _samples(shards).items():
        meta = s["json"]
        stem = Path(meta["source"]).stem
        assert meta["has_audio"] == (stem in ("aac", "side", "late", "shift")) == ("flac" in s), key
        assert meta.get("audio_skipped") == ("out_of_sync" if stem == "gap" else None)
        if not meta["has_audio"]:
            continue
        assert meta["audio_source"] == {"side": "side.flac"}.get(stem, meta["source"])
        assert (meta["audio_rate"], meta["audio_channels"]) == (RATE, 1)
        assert meta["audio_samples"] == meta["num_frames"] * RATE // FPS
        pcm, rate = decode_flac(s["flac"])
        assert rate == RATE and pcm.shape == (1, meta["audio_samples"])
        # The stored segment is the source waveform from the clip's first frame on, zero-padded where it is missing.
        wave, start = _reference(sources / meta["audio_source"])
        first = round(meta["start"] * FPS)
        offset = _offset(sources, meta, first, start)
        assert meta["audio_offset"] == offset == (first + SHIFT * (stem == "shift")) * RATE // FPS - round(
            LATE[0] * RATE * (stem == "late"))
        np.testing.assert_array_equal(pcm[0] / np.float32(32768), _cut(wave, offset, meta["audio_samples"]))
        real = min(len(wave), offset + meta["audio_samples"]) - max(0, offset)
        assert meta["audio_pad_start"] + real + meta["audio_pad_end"] == meta["audio_samples"]
        if stem == "late":  # its audio covers only LATE = (0.2, 2.9) s of the 3.2 s video
            assert (meta["audio_pad_start"], meta["audio_pad_end"]) == (
                (round(LATE[0] * RATE), 0) if first == 0 else (0, round((FRAMES / FPS - LATE[1]) * RATE)))


def _batches(shards: Path, passes: int, **overrides) -> tuple[list[dict], ClipLoader]:
    urls = sorted(str(p) for p in shards.glob("clips-*.tar"))
    loader = ClipLoader(build_clip_dataset(urls, **{**DATA, "train": True, "seed": 0, **overrides}))
    return [b for _ in range(passes) for b in loader], loader


def test_loader_audio_is_the_source_audio_of_the_sampled_frames(shards, sources):
    metas = {k: s["json"] for k, s in _samples(shards).items()}
    refs = {name: _reference(sources / name) for name in ("aac.mp4", "side.flac", "late.mp4", "shift.mp4")}
    batches, loader = _batches(shards, passes=3)
    assert audio_span(0, 9, STRIDE, FPS, RATE)[1] == 9 * STRIDE * RATE // FPS
    seen = {"valid": 0, "invalid": 0}
    for batch in batches:
        b = len(batch["key"])
        assert batch["audio_valid"].dtype == torch.bool and batch["audio_valid"].shape == (b,)
        assert batch["audio"].dtype == torch.float32 and batch["audio"].shape[:2] == (b, 1)
        for i, key in enumerate(batch["key"]):
            meta, audio, valid = metas[key], batch["audio"][i, 0].numpy(), bool(batch["audio_valid"][i])
            if meta["num_frames"] == 1:  # the photo: a second of silence at its nominal 1 fps
                assert audio.shape == (RATE,) and not valid and not audio.any()
                continue
            length = audio_span(0, 9, STRIDE, meta["fps"], RATE)[1]  # gap.mp4's clips claim 80/7 fps
            assert audio.shape == (length,)
            if not meta["has_audio"]:
                assert not valid and not audio.any()
                continue
            # Which source frame the clip starts at, read from its grey level.
            j = round(((batch["video"][i, :, 0].mean().item() + 1) * 127.5 - 10) / 5)
            i0 = j - round(meta["start"] * FPS)
            assert 0 <= i0 and i0 + 9 * STRIDE <= meta["num_frames"]  # the audio span fits the clip
            wave, start = refs[meta["audio_source"]]
            np.testing.assert_array_equal(audio, _cut(wave, _offset(sources, meta, j, start), length))
            t0, t1 = Fraction(j, FPS), Fraction(j + 9 * STRIDE, FPS)
            covered = not meta["source"].startswith("late") or (LATE[0] <= t0 and t1 <= Fraction(29, 10))
            assert valid == covered, key
            seen["valid" if valid else "invalid"] += 1
            if valid:  # and against the signal itself: each click peaks on its frame's first sample (AAC too)
                shift = SHIFT if meta["source"] == "shift.mp4" else 0
                want = [k * RATE // FPS for k in range(1, 9 * STRIDE) if (j + k + shift) % CLICK_EVERY == 0]
                assert [p - 100 + int(np.abs(audio[p - 100:p + 100]).argmax()) for p in want] == want
    assert seen["valid"] and seen["invalid"]
    assert loader.stats.totals()["corrupt"] == 0


def test_span_rounding_and_start_rule():
    # The start is drawn where the audio span ends inside the clip: 24 frames, 9 at stride 2 need 18.
    assert audio_fit_frames(24, 9, 2.0, clip_span(9, 2.0)) == 6 + 17
    assert audio_fit_frames(17, 9, 2.0, clip_span(9, 2.0)) == 17  # no room: any start, the tail is past the clip
    assert audio_span(3, 9, 1.5, 30000 / 1001, 24000) == (2402, 10811)  # 3 * 800.8 = 2402.4, 13.5 * 800.8


def test_audio_batch_of_another_rate_is_a_counted_drop(shards):
    batches, loader = _batches(shards, passes=1, audio_rate=16000)
    kept = {k for b in batches for k in b["key"]}
    assert len(kept) == 7 and all(not b["audio_valid"].any() for b in batches)  # the clips without audio
    current = loader.stats.current()
    assert current["counts"]["corrupt"] == 8
    example = current["examples"]["corrupt"]
    assert "audio is 24000 Hz x 1 channel(s)" in example and "data.audio_rate=16000" in example


def test_bigbuckbunny_keeps_its_aac_soundtrack(tmp_path, demo_clips_dir):
    src = tmp_path / "in"
    src.mkdir()
    (src / "bigbuckbunny.mp4").symlink_to(demo_clips_dir / "bigbuckbunny.mp4")
    manifest = build_shards(src, tmp_path / "out", max_side=64, min_frames=17, max_frames=33, shard_size=8,
                            workers=1, progress=False)
    assert manifest["audio"]["with_audio"] == manifest["num_samples"] > 0
    assert manifest["audio"]["without_audio"] == manifest["audio"]["unreadable"] == 0
    wave, start = _reference(src / "bigbuckbunny.mp4")
    loudest = 0
    for s in _samples(tmp_path / "out").values():
        meta, (pcm, _) = s["json"], decode_flac(s["flac"])
        assert meta["audio_source"] == "bigbuckbunny.mp4" and meta["audio_pad_start"] == meta["audio_pad_end"] == 0
        offset = round((Fraction(round(meta["start"] * 25), 25) - start) * RATE)
        np.testing.assert_array_equal(pcm[0] / np.float32(32768), _cut(wave, offset, meta["audio_samples"]))
        loudest = max(loudest, int(np.abs(pcm).max()))
    assert loudest > 1000  # the soundtrack, not silence


def test_clips_config_turns_audio_on(shards):
    """configs/data/clips.yaml -> ClipDataModule: `data.audio=true` gives audio batches; a bad setting is one line."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from vidgen.data import ClipDataModule, DataConfigError

    cfg = OmegaConf.create({"seed": 0, "data": OmegaConf.load(Path(__file__).parents[1] / "configs/data/clips.yaml")})
    assert cfg.data.audio is False and (cfg.data.audio_rate, cfg.data.audio_channels) == (RATE, 1)
    cfg.data.merge_with({"train_shards": str(shards), "val_split": 0, "buckets": [list(b) for b in BUCKETS],
                         "batch_size": 2, "num_workers": 0, "resampled": False, "decoder": "pyav", "pin_memory": False,
                         "audio": True})
    dm = instantiate(cfg.data)
    batch = next(iter(dm.train_dataloader()))
    assert batch["audio"].shape[:2] == (len(batch["key"]), 1) and batch["audio_valid"].shape == (len(batch["key"]),)
    cfg.data.audio = False
    assert "audio" not in next(iter(instantiate(cfg.data).train_dataloader()))
    with pytest.raises(DataConfigError, match=r"^data.audio_channels=6: expected 1 \(mono\) or 2 \(stereo\)$"):
        ClipDataModule(str(shards), audio=True, audio_channels=6)


def test_a_sidecar_added_later_redoes_only_that_source(sources, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for name in ("mute.mp4", "aac.mp4"):
        (src / name).symlink_to(sources / name)
    kw = dict(max_side=SIDE, min_frames=17, max_frames=24, workers=1, progress=False)
    first = build_shards(src, out, **kw)
    assert (first["audio"]["with_audio"], first["audio"]["without_audio"]) == (2, 2)
    works = set(out.glob(".work/*/*.tar"))
    _write_flac(src / "mute.flac", 44100, _signal(44100, FRAMES / FPS))
    second = build_shards(src, out, **kw)
    assert (second["audio"]["with_audio"], second["audio"]["without_audio"]) == (4, 0)
    assert len(set(out.glob(".work/*/*.tar")) - works) == 1  # aac.mp4's work was reused


# ---------------------------------------------------------------------------------------------- writing sound
@pytest.mark.parametrize("frames, fps, rate, channels", [(17, 15, 24000, 1), (9, 15, 16000, 2), (33, 30, 24000, 1)])
def test_saved_sample_has_video_and_audio_of_equal_duration(tmp_path, frames, fps, rate, channels):
    """save_sample with audio: the mp4 holds an H.264 and an AAC stream whose decoded durations agree within one
    video frame, and STEM.wav holds the samples given (16-bit PCM: within one quantisation step)."""
    import wave

    from vidgen.io.video import save_sample, stream_durations

    video = torch.rand(3, frames, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    s = round(frames / fps * rate)
    tone = 0.5 * np.sin(2 * np.pi * 440 * np.arange(s) / rate)
    audio = torch.tensor(np.stack([tone * (c + 1) / channels for c in range(channels)]), dtype=torch.float32)
    mp4, _ = save_sample(tmp_path / "clip", video, fps, audio=audio, audio_rate=rate)
    durations = stream_durations(mp4)
    print(f"{frames} frames at {fps} fps + {s} samples at {rate} Hz: durations {durations}")
    assert durations["video"] == pytest.approx(frames / fps) and abs(durations["audio"] - durations["video"]) < 1 / fps
    with wave.open(str(tmp_path / "clip.wav")) as w:
        assert (w.getnchannels(), w.getframerate(), w.getnframes()) == (channels, rate, s)
        pcm = np.frombuffer(w.readframes(s), dtype="<i2").reshape(s, channels).T / 32767.0
    assert np.abs(pcm - audio.numpy()).max() <= 1 / 32767 + 1e-6
