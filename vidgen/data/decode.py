"""Decode selected frames of an in-memory mp4: one interface, two backends (decord, PyAV) that agree frame for frame.

`open_video(mp4_bytes, backend)` -> a reader with `.num_frames`, `.fps` and `.get(indices) -> uint8 [N, H, W, 3]`;
`decode_frames(mp4_bytes, indices)` is the one-shot form; `probe_video(mp4_bytes)` reads the header only.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol, Sequence

import av
import numpy as np

log = logging.getLogger(__name__)

BACKENDS = ("decord", "pyav")


class DecodeError(ValueError):
    """The bytes are not a decodable video, or it holds fewer frames than asked for."""


@dataclass(frozen=True)
class VideoMeta:
    """What the container header says: frame count, frame rate, frame size."""

    num_frames: int
    fps: float
    width: int
    height: int


class VideoReader(Protocol):
    """An opened video: `get(indices)` -> uint8 [N, H, W, 3] RGB, in the order asked (repeats allowed)."""

    num_frames: int
    fps: float

    def get(self, indices: Sequence[int]) -> np.ndarray: ...


@lru_cache(maxsize=None)
def _decord_importable() -> bool:
    try:
        import decord  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(name: str | None) -> str:
    """Validate a backend name; `decord` falls back to `pyav` (with one warning) where decord has no wheel."""
    name = (name or "decord").lower()
    if name not in BACKENDS:
        raise ValueError(f"decoder={name!r}: expected one of {BACKENDS}")
    if name == "decord" and not _decord_importable():
        _warn_fallback()
        return "pyav"
    return name


@lru_cache(maxsize=None)
def _warn_fallback() -> None:
    log.warning("decoder=decord but decord is not importable here (e.g. aarch64): using the PyAV backend")


def _check_indices(indices: Sequence[int], num_frames: int) -> list[int]:
    idx = [int(i) for i in indices]
    if not idx:
        raise ValueError("no frame indices given")
    bad = [i for i in idx if i < 0 or i >= num_frames]
    if bad:
        raise DecodeError(f"frame indices {bad[:4]} out of range for a {num_frames}-frame video")
    return idx


class DecordReader:
    """decord backend: random access by index; `get_batch` decodes only from the keyframe before each run."""

    def __init__(self, data: bytes, threads: int = 1):
        import decord

        try:
            # decord reads a file-like object fully into its own buffer: no temp file.
            self._vr = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=threads)
        except (RuntimeError, AssertionError, decord.DECORDError) as e:
            raise DecodeError(f"decord cannot open the video: {e}") from e
        self.num_frames = len(self._vr)
        self.fps = float(self._vr.get_avg_fps())

    def get(self, indices: Sequence[int]) -> np.ndarray:
        """Frames at `indices` -> uint8 [N, H, W, 3]."""
        idx = _check_indices(indices, self.num_frames)
        try:
            return self._vr.get_batch(idx).asnumpy()
        except Exception as e:  # decord raises its own DECORDError subclasses for bad streams
            raise DecodeError(f"decord failed to decode frames {idx[:3]}...: {e}") from e


class PyAVReader:
    """PyAV backend: seek-free sequential decode that stops at the last needed frame (exact, no seek drift)."""

    def __init__(self, data: bytes, threads: int = 1):
        self._data = data
        self._threads = threads
        meta = probe_video(data)
        self.num_frames, self.fps = meta.num_frames, meta.fps

    def get(self, indices: Sequence[int]) -> np.ndarray:
        """Frames at `indices` -> uint8 [N, H, W, 3]."""
        idx = _check_indices(indices, self.num_frames)
        wanted, last = set(idx), max(idx)
        found: dict[int, np.ndarray] = {}
        try:
            with av.open(io.BytesIO(self._data)) as container:
                stream = container.streams.video[0]
                if self._threads > 1:
                    stream.thread_type = "AUTO"
                    stream.codec_context.thread_count = self._threads
                for i, frame in enumerate(container.decode(stream)):
                    if i in wanted:
                        found[i] = frame.to_ndarray(format="rgb24")
                    if i >= last:
                        break
        except av.FFmpegError as e:
            raise DecodeError(f"PyAV failed to decode: {e}") from e
        if len(found) < len(wanted):
            raise DecodeError(f"video decoded only {len(found)} of the {len(wanted)} frames asked (last {last})")
        return np.stack([found[i] for i in idx])


def probe_video(data: bytes) -> VideoMeta:
    """Header-only probe (PyAV, no decoding) -> VideoMeta; the frame count falls back to counting packets."""
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise DecodeError("no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0.0)
            n = int(stream.frames or 0)
            if n <= 0:  # containers without a frame table (webm, some mkv): count packets, still no decoding
                n = sum(1 for p in container.demux(stream) if p.size)
            width, height = stream.codec_context.width, stream.codec_context.height
    except av.FFmpegError as e:
        raise DecodeError(f"not a readable video: {e}") from e
    if n <= 0:
        raise DecodeError("video has no frames")
    return VideoMeta(num_frames=n, fps=fps, width=int(width), height=int(height))


def open_video(data: bytes, backend: str = "decord", threads: int = 1) -> VideoReader:
    """Open mp4 bytes with a backend (`decord` | `pyav`) -> a reader; raises DecodeError if unreadable."""
    if not data:
        raise DecodeError("empty video bytes")
    backend = resolve_backend(backend)
    return DecordReader(data, threads) if backend == "decord" else PyAVReader(data, threads)


def decode_frames(data: bytes, indices: Sequence[int], backend: str = "decord", threads: int = 1) -> np.ndarray:
    """Decode only the frames at `indices` of mp4 bytes -> uint8 [N, H, W, 3] RGB."""
    return open_video(data, backend, threads).get(indices)
