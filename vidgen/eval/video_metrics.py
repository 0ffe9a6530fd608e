"""Weight-free video metrics on uint8 frames `[T, H, W, 3]` (the frames as saved), in 8-bit levels [0, 255].

- flicker(v)   = mean over t in [0, T-2] and all pixels/channels of |v[t+1] - v[t]|
- motion(v, k) = mean over t in [0, T-1-k] and all pixels/channels of |v[t+k] - v[t]|, k = min(stride, T-1)
- diversity(V) = mean over pairs i < j of the seeds' videos of one prompt of mean |V_i - V_j|
- scene_distance(a, b) = mean |pool(a) - pool(b)| over the first min(T_a, T_b) frames, pool = mean over
  `pool` x `pool` pixel blocks (layout and colour, not fine texture or exact motion)
- caption_distances(v, groups) = per caption, the smallest scene_distance from v to that caption's real clips

flicker counts real motion too (it is the adjacent-frame difference); read it next to motion: smooth motion
grows with the frame gap (motion > flicker), while frame-to-frame noise does not (motion ~ flicker). A static
video scores 0 on both. All three are NaN where undefined (one frame; fewer than two seeds).
"""

from __future__ import annotations

from itertools import combinations
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F


def _levels(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (or any numeric) frames [T, H, W, 3] -> float64 tensor of the same values."""
    return torch.as_tensor(np.asarray(frames)).double()


def frame_difference(frames: np.ndarray | torch.Tensor, gap: int) -> float:
    """Mean |v[t+gap] - v[t]| over every t with t + gap < T and all pixels and channels; NaN when T <= gap."""
    x = _levels(frames)
    if gap < 1 or x.shape[0] <= gap:
        return float("nan")
    return float((x[gap:] - x[:-gap]).abs().mean())


def flicker(frames: np.ndarray | torch.Tensor) -> float:
    """Mean absolute adjacent-frame difference in 8-bit levels; frames [T, H, W, 3]."""
    return frame_difference(frames, 1)


def motion(frames: np.ndarray | torch.Tensor, stride: int = 4) -> float:
    """Mean absolute difference of frames `min(stride, T-1)` apart in 8-bit levels; frames [T, H, W, 3]."""
    return frame_difference(frames, min(stride, len(frames) - 1))


def diversity(videos: Sequence[np.ndarray | torch.Tensor]) -> float:
    """Mean pairwise mean |V_i - V_j| (8-bit levels) between same-shaped videos [T, H, W, 3]; NaN for < 2."""
    xs = [_levels(v) for v in videos]
    pairs = list(combinations(range(len(xs)), 2))
    if not pairs:
        return float("nan")
    return float(np.mean([(xs[i] - xs[j]).abs().mean().item() for i, j in pairs]))


def pool_blocks(frames: np.ndarray | torch.Tensor, pool: int = 4) -> torch.Tensor:
    """uint8 frames [T, H, W, 3] -> float32 [T, 3, H/pool, W/pool], each value the mean of a pool x pool block
    (exact: a mean of at most 256 8-bit values fits float32). What scene distances compare."""
    x = torch.as_tensor(np.asarray(frames)).float().permute(0, 3, 1, 2)
    return F.avg_pool2d(x, pool, ceil_mode=True) if pool > 1 else x


def pooled_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean |a - b| (float64) over the first min(T_a, T_b) frames of two `pool_blocks` outputs of one size."""
    n = min(len(a), len(b))
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"scene_distance needs videos of one frame size, got pooled {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    return float((a[:n].double() - b[:n].double()).abs().mean())


def scene_distance(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, pool: int = 4) -> float:
    """Mean |pool(a) - pool(b)| in 8-bit levels over the first min(T_a, T_b) frames of two same-size videos."""
    return pooled_distance(pool_blocks(a, pool), pool_blocks(b, pool))


def caption_distances(video: np.ndarray | torch.Tensor, groups: Mapping[str, Sequence[torch.Tensor]],
                      pool: int = 4) -> dict[str, float]:
    """{caption: min over that caption's real clips of the scene distance to `video`} for every caption group.

    groups hold the real clips already pooled (`pool_blocks(clip, pool)`): they are pooled once, not per video.
    """
    v = pool_blocks(video, pool)
    return {caption: min(pooled_distance(v, clip) for clip in clips) for caption, clips in groups.items()}
