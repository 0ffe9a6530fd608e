"""Audio beside the frames of a clip: a file's soundtrack decoded and resampled (PyAV), FLAC members, frames -> samples.

One clock for both: sample `s` of a clip's stored audio sounds at `s / rate` seconds after the clip's first frame,
whose frame `i` shows at `i / fps` (the clip's json fps). So the frames `[first, first + T * step)` of a clip sampled
every `step` frames cover the samples `audio_span(first, T, step, fps, rate)`; that one function is the only place
frames become samples (make_shards sizes the stored audio with it, the loader cuts the batch audio with it).

Waveforms are 16-bit: PyAV's resampler converts straight to s16, FLAC stores that losslessly, and the loader's
float32 is `s16 / 32768` (in [-1, 1)), so the loader returns, bit for bit, what the resampler produced.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

SIDECAR_EXTS = (".flac", ".wav")  # audio files beside a video with its stem, in order of preference
LAYOUTS = {1: "mono", 2: "stereo"}
PCM_SCALE = 32768.0  # s16 -> float: [-32768, 32767] -> [-1, 1)


class AudioError(ValueError):
    """A clip's stored audio is missing, unreadable or not what its json says (a corrupt sample)."""


class AudioMismatch(AudioError):
    """A clip's audio has another rate or channel count than the loader is configured for."""


# ---------------------------------------------------------------------------------------------- frames -> samples
def seconds_to_samples(seconds: Fraction | float, rate: int) -> int:
    """The sample index at `seconds` (exact arithmetic): floor(seconds * rate + 1/2), i.e. round half up."""
    return math.floor(Fraction(seconds) * int(rate) + Fraction(1, 2))


def audio_span(first: int, num_frames: int, step: float, fps: float, rate: int) -> tuple[int, int]:
    """Frames sampled from clip frame `first`, `num_frames` of them `step` apart, at `fps` -> samples (start, length).

    They cover the time span [first / fps, (first + num_frames * step) / fps) of the clip's clock. The start and
    the length (not the end) are each rounded to the nearest sample (half up, exact rational arithmetic on the
    float values), so every clip of the same frame count, step and fps gets the same length whatever its start.
    An unknown fps (<= 0) gives (0, 0).
    """
    if not fps or fps <= 0:
        return 0, 0
    per_frame = Fraction(int(rate)) / Fraction(fps)  # samples per clip frame
    start = math.floor(Fraction(first) * per_frame + Fraction(1, 2))
    length = math.floor(Fraction(num_frames) * Fraction(step) * per_frame + Fraction(1, 2))
    return start, length


def audio_fit_frames(num_frames: int, frames: int, step: float, span: int) -> int:
    """The frame count to draw a `frames`-frame clip start from (see sampling.clip_indices) so that its audio span
    `[i0, i0 + frames * step)` ends inside the `num_frames`-frame clip; `span` = sampling.clip_span(frames, step).

    The last sampled frame stands for `step` frames of time, so the audio needs up to `step - 1` frames more than
    the video; when the clip has no room for that, -> `num_frames` (the span's tail lies past the stored audio).
    """
    room = math.floor(Fraction(num_frames) - Fraction(frames) * Fraction(step))  # the last start that fits
    return room + span if room >= 0 else num_frames


# ---------------------------------------------------------------------------------------------- decoding files
@dataclass(frozen=True)
class Waveform:
    """A decoded, resampled soundtrack: `pcm` int16 [C, N] at `rate`; sample 0 at `start` seconds on its file's clock
    (the first decoded frame's pts * time_base), the samples contiguous from there."""

    pcm: np.ndarray
    rate: int
    start: Fraction

    def segment(self, offset: int, length: int) -> tuple[np.ndarray, int, int]:
        """Samples [offset, offset + length) -> (int16 [C, length], zeros before the audio, zeros after it)."""
        c, n = self.pcm.shape
        out = np.zeros((c, length), np.int16)
        lo, hi = max(0, offset), min(n, offset + length)
        if hi > lo:
            out[:, lo - offset:hi - offset] = self.pcm[:, lo:hi]
        pad_start = min(length, max(0, -offset))
        pad_end = min(length - pad_start, max(0, offset + length - n))
        return out, pad_start, pad_end


def sidecar_audio(video: str | os.PathLike) -> Path | None:
    """The audio file beside a video with its stem (`clip.flac`, else `clip.wav`) -> its path, or None."""
    video = Path(video)
    for ext in SIDECAR_EXTS:
        path = video.with_suffix(ext)
        if path.is_file():
            return path
    return None


def frame_pcm(frame: av.AudioFrame) -> np.ndarray:
    """A decoded audio frame -> its samples [C, n] (planar or interleaved formats alike)."""
    x = frame.to_ndarray()
    if frame.format.is_planar:
        return x
    return x.reshape(-1, len(frame.layout.channels)).T  # [1, n * C] interleaved -> [C, n]


def check_channels(channels: int) -> str:
    """A channel count -> its PyAV layout name; ValueError unless 1 (mono) or 2 (stereo)."""
    if channels not in LAYOUTS:
        raise ValueError(f"audio channels={channels}: expected 1 (mono) or 2 (stereo)")
    return LAYOUTS[channels]


def read_audio(path: str | os.PathLike, rate: int, channels: int) -> Waveform | None:
    """Decode the first audio stream of a file and resample it (PyAV) to `rate` Hz, `channels`, s16 -> Waveform,
    or None when the file has no audio stream. Raises (av.FFmpegError, ValueError) when the audio does not decode.

    Gaps between the stream's packets are not re-timed: the samples are taken as contiguous from the first frame.
    """
    resampler = av.AudioResampler(format="s16p", layout=check_channels(channels), rate=int(rate))
    chunks: list[np.ndarray] = []
    start = None
    with av.open(str(path)) as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        for frame in container.decode(stream):
            if start is None and frame.samples:
                start = (Fraction(frame.pts) * frame.time_base if frame.pts is not None and frame.time_base
                         else Fraction(stream.start_time or 0) * (stream.time_base or 1))
            chunks += [frame_pcm(f) for f in resampler.resample(frame)]
    chunks += [frame_pcm(f) for f in resampler.resample(None)]
    pcm = np.concatenate(chunks, axis=1) if chunks else np.zeros((channels, 0), np.int16)
    if start is None or pcm.shape[1] == 0:
        raise ValueError(f"the audio stream of {path} holds no decodable samples")
    return Waveform(np.ascontiguousarray(pcm, dtype=np.int16), int(rate), start)


# ---------------------------------------------------------------------------------------------- FLAC members
def encode_flac(pcm: np.ndarray, rate: int) -> bytes:
    """int16 samples [C, N] (C = 1 or 2) -> FLAC file bytes (lossless, PyAV's encoder)."""
    pcm = np.asarray(pcm)
    if pcm.dtype != np.int16 or pcm.ndim != 2 or pcm.shape[1] == 0:
        raise ValueError(f"encode_flac expects int16 samples [C, N > 0], got {pcm.dtype} {pcm.shape}")
    layout = check_channels(pcm.shape[0])
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="flac") as container:
        stream = container.add_stream("flac", rate=int(rate))
        stream.layout, stream.format = layout, "s16"
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm.T).reshape(1, -1), format="s16", layout=layout)
        frame.sample_rate, frame.pts = int(rate), 0
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buf.getvalue()


def decode_flac(data: bytes) -> tuple[np.ndarray, int]:
    """FLAC file bytes -> (int16 samples [C, N], rate); AudioError when they do not decode as 16-bit audio."""
    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.audio[0]
            rate = int(stream.rate)
            chunks = [frame_pcm(f) for f in container.decode(stream)]
    except (av.FFmpegError, IndexError) as e:
        raise AudioError(f"flac member does not decode ({type(e).__name__}: {e})") from None
    if not chunks or chunks[0].dtype != np.int16:
        raise AudioError("flac member holds no 16-bit samples")
    return np.concatenate(chunks, axis=1), rate


def to_float(pcm: np.ndarray) -> np.ndarray:
    """int16 samples (any shape) -> float32 in [-1, 1) (s16 / 32768)."""
    return pcm.astype(np.float32) / np.float32(PCM_SCALE)


# ---------------------------------------------------------------------------------------------- the loader's cut
def no_audio(channels: int, length: int) -> torch.Tensor:
    """Silence for a sample without audio -> float32 zeros [C, length]."""
    return torch.zeros(channels, length, dtype=torch.float32)


def clip_audio(meta: Mapping, flac: bytes | None, start: int, length: int, rate: int,
               channels: int) -> tuple[torch.Tensor, bool]:
    """A clip's stored audio cut to samples [start, start + length) -> (float32 [C, length] in [-1, 1), valid).

    `meta` is the clip's json (make_shards: has_audio, audio_rate, audio_channels, audio_samples, audio_pad_start,
    audio_pad_end). Samples past the stored audio are zeros. `valid` is True when the clip has audio and the whole
    span is real audio (no zeros the json marks as padding, nothing past the stored samples). A clip without audio
    (also any clip of shards made before make_shards kept audio) gives zeros, False. Raises AudioMismatch for
    another rate / channel count, AudioError for a bad member.
    """
    if not meta.get("has_audio"):
        return no_audio(channels, length), False
    got_rate, got_channels = meta.get("audio_rate"), meta.get("audio_channels")
    if got_rate != rate or got_channels != channels:
        raise AudioMismatch(f"audio is {got_rate} Hz x {got_channels} channel(s), the loader expects "
                            f"data.audio_rate={rate} x data.audio_channels={channels} (re-make the shards with "
                            f"--audio-rate {rate} --audio-channels {channels}, or set data.audio_rate/channels)")
    if flac is None:
        raise AudioError("json says has_audio but the sample has no flac member")
    pcm, file_rate = decode_flac(flac)
    n = pcm.shape[1]
    if file_rate != rate or pcm.shape[0] != channels or n != meta.get("audio_samples"):
        raise AudioError(f"flac member is {file_rate} Hz x {pcm.shape[0]} x {n} samples, the json says "
                         f"{rate} Hz x {channels} x {meta.get('audio_samples')}")
    cut, _, _ = Waveform(pcm, rate, Fraction(0)).segment(start, length)
    real_from, real_to = int(meta.get("audio_pad_start") or 0), n - int(meta.get("audio_pad_end") or 0)
    valid = real_from <= start and start + length <= real_to
    return torch.from_numpy(to_float(cut)), valid
