"""Spatial tiling with linearly blended overlaps, for running a video VAE on frames of any size.

Each tile is processed independently and the outputs are cross-faded over the overlap with
linear ramps (normalised accumulation: out = sum_i w_i * y_i / sum_i w_i), as in the tiled
VAEs of diffusers / Wan. Tiles see no context beyond their borders, so results differ slightly
from an untiled pass near tile seams; `VideoVAE.encode/decode` document the measured error.
"""

from __future__ import annotations

from typing import Callable

import torch


def tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles of length `tile` every `stride` covering [0, size); the last is flush with the end."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def ramp(length: int, start: int, total: int, overlap: int, device: torch.device | None = None) -> torch.Tensor:
    """1D blend weights [length] for a tile at `start` in [0, total): linear ramps over `overlap` at inner edges.

    The ramp is (1..overlap)/(overlap+1), never 0, so every pixel keeps a positive total weight.
    """
    w = torch.ones(length, device=device)
    if overlap > 0:
        up = torch.arange(1, overlap + 1, device=device, dtype=torch.float32) / (overlap + 1)
        n = min(overlap, length)
        if start > 0:  # a neighbour on the low side: fade in
            w[:n] = torch.minimum(w[:n], up[:n])
        if start + length < total:  # a neighbour on the high side: fade out
            w[length - n:] = torch.minimum(w[length - n:], up[:n].flip(0))
    return w


def tiled_map(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int,
              scale: float) -> torch.Tensor:
    """Apply `fn` to overlapping spatial tiles of x [B, C, T, H, W] and blend the outputs.

    `fn` maps a tile [B, C, T, h, w] to [B, C', T', h*scale, w*scale] (scale 1/8 for an encoder,
    8 for a decoder). `tile` and `overlap` are in input pixels; the output is
    [B, C', T', H*scale, W*scale].
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be in [0, tile) = [0, {tile}), got {overlap}")
    h_in, w_in = x.shape[-2:]
    h_out, w_out = round(h_in * scale), round(w_in * scale)
    ov = round(overlap * scale)
    out = weight = None
    for i in tile_starts(h_in, tile, tile - overlap):
        for j in tile_starts(w_in, tile, tile - overlap):
            y = fn(x[..., i:i + tile, j:j + tile])
            oi, oj = round(i * scale), round(j * scale)
            th, tw = y.shape[-2:]
            wgt = ramp(th, oi, h_out, ov, y.device)[:, None] * ramp(tw, oj, w_out, ov, y.device)[None, :]  # [th, tw]
            if out is None:  # accumulate in fp32: bf16 sums of overlapping tiles would round visibly
                out = torch.zeros((*y.shape[:-2], h_out, w_out), device=y.device, dtype=torch.float32)
                weight = torch.zeros(h_out, w_out, device=y.device)
                dtype = y.dtype
            out[..., oi:oi + th, oj:oj + tw] += y.float() * wgt
            weight[oi:oi + th, oj:oj + tw] += wgt
    assert out is not None and weight is not None
    return (out / weight).to(dtype)
