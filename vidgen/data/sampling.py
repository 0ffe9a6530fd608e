"""Clip sampling: which source frames make a T-frame clip at a target fps (or a fixed stride), from a seeded start.

The step between sampled source frames is `src_fps / target_fps` (fractional; nearest source frame per output
frame), never below 1: a clip slower than the target is read at its own rate rather than with repeated frames,
and its effective fps (`src_fps / step`) is what the batch reports.
"""

from __future__ import annotations

import math
import random


def frame_step(src_fps: float, target_fps: float | None = None, frame_stride: int = 1) -> float:
    """Source frames per output frame: `src_fps / target_fps` clamped to >= 1, or the fixed `frame_stride`."""
    if target_fps is not None:
        if target_fps <= 0:
            raise ValueError(f"target_fps={target_fps}: expected a positive frame rate or null")
        if not src_fps or src_fps <= 0:
            return 1.0  # unknown source rate: read consecutive frames rather than guess
        return max(1.0, float(src_fps) / float(target_fps))
    if int(frame_stride) < 1:
        raise ValueError(f"frame_stride={frame_stride}: expected an integer >= 1")
    return float(frame_stride)


def frame_offset(i: int, step: float) -> int:
    """Source frame of output frame `i` at this step, from the clip's first: i * step rounded half up (not Python's
    banker's rounding), so offsets are monotone and reproducible."""
    return int(math.floor(i * step + 0.5))


def clip_span(num_frames: int, step: float) -> int:
    """Source frames covered by a `num_frames`-frame clip with this step (first to last, inclusive)."""
    return frame_offset(num_frames - 1, step) + 1


def max_clip_frames(src_frames: int, step: float) -> int:
    """Longest clip (output frames) that a `src_frames`-frame source can fill at this step."""
    if src_frames <= 0:
        return 0
    n = int((src_frames - 1) / step) + 1
    while n > 1 and clip_span(n, step) > src_frames:  # guard the rounding at the edge
        n -= 1
    while clip_span(n + 1, step) <= src_frames:
        n += 1
    return n


def clip_indices(src_frames: int, num_frames: int, step: float, rng: random.Random | None = None) -> list[int]:
    """Source frame indices of one clip: `num_frames` frames `step` apart from a start drawn by `rng`.

    `rng=None` takes the centred clip (validation, deterministic). Raises ValueError if the source is too short.
    """
    span = clip_span(num_frames, step)
    if span > src_frames:
        raise ValueError(f"a {num_frames}-frame clip at step {step:.3g} needs {span} source frames, have {src_frames}")
    slack = src_frames - span
    start = slack // 2 if rng is None else rng.randint(0, slack)
    return [start + frame_offset(i, step) for i in range(num_frames)]


def sample_rng(seed: int, epoch: int, key: str) -> random.Random:
    """RNG for one sample: fixed by (seed, epoch, key), whichever rank or worker draws it.

    Seeding `random.Random` with a str hashes it with SHA-512, so it does not depend on PYTHONHASHSEED.
    """
    return random.Random(f"{seed}:{epoch}:{key}")
