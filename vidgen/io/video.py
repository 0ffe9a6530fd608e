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


def encode_video(frames: np.ndarray, fps: float, crf: int = 18, codec: str = "libx264",
                 audio: np.ndarray | None = None, audio_rate: int | None = None) -> bytes:
    """Encode RGB frames [T, H, W, 3] uint8 to an H.264 mp4 in memory (yuv420p, even sides); with `audio`
    (float [C, S] in [-1, 1], C = 1 or 2, at `audio_rate` Hz) an AAC track is muxed beside it."""
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
        sound = _AudioTrack(container, audio, audio_rate) if audio is not None else None
        for i, frame in enumerate(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
            if sound is not None:  # interleaved: the audio up to the end of this frame
                sound.write_until((i + 1) / float(_fps_fraction(fps)))
        for packet in stream.encode():
            container.mux(packet)
        if sound is not None:
            sound.close()
    return buf.getvalue()


class _AudioTrack:
    """An AAC stream of `container` fed from float audio [C, S] in [-1, 1] in pieces (`write_until(seconds)`)."""

    def __init__(self, container: av.container.OutputContainer, audio: np.ndarray, rate: int | None):
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 2 or audio.shape[0] not in (1, 2) or not rate:
            raise ValueError(f"audio must be float [C, S] with C = 1 or 2 and a rate, got {audio.shape} at {rate}")
        self.audio, self.rate, self.done = np.clip(audio, -1.0, 1.0), int(rate), 0
        self.stream = container.add_stream("aac", rate=self.rate)
        self.stream.layout = "mono" if audio.shape[0] == 1 else "stereo"
        self.container = container

    def write_until(self, seconds: float) -> None:
        end = min(self.audio.shape[1], round(seconds * self.rate))
        if end > self.done:
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(self.audio[:, self.done:end]), format="fltp",
                                               layout=self.stream.layout.name)
            frame.rate, frame.pts, self.done = self.rate, self.done, end
            for packet in self.stream.encode(frame):
                self.container.mux(packet)

    def close(self) -> None:
        self.write_until(self.audio.shape[1] / self.rate)
        for packet in self.stream.encode():
            self.container.mux(packet)


def write_wav(path: str | os.PathLike, audio: np.ndarray, rate: int) -> Path:
    """Write float audio [C, S] in [-1, 1] as a 16-bit PCM WAV file."""
    import wave

    audio = np.asarray(audio, dtype=np.float32)
    pcm = (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype("<i2").T  # [S, C] interleaved
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(audio.shape[0])
        out.setsampwidth(2)
        out.setframerate(int(rate))
        out.writeframes(pcm.tobytes())
    return path


def stream_durations(path: str | os.PathLike) -> dict[str, float]:
    """{"video": seconds, "audio": seconds} of a media file's first video / audio stream, from the decoded frames
    (frame count / rate for video; decoded samples / rate for audio, the encoder's priming samples trimmed)."""
    out = {}
    with av.open(str(path)) as container:
        if container.streams.video:
            v = container.streams.video[0]
            n = sum(1 for _ in container.decode(v))
            out["video"] = n / float(v.average_rate or v.guessed_rate)
    with av.open(str(path)) as container:
        if container.streams.audio:
            a = container.streams.audio[0]
            out["audio"] = sum(f.samples for f in container.decode(a)) / a.rate
    return out


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


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float, crf: int = 18,
                audio: np.ndarray | None = None, audio_rate: int | None = None) -> Path:
    """Write RGB frames [T, H, W, 3] uint8 to an H.264 mp4 file (odd sides are cropped by one pixel), with an AAC
    track from `audio` float [C, S] at `audio_rate` when given."""
    frames = np.asarray(frames)
    frames = frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_video(frames, fps, crf=crf, audio=audio, audio_rate=audio_rate))
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


def save_sample(stem: str | os.PathLike, video: torch.Tensor, fps: float, audio: torch.Tensor | None = None,
                audio_rate: int | None = None) -> tuple[Path, Path]:
    """Write `STEM.mp4` (H.264) and `STEM.png` (contact sheet) for a video `[3, T, H, W]` in [-1, 1]; with `audio`
    `[C, S]` in [-1, 1] at `audio_rate` Hz, the mp4 gets an AAC track and `STEM.wav` is written beside it."""
    stem = Path(stem)
    frames = to_uint8_video(video)  # [T, H, W, 3]
    sound = None if audio is None else audio.detach().float().cpu().numpy()
    if sound is not None:
        write_wav(stem.with_suffix(".wav"), sound, audio_rate)
    mp4 = write_video(stem.with_suffix(".mp4"), frames, fps=fps, audio=sound, audio_rate=audio_rate)
    png = stem.with_suffix(".png")
    contact_sheet(frames).save(png)
    return mp4, png
