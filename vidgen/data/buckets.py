"""Buckets (frames x height x width): assign each sample to one, then resize (cover) + crop its frames to it.

Assignment rule, from the sample's metadata only (no decoding): images (1 frame) go to 1-frame buckets, videos
to multi-frame buckets; among the buckets the sample can fill (enough frames at the sampling step, and no more
than `max_upscale` enlargement), take the longest frame count, then the nearest aspect ratio (in log space),
then the largest area. A sample that fits none is dropped with one reason from DROP_REASONS.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from vidgen.data.sampling import frame_step, max_clip_frames

# Why a sample was not batched. `corrupt`: undecodable mp4, bad json or a missing member.
DROP_REASONS = ("corrupt", "too_few_frames", "too_small", "no_bucket", "no_caption")


@dataclass(frozen=True, order=True)
class Bucket:
    """One batch shape: `frames` x `height` x `width` (a batch is [B, 3, frames, height, width])."""

    frames: int
    height: int
    width: int

    @property
    def key(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"

    @property
    def log_aspect(self) -> float:
        return math.log(self.width / self.height)


@dataclass(frozen=True)
class Assignment:
    """Where a sample goes: its bucket and the source-frame step that reaches the target fps."""

    bucket: Bucket
    step: float


def parse_buckets(buckets: Iterable) -> tuple[Bucket, ...]:
    """[[frames, height, width], ...] (lists, tuples, "TxHxW" strings or Buckets) -> sorted, de-duplicated Buckets."""
    out = set()
    for b in buckets:
        if isinstance(b, Bucket):
            out.add(b)
            continue
        vals = [int(v) for v in (b.split("x") if isinstance(b, str) else b)]
        if len(vals) != 3 or min(vals) < 1:
            raise ValueError(f"buckets: {b!r} is not [frames, height, width] with positive integers")
        out.add(Bucket(*vals))
    if not out:
        raise ValueError("buckets: expected at least one [frames, height, width]")
    return tuple(sorted(out))


def latent_tokens(bucket: Bucket, time_factor: int = 4, space_factor: int = 16) -> int:
    """DiT tokens of one sample of `bucket`: causal VAE (1 + (T-1)/4 latent frames, 8x space) + 2x2 patches."""
    frames = 1 + (bucket.frames - 1) // time_factor
    return frames * max(1, bucket.height // space_factor) * max(1, bucket.width // space_factor)


def token_budget_batch_sizes(tokens: int, buckets: Iterable[Bucket], time_factor: int = 4,
                             space_factor: int = 16, max_batch: int | None = None) -> dict[Bucket, int]:
    """Per-bucket batch sizes with batch x tokens-per-sample about `tokens` (at least 1, at most `max_batch`).

    Attention and activation memory grow with the tokens of a batch, so a budget that fits the largest
    bucket keeps every bucket in memory while small buckets (images, short clips) get larger batches.
    """
    out = {}
    for b in buckets:
        n = max(1, int(tokens) // latent_tokens(b, time_factor, space_factor))
        out[b] = min(n, int(max_batch)) if max_batch else n
    return out


def batch_sizes_per_bucket(batch_size: int | Mapping, buckets: Iterable[Bucket]) -> dict[Bucket, int]:
    """Batch size per bucket -> {Bucket: n}, from an int (all buckets), a mapping {"TxHxW": n, "default": n},
    or a token budget {"tokens": N, "max": n, "time_factor": 4, "space_factor": 16} (see token_budget_batch_sizes)."""
    buckets = list(buckets)
    if isinstance(batch_size, Mapping) and "tokens" in batch_size:
        extra = set(batch_size) - {"tokens", "max", "time_factor", "space_factor"}
        if extra:
            raise ValueError(f"batch_size: a token budget takes tokens/max/time_factor/space_factor, not {sorted(extra)}")
        return token_budget_batch_sizes(int(batch_size["tokens"]), buckets, int(batch_size.get("time_factor", 4)),
                                        int(batch_size.get("space_factor", 16)), batch_size.get("max"))
    if isinstance(batch_size, Mapping):
        sizes = {str(k): int(v) for k, v in batch_size.items()}
        unknown = set(sizes) - {b.key for b in buckets} - {"default"}
        if unknown:
            raise ValueError(f"batch_size: keys {sorted(unknown)} name no bucket (buckets: {[b.key for b in buckets]})")
        missing = [b.key for b in buckets if b.key not in sizes and "default" not in sizes]
        if missing:
            raise ValueError(f"batch_size: no size for buckets {missing}; add them or a 'default' entry")
        out = {b: sizes.get(b.key, sizes.get("default")) for b in buckets}
    else:
        out = {b: int(batch_size) for b in buckets}
    if min(out.values()) < 1:
        raise ValueError(f"batch_size: expected positive sizes, got {batch_size}")
    return out


class BucketAssigner:
    """Picks the bucket for a sample from its metadata (frame count, fps, size); see the module docstring."""

    def __init__(self, buckets: Iterable, target_fps: float | None = None, frame_stride: int = 1,
                 max_upscale: float | None = 1.0):
        self.buckets = parse_buckets(buckets)
        self.target_fps = None if target_fps is None else float(target_fps)
        self.frame_stride = int(frame_stride)
        self.max_upscale = None if max_upscale is None else float(max_upscale)
        frame_step(25.0, self.target_fps, self.frame_stride)  # validate the sampling settings now, not per sample

    def assign(self, num_frames: int, fps: float, width: int, height: int) -> Assignment | str:
        """Sample metadata -> Assignment, or the drop reason (a DROP_REASONS entry) when no bucket fits."""
        if num_frames < 1 or width < 1 or height < 1:
            return "corrupt"
        is_image = num_frames == 1
        kind = [b for b in self.buckets if (b.frames == 1) == is_image]
        if not kind:
            return "no_bucket"  # e.g. an image but no 1-frame bucket configured
        step = 1.0 if is_image else frame_step(fps, self.target_fps, self.frame_stride)
        fillable = max_clip_frames(num_frames, step)
        long_enough = [b for b in kind if b.frames <= fillable]
        if not long_enough:
            return "too_few_frames"
        limit = float("inf") if self.max_upscale is None else self.max_upscale + 1e-6
        fits = [b for b in long_enough if self.upscale(b, width, height) <= limit]
        if not fits:
            return "too_small"
        log_aspect = math.log(width / height)
        best = min(fits, key=lambda b: (-b.frames, round(abs(b.log_aspect - log_aspect), 6), -b.height * b.width))
        return Assignment(best, step)

    @staticmethod
    def upscale(bucket: Bucket, width: int, height: int) -> float:
        """Scale factor that makes a width x height frame cover the bucket (> 1 means enlarging)."""
        return max(bucket.height / height, bucket.width / width)


def crop_box(height: int, width: int, bucket: Bucket, rng: random.Random | None) -> tuple[int, int, int, int]:
    """Source box (top, left, h, w) that, resized to the bucket, covers it with the aspect kept.

    Cropping before resizing touches fewer pixels than resizing the whole frame; the result differs from
    resize-then-crop by under one source pixel. `rng=None` centres the box (validation).
    """
    scale = max(bucket.height / height, bucket.width / width)
    h = min(height, max(1, round(bucket.height / scale)))
    w = min(width, max(1, round(bucket.width / scale)))
    if rng is None:
        top, left = (height - h) // 2, (width - w) // 2
    else:
        top, left = rng.randint(0, height - h), rng.randint(0, width - w)
    return top, left, h, w


def to_bucket_uint8(frames: np.ndarray, bucket: Bucket, rng: random.Random | None = None) -> torch.Tensor:
    """uint8 frames [T, H, W, 3] -> uint8 [3, T, h, w] at the bucket size (cover resize + crop; `rng=None` centres)."""
    t, height, width, _ = frames.shape
    if t != bucket.frames:
        raise ValueError(f"got {t} frames for bucket {bucket.key}")
    top, left, h, w = crop_box(height, width, bucket, rng)
    # A "t c h w" view of the HWC frames is already channels_last, so the resize below takes torch's uint8
    # channels-last kernel: ~25x faster than resizing in float32, within one grey level of it.
    x = rearrange(torch.from_numpy(frames[:, top:top + h, left:left + w]), "t h w c -> t c h w")
    if (h, w) != (bucket.height, bucket.width):
        # antialias: downscaling without it aliases fine texture into moire the model would learn.
        x = F.interpolate(x, size=(bucket.height, bucket.width), mode="bilinear", antialias=True, align_corners=False)
    return rearrange(x, "t c h w -> c t h w").contiguous()


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (any shape) -> float32 in [-1, 1]."""
    return x.float().div_(127.5).sub_(1.0)


def to_bucket(frames: np.ndarray, bucket: Bucket, rng: random.Random | None = None) -> torch.Tensor:
    """uint8 frames [T, H, W, 3] -> float32 [3, T, h, w] in [-1, 1] at the bucket size (cover resize + crop)."""
    return normalize(to_bucket_uint8(frames, bucket, rng))
