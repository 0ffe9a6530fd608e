"""Video read/write with PyAV: H.264 mp4 encoding (files or bytes) and whole-file decoding.

Frames are uint8 numpy arrays shaped [T, H, W, 3] (RGB).
"""

from __future__ import annotations

import io
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".webm", ".avi")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")


def _fps_fraction(fps: float) -> Fraction:
    return Fraction(fps).limit_denominator(1001)


def encode_video(frames: np.ndarray, fps: float, crf: int = 18, codec: str = "libx264") -> bytes:
    """Encode RGB frames [T, H, W, 3] uint8 to an H.264 mp4 in memory (yuv420p, even sides)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"encode_video expects uint8 frames [T, H, W, 3], got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    if t == 0:
        raise ValueError("encode_video got 0 frames")
    if h % 2 or w % 2:
        raise ValueError(f"H.264 yuv420p needs even sides, got {w}x{h}")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=_fps_fraction(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "medium"} if codec == "libx264" else {}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float, crf: int = 18) -> Path:
    """Write RGB frames [T, H, W, 3] uint8 to an H.264 mp4 file (odd sides are cropped by one pixel)."""
    frames = np.asarray(frames)
    frames = frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_video(frames, fps, crf=crf))
    return path


def read_video(source: str | os.PathLike | bytes) -> tuple[np.ndarray, float]:
    """Decode every frame of a video file (or mp4 bytes) -> (frames [T, H, W, 3] uint8, fps)."""
    src = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source)
    with av.open(src) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    if not frames:
        raise ValueError(f"no decodable frames in {source if not isinstance(source, bytes) else '<bytes>'}")
    return np.stack(frames), fps
