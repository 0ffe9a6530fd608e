"""Build webdataset clip shards from a folder of videos and images: scene split, filter, re-encode, pack.

    python data_prep/make_shards.py --input videos/ --output shards/ [--captions captions.csv] [--max-side 512]

Two phases, so a killed run resumes without redoing or duplicating anything:
  1. every source file -> one work tar in OUTPUT/.work/<options hash>/ (its clips + a summary), written
     atomically by a pool of processes; a source whose work tar exists is skipped on a rerun.
  2. the work tars, in sorted source order (then shuffled with --seed), are packed into
     clips-000000.tar ... (each written to a temp name, then renamed); manifest.json is written last,
     so its presence marks a complete, consistent output folder.
Each sample is KEY.mp4 (H.264, capped resolution, source fps) + KEY.json (docs/CONTRACTS.md), plus KEY.flac when
the clip has audio: the source's soundtrack (muxed, or a sidecar `NAME.flac` / `NAME.wav` beside it, which wins)
resampled to --audio-rate / --audio-channels, cut to exactly the clip's frames (vidgen.data.audio) and zero-padded
where the source audio starts late or ends early. Clips without audio are kept (json "has_audio": false).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import multiprocessing
import os
import random
import re
import shutil
import sys
import tarfile
from collections import Counter
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator

import av
import numpy as np

from vidgen.data.audio import (Waveform, audio_span, check_channels, encode_flac, read_audio, seconds_to_samples,
                               sidecar_audio)
from vidgen.data.scan import MEDIA_EXTS, find_media, is_image, load_caption_manifest, resolve_captions
from vidgen.io.atomic import atomic_path, atomic_write_text
from vidgen.io.video import capped_size, encode_video, encoded_fps, probe_video, read_image

WORK_VERSION = 2  # bump when the per-source processing changes, so old work caches are not reused
IMAGE_FPS = 1.0  # an image is a 1-frame clip; its fps is only nominal
DROP_REASONS = ("too_short", "too_small", "static", "unreadable")
DURATION_BINS = (1, 2, 4, 8, 16, 32, 64)  # seconds; histogram bucket upper edges
SHARD_RE = re.compile(r"^clips-(\d{6})\.tar$")


class ShardError(Exception):
    """A bad input or option, reported as one line by the CLI."""


class _WorkWriteError(RuntimeError):
    """Writing the work tar failed (e.g. disk full): fatal, unlike an unreadable source."""


@dataclass(frozen=True)
class ClipOptions:
    """Everything that changes what a source turns into (hashed to key the work cache)."""

    max_side: int = 512
    min_side: int = 64
    min_frames: int | None = 17  # 1 + 4k frames: what the causal VAE (4x in time) encodes without padding
    max_frames: int | None = 129
    min_seconds: float | None = None  # when set, replaces min_frames (converted with each source's fps)
    max_seconds: float | None = None
    motion_threshold: float = 0.5
    scene_threshold: float = 27.0  # PySceneDetect ContentDetector's default
    min_scene_frames: int = 15
    crf: int = 18
    audio_rate: int = 24000  # Hz of the stored audio
    audio_channels: int = 1  # 1 (mono) or 2 (stereo)

    def frame_bounds(self, fps: float) -> tuple[int, int]:
        """(min, max) clip length in frames for a source at `fps`."""
        lo = math.ceil(self.min_seconds * fps - 1e-6) if self.min_seconds is not None else self.min_frames
        hi = math.floor(self.max_seconds * fps + 1e-6) if self.max_seconds is not None else self.max_frames
        return max(1, lo), max(1, lo, hi)

    def digest(self) -> str:
        """Short hash of the options (+ WORK_VERSION): the name of this option set's work folder."""
        blob = json.dumps({"version": WORK_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


def clip_key(rel: str, index: int) -> str:
    """Deterministic sample key from the source path and clip index: [A-Za-z0-9_] only (webdataset splits at dots)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", rel).strip("_")[-60:]  # the end (file name) tells the most
    digest = hashlib.sha1(rel.encode("utf-8")).hexdigest()[:8]  # two paths with the same slug stay distinct
    return f"{slug}_{digest}_{index:04d}"


def segment_frames(frames: Iterable, cuts: set[int], max_frames: int) -> Iterator[tuple[int, list]]:
    """Split a frame stream into consecutive segments (<= max_frames, never across a cut) -> (start, frames)."""
    seg: list = []
    start = 0
    for i, frame in enumerate(frames):
        if seg and (i in cuts or len(seg) == max_frames):
            yield start, seg
            seg, start = [], i
        seg.append(frame)
    if seg:
        yield start, seg


def motion_score(frames: np.ndarray, size: int = 64) -> float:
    """Mean |difference| of consecutive frames [T, H, W, 3] uint8, on grey downscaled to ~`size` px, 0..255."""
    if len(frames) < 2:
        return 0.0
    grey = frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)  # [T, H, W], BT.601 luma
    k = max(1, math.ceil(max(grey.shape[1:]) / size))
    t, h, w = grey.shape[0], grey.shape[1] // k * k, grey.shape[2] // k * k
    if h and w:  # block means: sensor noise averages out, so the score measures motion, not grain
        grey = grey[:, :h, :w].reshape(t, h // k, k, w // k, k).mean(axis=(2, 4))
    return float(np.abs(np.diff(grey, axis=0)).mean())


def detect_cuts(path: str | os.PathLike, threshold: float, min_scene_frames: int) -> set[int]:
    """Frame indices where a new scene starts (PySceneDetect ContentDetector, PyAV backend); frame 0 excluded."""
    from scenedetect import ContentDetector, SceneManager, open_video

    manager = SceneManager()
    manager.add_detector(ContentDetector(threshold=threshold, min_scene_len=min_scene_frames))
    # suppress_output: otherwise the backend routes all FFmpeg logs (libx264 stats per clip) to the terminal;
    # safe here because the detector decodes single-threaded (threading_mode unset).
    manager.detect_scenes(open_video(str(path), backend="pyav", suppress_output=True))
    return {start.frame_num for start, _ in manager.get_scene_list()[1:]}


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add bytes to a tar with fixed metadata (mtime 0, root-owned) so reruns are byte-identical."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    try:
        tar.addfile(info, io.BytesIO(data))
    except OSError as e:
        raise _WorkWriteError(f"cannot write {tar.name}: {e}") from e


def timed_frames(path: str | os.PathLike, size: tuple[int, int] | None, fps: float
                 ) -> Iterator[tuple[Fraction, np.ndarray]]:
    """`vidgen.io.video.iter_frames` with each frame's presentation time -> (seconds on the video's clock, RGB uint8
    [H, W, 3] resized to `size` = (W, H)); a frame without a pts is placed 1/fps after the previous one."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        t = None
        for frame in container.decode(stream):
            if frame.pts is not None and frame.time_base:
                t = Fraction(frame.pts) * frame.time_base  # exact: the audio cut rounds once, to a sample
            else:
                t = Fraction(0) if t is None else t + 1 / Fraction(fps)
            image = frame.to_ndarray(format="rgb24") if size is None else frame.reformat(
                width=size[0], height=size[1], format="rgb24", interpolation="AREA").to_ndarray()
            yield t, image


@dataclass
class SourceAudio:
    """A source's soundtrack for its clips: the waveform, the file it came from and whether that is a sidecar."""

    wave: Waveform
    origin: str      # path of the audio file relative to the input folder
    sidecar: bool    # a sidecar's clock starts at the video's first frame; muxed audio shares the video's clock


def source_audio(path: Path, rel: str, opts: ClipOptions) -> tuple[SourceAudio | None, str | None]:
    """A video's audio (sidecar NAME.flac/.wav if present, else its own first audio stream), decoded and resampled
    -> (SourceAudio or None when it has none, the one-line error when the audio does not decode)."""
    side = sidecar_audio(path)
    origin = str(Path(rel).with_suffix(side.suffix).as_posix()) if side else rel
    try:
        wave = read_audio(side or path, opts.audio_rate, opts.audio_channels)
        if wave is None and side is not None:
            raise ValueError("no audio stream")
    except Exception as e:  # av raises many types for damaged audio; the video clips are kept either way
        return None, f"{f'{origin}: ' if side else ''}{type(e).__name__}: {e}".splitlines()[0][:300]
    return (SourceAudio(wave, origin, side is not None) if wave is not None else None), None


def clip_audio_fields(audio: SourceAudio | None, times: list[Fraction], video_start: Fraction,
                      fps: float, opts: ClipOptions) -> tuple[dict, bytes | None]:
    """A clip's audio -> (its json fields, its FLAC bytes or None); see the module docstring of vidgen.data.audio.

    `times`: the clip's frames' presentation times on the source video's clock; `video_start`: the source's first
    frame's; `fps`: the clip's (encoded) rate. Stored sample s sounds at times[0] + s / rate, and the clip's length
    in samples is `audio_span(0, len(times), 1, fps, rate)`, so it follows the frames' real times even where `fps`
    is not exactly the source's rate. A clip whose frames stray more than half a frame from the clip's clock (a
    variable-rate source: re-encoded at a constant rate, its frames no longer keep time with the audio) and a clip
    the audio does not reach at all get {"has_audio": false, "audio_skipped": "out_of_sync" | "not_covered"}.
    """
    if audio is None:
        return {"has_audio": False}, None
    clock = Fraction(fps)
    drift = max(abs(t - times[0] - i / clock) for i, t in enumerate(times))
    if drift > 1 / (2 * clock):
        return {"has_audio": False, "audio_skipped": "out_of_sync"}, None
    zero = audio.wave.start + (video_start if audio.sidecar else 0)  # the video-clock time of the waveform's sample 0
    rate = opts.audio_rate
    offset = seconds_to_samples(times[0] - zero, rate)
    _, length = audio_span(0, len(times), 1, fps, rate)
    pcm, pad_start, pad_end = audio.wave.segment(offset, length)
    if pad_start + pad_end >= length:
        return {"has_audio": False, "audio_skipped": "not_covered"}, None
    return {"has_audio": True, "audio_rate": rate, "audio_channels": opts.audio_channels, "audio_samples": length,
            "audio_offset": offset, "audio_pad_start": pad_start, "audio_pad_end": pad_end,
            "audio_source": audio.origin}, encode_flac(pcm, rate)


def _video_clips(path: Path, rel: str, opts: ClipOptions, tar: tarfile.TarFile, dropped: Counter,
                 audio_info: dict) -> list[dict]:
    """Split one video at scene cuts into clips, filter, encode into `tar` (+ their audio) -> the kept clips' metadata.

    `audio_info` is filled with the source's audio file ("source"), its decode error ("error") and the clips left
    without audio because their frames do not keep time ("out_of_sync").
    """
    src_fps, width, height = probe_video(path)
    if min(width, height) < opts.min_side:
        dropped["too_small"] += 1
        return []
    lo, hi = opts.frame_bounds(src_fps)
    audio, audio_info["error"] = source_audio(path, rel, opts)
    audio_info["source"] = audio.origin if audio is not None else None
    cuts = detect_cuts(path, opts.scene_threshold, opts.min_scene_frames)
    size = capped_size(width, height, opts.max_side)
    fps = encoded_fps(src_fps)  # the rate encode_video writes, so the json agrees with the mp4
    clips, seen, video_start = [], 0, Fraction(0)
    for index, (start, seg) in enumerate(segment_frames(timed_frames(path, size, src_fps), cuts, hi)):
        times = [t for t, _ in seg]
        video_start = times[0] if start == 0 else video_start
        seen += len(seg)
        if len(seg) < lo:
            dropped["too_short"] += 1
            continue
        x = np.stack([frame for _, frame in seg])  # [T, H, W, 3]
        motion = motion_score(x)
        if motion < opts.motion_threshold:
            dropped["static"] += 1
            continue
        key = clip_key(rel, index)
        _add_member(tar, f"{key}.mp4", encode_video(x, fps, crf=opts.crf))
        fields, flac = clip_audio_fields(audio, times, video_start, fps, opts)
        if flac is not None:
            _add_member(tar, f"{key}.flac", flac)
        audio_info["out_of_sync"] += fields.get("audio_skipped") == "out_of_sync"
        clips.append({"key": key, "fps": fps, "num_frames": len(seg), "width": size[0], "height": size[1],
                      "source": rel, "start": round(start / fps, 6), "end": round((start + len(seg)) / fps, 6),
                      "motion": round(motion, 4), **fields})
    if seen == 0:
        raise ValueError("no decodable frames")
    return clips


def _image_clip(path: Path, rel: str, opts: ClipOptions, tar: tarfile.TarFile, dropped: Counter,
                audio_info: dict) -> list[dict]:
    """An image as one 1-frame clip (no length or motion filter) -> its metadata, or [] when too small."""
    from PIL import Image

    with Image.open(path) as img:
        if min(img.size) < opts.min_side:
            dropped["too_small"] += 1
            return []
    x = read_image(path, opts.max_side)  # [1, H, W, 3]
    key = clip_key(rel, 0)
    _add_member(tar, f"{key}.mp4", encode_video(x, IMAGE_FPS, crf=opts.crf))
    return [{"key": key, "fps": IMAGE_FPS, "num_frames": 1, "width": x.shape[2], "height": x.shape[1],
             "source": rel, "start": 0.0, "end": 0.0, "motion": 0.0, "has_audio": False}]


def process_source(task: tuple[str, str, str, dict]) -> dict:
    """Phase 1 for one source: write its work tar (clips + summary.json) atomically -> the summary."""
    root, rel, work_path, opts_dict = task
    opts, path = ClipOptions(**opts_dict), Path(root) / rel
    with atomic_path(work_path) as tmp:
        dropped: Counter = Counter()
        audio = {"source": None, "error": None, "out_of_sync": 0}
        try:
            with tarfile.open(tmp, "w") as tar:
                clips = (_image_clip if is_image(rel) else _video_clips)(path, rel, opts, tar, dropped, audio)
                summary = {"source": rel, "clips": clips, "dropped": dict(dropped), "error": None, "audio": audio}
                _add_member(tar, "summary.json", json.dumps(summary, sort_keys=True).encode())
        except _WorkWriteError:
            raise
        except Exception as e:  # corrupt, truncated, empty or undecodable: a counted skip, never fatal
            summary = {"source": rel, "clips": [], "dropped": {"unreadable": 1},
                       "error": f"{type(e).__name__}: {e}".splitlines()[0][:300],
                       "audio": {"source": None, "error": None, "out_of_sync": 0}}
            with tarfile.open(tmp, "w") as tar:  # "w" truncates: no half-written clips survive
                _add_member(tar, "summary.json", json.dumps(summary, sort_keys=True).encode())
    return summary


def _work_name(root: Path, rel: str) -> str:
    """Work tar name for a source: changes when the file's (or its sidecar audio's) path, size or mtime changes
    (then it is redone)."""
    stamp = ""
    for path in (root / rel, None if is_image(rel) else sidecar_audio(root / rel)):
        if path is not None:
            st = path.stat()
            stamp += f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\0"
    return hashlib.sha1(f"{rel}\0{stamp}".encode()).hexdigest()[:20] + ".tar"


def _read_work(work_path: Path) -> tuple[dict, dict[str, tuple[int, int]]]:
    """A work tar -> (its summary, {member name: (byte offset, size)}) for reading clips without re-parsing."""
    with tarfile.open(work_path, "r") as tar:
        members = {m.name: (m.offset_data, m.size) for m in tar.getmembers()}
        summary = json.load(tar.extractfile("summary.json"))
    return summary, members


def _remove_temps(folder: Path, pattern: str) -> None:
    """Delete temp files a killed run left behind (atomic_path names them .NAME.XXXX.tmp)."""
    for p in folder.glob(pattern):
        p.unlink(missing_ok=True)


def _histogram(samples: list[dict]) -> dict:
    """Counts of resolutions ("WxH") and durations (seconds, binned; images apart) -> {"resolution", "duration"}."""
    res, dur = Counter(), Counter()
    for m in samples:
        res[f"{m['width']}x{m['height']}"] += 1
        if m["num_frames"] == 1:
            dur["image"] += 1
            continue
        seconds = m["num_frames"] / m["fps"]
        lo = 0
        for hi in DURATION_BINS:
            if seconds < hi:
                dur[f"{lo}-{hi}s"] += 1
                break
            lo = hi
        else:
            dur[f">={DURATION_BINS[-1]}s"] += 1
    order = {f"{lo}-{hi}s": i for i, (lo, hi) in enumerate(zip((0,) + DURATION_BINS, DURATION_BINS))}
    return {"resolution": dict(sorted(res.items(), key=lambda kv: (-kv[1], kv[0]))),
            "duration": dict(sorted(dur.items(), key=lambda kv: order.get(kv[0], -1 if kv[0] == "image" else 99)))}


def _pack(output: Path, samples: list[tuple[str, Path, dict[str, tuple[int, int]], dict]], shard_size: int,
          progress: bool) -> list[dict]:
    """Phase 2: pack samples (key, work tar, {ext: (offset, size)}, meta) into clips-NNNNNN.tar -> shard list."""
    from tqdm import tqdm

    shards = []
    chunks = [samples[i:i + shard_size] for i in range(0, len(samples), shard_size)]
    for n, chunk in enumerate(tqdm(chunks, desc="pack", unit="shard", disable=not progress)):
        name = f"clips-{n:06d}.tar"
        with atomic_path(output / name) as tmp, tarfile.open(tmp, "w") as tar:
            for key, work_path, members, meta in chunk:
                with open(work_path, "rb") as f:
                    for ext, (offset, size) in members.items():  # mp4, then flac when the clip has audio
                        f.seek(offset)
                        _add_member(tar, f"{key}.{ext}", f.read(size))
                _add_member(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
        shards.append({"name": name, "num_samples": len(chunk)})
    for p in output.iterdir():  # shards of an earlier, larger run in this folder would be picked up by globs
        m = SHARD_RE.match(p.name)
        if m and int(m.group(1)) >= len(chunks):
            p.unlink()
    return shards


def _clip_options(min_frames: int | None, max_frames: int | None, min_seconds: float | None,
                  max_seconds: float | None, **kwargs) -> ClipOptions:
    """Validated ClipOptions; lengths default to 17..129 frames unless given in seconds."""
    if (min_frames is not None and min_seconds is not None) or (max_frames is not None and max_seconds is not None):
        raise ShardError("give clip lengths in frames or in seconds, not both")
    opts = ClipOptions(min_frames=17 if min_frames is None and min_seconds is None else min_frames,
                       max_frames=129 if max_frames is None and max_seconds is None else max_frames,
                       min_seconds=min_seconds, max_seconds=max_seconds, **kwargs)
    for name in ("max_side", "min_frames", "max_frames", "min_seconds", "max_seconds", "min_scene_frames",
                 "audio_rate"):
        value = getattr(opts, name)
        if value is not None and value <= 0:
            raise ShardError(f"{name} must be > 0, got {value}")
    try:
        check_channels(opts.audio_channels)
    except ValueError as e:
        raise ShardError(str(e)) from None
    too_long = (opts.min_frames or 0) > (opts.max_frames or math.inf)
    if too_long or (opts.min_seconds or 0) > (opts.max_seconds or math.inf):
        raise ShardError("the minimum clip length is above the maximum")
    return opts


def _run_phase1(root: Path, work_of: dict[str, Path], opts: ClipOptions, workers: int, progress: bool) -> None:
    """Process every source whose work tar is missing, in a process pool; finished ones are skipped."""
    from tqdm import tqdm

    todo = [(str(root), rel, str(path), asdict(opts)) for rel, path in work_of.items() if not path.exists()]
    with tqdm(total=len(work_of), initial=len(work_of) - len(todo), desc="sources", unit="file",
              disable=not progress) as bar:
        if workers == 1 or len(todo) <= 1:
            for task in todo:
                process_source(task)
                bar.update()
        else:  # spawn: forking a process that holds decoder/BLAS threads can deadlock the children
            with multiprocessing.get_context("spawn").Pool(min(workers, len(todo))) as pool:
                for _ in pool.imap_unordered(process_source, todo):
                    bar.update()


def _gather(work_of: dict[str, Path], caption_of: dict[str, str]) -> tuple[list, Counter, list[dict], dict]:
    """Read the work tars in sorted source order -> (samples (key, work tar, {ext: (offset, size)}, meta), drops,
    errors, audio counts: {"with_audio", "without_audio" (clips), "out_of_sync" (clips), "unreadable" (sources),
    "unreadable_sources": [{"source", "error"}]})."""
    dropped, errors, samples = Counter({r: 0 for r in DROP_REASONS}), [], []
    audio = {"with_audio": 0, "without_audio": 0, "out_of_sync": 0, "unreadable": 0, "unreadable_sources": []}
    for rel in sorted(work_of):
        summary, members = _read_work(work_of[rel])
        dropped.update(summary["dropped"])
        if summary["error"]:
            errors.append({"source": rel, "error": summary["error"]})
        audio["out_of_sync"] += summary["audio"]["out_of_sync"]
        if summary["audio"]["error"]:
            audio["unreadable"] += 1
            audio["unreadable_sources"].append({"source": rel, "error": summary["audio"]["error"]})
        for clip in summary["clips"]:
            meta = {k: v for k, v in clip.items() if k != "key"} | {"caption": caption_of[rel]}
            names = {ext: f"{clip['key']}.{ext}" for ext in ("mp4", "flac")}
            parts = {ext: members[name] for ext, name in names.items() if name in members}
            audio["with_audio" if meta["has_audio"] else "without_audio"] += 1
            samples.append((clip["key"], work_of[rel], parts, meta))
    audio["unreadable_sources"] = audio["unreadable_sources"][:100]
    return samples, dropped, errors, audio


def build_shards(input_dir: str | os.PathLike, output_dir: str | os.PathLike, *, max_side: int = 512,
                 min_side: int = 64, min_frames: int | None = None, max_frames: int | None = None,
                 min_seconds: float | None = None, max_seconds: float | None = None,
                 motion_threshold: float = 0.5, scene_threshold: float = 27.0, min_scene_frames: int = 15,
                 crf: int = 18, audio_rate: int = 24000, audio_channels: int = 1, shard_size: int = 1000,
                 workers: int = 1, seed: int = 0, shuffle: bool = True,
                 captions: str | os.PathLike | dict[str, str] | None = None, progress: bool = True,
                 clean_work: bool = False) -> dict:
    """Turn a folder of videos/images (+ captions) into clip shards in `output_dir` -> the manifest dict.

    Lengths: min/max_frames (default 17/129) or min/max_seconds. Drops are counted per clip for
    too_short/static and per source file for too_small/unreadable. `captions`: a CSV/JSONL path or
    {relative path: caption}. Audio: each clip's soundtrack at `audio_rate` Hz x `audio_channels` (see the module
    docstring); the manifest's "audio" counts clips with and without it and the sources whose audio did not decode
    (their video clips are kept). Resumable, and deterministic for any `workers`.
    """
    root, output = Path(input_dir), Path(output_dir)
    if not root.is_dir():
        raise ShardError(f"input folder not found: {root}")
    opts = _clip_options(min_frames, max_frames, min_seconds, max_seconds, max_side=max_side, min_side=min_side,
                         motion_threshold=motion_threshold, scene_threshold=scene_threshold,
                         min_scene_frames=min_scene_frames, crf=crf, audio_rate=audio_rate,
                         audio_channels=audio_channels)
    if shard_size < 1 or workers < 1:
        raise ShardError(f"shard_size and workers must be >= 1, got {shard_size} and {workers}")
    sources = find_media(root)
    if not sources:
        raise ShardError(f"no videos or images ({' '.join(MEDIA_EXTS)}) under {root}")
    try:  # captions are joined in phase 2, so editing them never invalidates the encoded clips
        table = load_caption_manifest(captions) if isinstance(captions, (str, os.PathLike)) else captions
        caption_of = resolve_captions(root, sources, table)
    except (OSError, ValueError) as e:
        raise ShardError(str(e)) from None

    work_dir = output / ".work" / opts.digest()  # new options never reuse work done under other ones
    work_dir.mkdir(parents=True, exist_ok=True)
    _remove_temps(work_dir, ".*.tmp")
    atomic_write_text(work_dir / "options.json", json.dumps(asdict(opts), indent=2, sort_keys=True))
    work_of = {rel: work_dir / _work_name(root, rel) for rel in sources}
    _run_phase1(root, work_of, opts, workers, progress)

    (output / "manifest.json").unlink(missing_ok=True)  # stale from here until the new one is written
    _remove_temps(output, ".clips-*.tmp")
    _remove_temps(output, ".manifest.json.*.tmp")
    samples, dropped, errors, audio = _gather(work_of, caption_of)
    if shuffle:  # clips of one video would otherwise sit together in one shard (correlated batches)
        random.Random(seed).shuffle(samples)
    shards = _pack(output, samples, shard_size, progress)
    metas = [s[3] for s in samples]
    manifest = {
        "num_samples": len(samples), "shards": shards, "sources": len(sources),
        "dropped": dict(dropped), "no_caption": sum(not m["caption"] for m in metas),
        "total_seconds": round(sum(m["end"] - m["start"] for m in metas), 3),
        "histogram": _histogram(metas), "unreadable_sources": errors[:100], "audio": audio,
        "options": {**asdict(opts), "input_dir": str(root.resolve()), "shard_size": shard_size, "seed": seed,
                    "shuffle": shuffle, "workers": workers,
                    "captions": str(captions) if isinstance(captions, (str, os.PathLike)) else None},
    }
    atomic_write_text(output / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    if clean_work:
        shutil.rmtree(output / ".work", ignore_errors=True)
    return manifest


def format_summary(manifest: dict, output: str | os.PathLike = "") -> str:
    """A short human-readable report of a manifest (counts, drops, histograms)."""
    fmt = lambda d: ", ".join(f"{k} ({v})" for k, v in d.items()) or "-"  # noqa: E731
    lines = [f"{manifest['num_samples']} samples in {len(manifest['shards'])} shards from "
             f"{manifest['sources']} source files{f' -> {output}' if output else ''}",
             "  dropped: " + ", ".join(f"{k} {v}" for k, v in manifest["dropped"].items()),
             f"  no caption: {manifest['no_caption']}",
             f"  resolutions: {fmt(manifest['histogram']['resolution'])}",
             f"  durations: {fmt(manifest['histogram']['duration'])}"]
    lines += [f"  unreadable: {e['source']}: {e['error']}" for e in manifest["unreadable_sources"][:5]]
    audio = manifest.get("audio")
    if audio is not None:
        lines.append(f"  audio: {audio['with_audio']} clips with, {audio['without_audio']} without "
                     f"({audio['out_of_sync']} out of sync); audio unreadable: {audio['unreadable']} source(s)")
        lines += [f"  audio unreadable: {e['source']}: {e['error']}" for e in audio["unreadable_sources"][:5]]
    return "\n".join(lines)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Show "(default: X)" only where there is a meaningful default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see --help)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--input", required=True, help="folder of videos/images (searched recursively)")
    p.add_argument("--output", required=True, help="folder for clips-*.tar and manifest.json")
    p.add_argument("--captions", help="CSV (file,caption) or JSONL ({file, caption}); paths relative to --input")
    frames = p.add_argument_group("clip length (frames or seconds)")
    frames.add_argument("--min-frames", type=int, help="shorter clips are dropped [17]")
    frames.add_argument("--max-frames", type=int, help="longer scenes are cut into consecutive clips [129]")
    frames.add_argument("--min-seconds", type=float)
    frames.add_argument("--max-seconds", type=float)
    p.add_argument("--max-side", type=int, default=512, help="cap on the longer side (aspect kept, even sides)")
    p.add_argument("--min-side", type=int, default=64, help="sources whose shorter side is below are dropped")
    p.add_argument("--motion-threshold", type=float, default=0.5, help="clips with a lower motion score are static")
    p.add_argument("--scene-threshold", type=float, default=27.0, help="PySceneDetect ContentDetector threshold")
    p.add_argument("--min-scene-frames", type=int, default=15, help="shortest scene the detector reports")
    p.add_argument("--crf", type=int, default=18, help="H.264 quality (lower = better, bigger)")
    p.add_argument("--audio-rate", type=int, default=24000, help="sample rate of the stored audio (Hz)")
    p.add_argument("--audio-channels", type=int, default=1, choices=(1, 2), help="1 (mono) or 2 (stereo)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes for phase 1")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample shuffle across shards")
    p.add_argument("--no-shuffle", action="store_true", help="keep samples in source order")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--clean-work", action="store_true", help="delete the OUTPUT/.work cache when done")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry: build the shards, print the summary -> exit code (2: bad input, 1: no sample survived)."""
    args = parse_args(argv)
    try:
        manifest = build_shards(
            args.input, args.output, max_side=args.max_side, min_side=args.min_side, min_frames=args.min_frames,
            max_frames=args.max_frames, min_seconds=args.min_seconds, max_seconds=args.max_seconds,
            motion_threshold=args.motion_threshold, scene_threshold=args.scene_threshold,
            min_scene_frames=args.min_scene_frames, crf=args.crf, audio_rate=args.audio_rate,
            audio_channels=args.audio_channels, shard_size=args.shard_size,
            workers=args.workers, seed=args.seed, shuffle=not args.no_shuffle, captions=args.captions,
            progress=not args.no_progress, clean_work=args.clean_work)
    except ShardError as e:
        print(f"make_shards: error: {e}", file=sys.stderr)
        return 2
    print(format_summary(manifest, args.output))
    if manifest["num_samples"] == 0:
        print("make_shards: error: no sample survived the filters (see 'dropped' above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
