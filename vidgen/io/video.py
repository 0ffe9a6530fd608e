"""Video read/write with PyAV: H.264 mp4 encoding (files or bytes), whole-file and streamed decoding, images.

Frames are uint8 numpy arrays shaped [T, H, W, 3] (RGB).
"""

from __future__ import annotations

import io
import os
import re
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import av
import numpy as np
import torch
from PIL import Image, ImageOps

VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".webm", ".avi")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")


def _fps_fraction(fps: float) -> Fraction:
    return Fraction(fps).limit_denominator(1001)


def encoded_fps(fps: float) -> float:
    """The frame rate encode_video actually writes for `fps` (a fraction with denominator <= 1001)."""
    return float(_fps_fraction(fps))


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


class VideoWriter:
    """Write an H.264 mp4 frame batch by frame batch, as frames are made (memory does not grow with length).

        with VideoWriter(path, fps) as out:
            out.write(frames)            # uint8 [T, H, W, 3], any number of calls; odd sides cropped by one pixel
    Frames go to `PATH.partial` and the file is renamed to PATH when closed without an error (no half-written mp4
    under the final name); `frames` counts what was written.
    """

    def __init__(self, path: str | os.PathLike, fps: float, crf: int = 18):
        self.path, self.fps, self.crf = Path(path), fps, crf
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.frames = 0
        self._container = self._stream = None

    def __enter__(self) -> VideoWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(str(self.partial), mode="w", format="mp4")
        return self

    def write(self, frames: np.ndarray) -> None:
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"VideoWriter.write expects uint8 frames [T, H, W, 3], got {frames.dtype} {frames.shape}")
        frames = frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2]
        if self._stream is None:
            self._stream = self._container.add_stream("libx264", rate=_fps_fraction(self.fps))
            self._stream.height, self._stream.width = frames.shape[1:3]
            self._stream.pix_fmt = "yuv420p"
            self._stream.options = {"crf": str(self.crf), "preset": "medium"}
        for frame in frames:
            for packet in self._stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                self._container.mux(packet)
        self.frames += len(frames)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._stream is not None:
            for packet in self._stream.encode():
                self._container.mux(packet)
        self._container.close()
        if exc_type is None and self.frames:
            os.replace(self.partial, self.path)


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


def capped_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """Output (width, height) with the longer side at most `max_side`, aspect kept, both sides even (>= 2)."""
    scale = min(1.0, max_side / max(width, height)) if max_side else 1.0
    # Round to the nearest even size: yuv420p subsamples chroma 2x2, so H.264 needs even sides.
    return max(2, int(round(width * scale / 2)) * 2), max(2, int(round(height * scale / 2)) * 2)


def probe_video(path: str | os.PathLike) -> tuple[float, int, int]:
    """Header info of a video file -> (fps, width, height); raises on an unreadable file."""
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"no video stream in {path}")
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
        return fps, stream.codec_context.width, stream.codec_context.height


def iter_frames(path: str | os.PathLike, size: tuple[int, int] | None = None) -> Iterator[np.ndarray]:
    """Decode a video file frame by frame -> RGB uint8 [H, W, 3], resized to `size` = (W, H) if given.

    Streams, so memory stays bounded for any length; resizing uses area averaging (no aliasing
    when downscaling) inside libswscale, which is much cheaper than resizing in numpy.
    """
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            if size is None:
                yield frame.to_ndarray(format="rgb24")
            else:
                yield frame.reformat(width=size[0], height=size[1], format="rgb24",
                                     interpolation="AREA").to_ndarray()


def read_image(path: str | os.PathLike, max_side: int | None = None) -> np.ndarray:
    """Read an image as a 1-frame video -> RGB uint8 [1, H, W, 3], capped to `max_side` with even sides."""

    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img).convert("RGB")  # honour camera rotation; drop alpha
        w, h = capped_size(img.width, img.height, max_side)
        if (w, h) != img.size:
            img = img.resize((w, h), Image.Resampling.BOX if w < img.width else Image.Resampling.BICUBIC)
        return np.asarray(img, dtype=np.uint8)[None]


# ---------------------------------------------------------------------------------------------- samples on disk
def to_uint8_video(x: torch.Tensor) -> np.ndarray:
    """[3, T, H, W] or [B, 3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3] (or [B, T, H, W, 3])."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    return x.movedim(-4, -1).numpy()


def contact_sheet(frames: np.ndarray, max_frames: int = 18, columns: int = 9, gap: int = 2) -> Image.Image:
    """PIL image: up to `max_frames` evenly spaced frames of `[T, H, W, 3]` in a grid of `columns`."""
    t, h, w, _ = frames.shape
    idx = np.unique(np.linspace(0, t - 1, min(t, max_frames)).round().astype(int))
    cols = min(columns, len(idx))
    rows = -(-len(idx) // cols)
    sheet = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, 3), 255, dtype=np.uint8)
    for n, i in enumerate(idx):
        r, c = divmod(n, cols)
        sheet[r * (h + gap): r * (h + gap) + h, c * (w + gap): c * (w + gap) + w] = frames[i]
    return Image.fromarray(sheet)


def slug(text: str, length: int = 40) -> str:
    """A file-name-safe prefix of a prompt: "A red car!" -> "a_red_car"."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower())[:length].strip("_")


def save_sample(stem: str | os.PathLike, video: torch.Tensor, fps: float) -> tuple[Path, Path]:
    """Write `STEM.mp4` (H.264) and `STEM.png` (contact sheet) for a video `[3, T, H, W]` in [-1, 1]."""
    stem = Path(stem)
    frames = to_uint8_video(video)  # [T, H, W, 3]
    mp4 = write_video(stem.with_suffix(".mp4"), frames, fps=fps)
    png = stem.with_suffix(".png")
    contact_sheet(frames).save(png)
    return mp4, png
