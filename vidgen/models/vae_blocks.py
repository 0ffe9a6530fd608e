"""Building blocks of the causal video VAE: Wan 2.1 layout (Wan Team 2025, "Wan: Open and
Advanced Large-Scale Video Generative Models", Sec. 3.1), module names mirroring diffusers'
`AutoencoderKLWan` so that published weights map one-to-one (see `vidgen/io/convert_wan_vae.py`).

Every block takes `(x [B, C, T, H, W], cache: CausalCache | None)`; only causal convs and the
temporal resamplers read or write the cache. Attention and norms act per frame, so nothing
here looks at future frames.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vidgen.models.causal_conv import CausalCache, CausalConv3d


class RMSNorm(nn.Module):
    """Channel-first RMS norm: x / ||x||_2 over channels * sqrt(C) * gamma (Wan's `RMS_norm`).

    x [B, C, T, H, W] (`images=False`, gamma [C,1,1,1]) or [N, C, H, W] (`images=True`, gamma [C,1,1]).
    Per position, so it never mixes frames (GroupNorm would, breaking causality / chunking).
    """

    def __init__(self, dim: int, images: bool = False) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 under bf16/fp16: the sum of squares over hundreds of channels overflows.
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        # = F.normalize(x, dim=1) (x / max(||x||, 1e-12)), 3-5x faster on CPU: F.normalize's strided vector norm
        # over dim 1 was 14% of the demo VAE's decode time.
        y = (xf * torch.rsqrt(xf.square().sum(1, keepdim=True).clamp_min(1e-24))).to(x.dtype)
        return y * (self.gamma * self.scale)  # scale folded into gamma: one pass over y instead of two


class ResidualBlock(nn.Module):
    """Pre-norm residual block: (RMSNorm, SiLU, causal 3x3x3 conv) x2 + (1x1x1 conv) shortcut.

    x [B, C_in, T, H, W] -> [B, C_out, T, H, W].
    """

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = RMSNorm(in_dim)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1)
        self.norm2 = RMSNorm(out_dim)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1)
        self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        h = self.conv_shortcut(x)
        x = self.conv1(F.silu(self.norm1(x)), cache)
        x = self.conv2(self.dropout(F.silu(self.norm2(x))), cache)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head spatial self-attention within each frame (causal by construction).

    x [B, C, T, H, W] -> same shape. The output projection starts at zero, so a fresh block is
    the identity (a common trick for stable VAE training, e.g. Wan's and SD's VAE code).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        nn.init.zeros_(self.proj.weight)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = self.norm(rearrange(x, "b c t h w -> (b t) c h w"))  # frames as a batch of images
        qkv = rearrange(self.to_qkv(y), "n (three c) h w -> three n 1 (h w) c", three=3)  # 1 head
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [(b t), 1, (h w), c]
        y = self.proj(rearrange(y, "n 1 (h w) c -> n c h w", h=h))
        return x + rearrange(y, "(b t) c h w -> b c t h w", b=b)


class MidBlock(nn.Module):
    """ResidualBlock -> AttentionBlock -> ResidualBlock at the lowest resolution; shape-preserving."""

    def __init__(self, dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attentions = nn.ModuleList([AttentionBlock(dim)])
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim, dropout), ResidualBlock(dim, dim, dropout)])

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        x = self.resnets[0](x, cache)
        x = self.attentions[0](x, cache)
        return self.resnets[1](x, cache)


class _NearestUp2x(nn.Module):
    """2x nearest spatial upsampling of [N, C, H, W], computed in fp32 (bf16 interpolate is lossy on some backends)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x.float(), scale_factor=2.0, mode="nearest-exact").type_as(x)


class Resample(nn.Module):
    """2x spatial down/upsampling, optionally with 2x causal temporal down/upsampling.

    Modes: "downsample2d" / "downsample3d": [B, C, T, H, W] -> [B, C, T', H/2, W/2];
    "upsample2d" / "upsample3d": [B, C, T, H, W] -> [B, out_dim, T', 2H, 2W], where T' = T for
    2d, and for 3d the first frame of the stream stays one frame (an image is a 1-frame video):
    down: T = 1 + 2m -> 1 + m (frame 0 alone, then stride-2 windows (2j-2, 2j-1, 2j));
    up:   T = 1 + m -> 1 + 2m (frame 0 alone, then each frame -> 2 via a causal conv to 2C
          channels; the conv's history starts after frame 0, as in Wan 2.1).
    """

    def __init__(self, dim: int, mode: str, upsample_out_dim: int | None = None) -> None:
        super().__init__()
        self.mode = mode
        out_dim = upsample_out_dim if upsample_out_dim is not None else dim // 2
        if mode in ("upsample2d", "upsample3d"):
            self.resample = nn.Sequential(_NearestUp2x(), nn.Conv2d(dim, out_dim, 3, padding=1))
        elif mode in ("downsample2d", "downsample3d"):
            # Pad right/bottom only: a 3x3 stride-2 conv then sees pixels [2i, 2i+2] (Wan / SD VAE).
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        else:
            raise ValueError(f"Resample mode must be up/downsample2d/3d, got {mode!r}")
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self._time_up(x, cache)
        t = x.shape[2]
        x = self.resample(rearrange(x, "b c t h w -> (b t) c h w"))  # spatial, per frame
        x = rearrange(x, "(b t) c h w -> b c t h w", t=t)
        if self.mode == "downsample3d":
            x = self._time_down(x, cache)
        return x

    def _time_up(self, x: torch.Tensor, cache: CausalCache | None) -> torch.Tensor:
        started = cache.get(self, False) if cache is not None else False
        first, rest = (x[:, :, :0], x) if started else (x[:, :, :1], x[:, :, 1:])
        if cache is not None:
            cache.put(self, True)
        if rest.shape[2] == 0:
            return first
        rest = self.time_conv(rest, cache)  # [B, 2C, t, H, W]
        rest = rearrange(rest, "b (two c) t h w -> b c (t two) h w", two=2)  # each frame -> 2 frames
        return torch.cat([first, rest], dim=2)

    def _time_down(self, x: torch.Tensor, cache: CausalCache | None) -> torch.Tensor:
        past = cache.get(self) if cache is not None else None
        # Stream start: frame 0 is emitted alone and also opens the first window (0, 1, 2).
        first, rest = (x[:, :, :1], x) if past is None else (x[:, :, :0], torch.cat([past, x], dim=2))
        if (rest.shape[2] - 1) % 2:
            raise ValueError(f"temporal downsampling got a chunk of {x.shape[2]} frames; chunks must hold "
                             "1 + 2m frames at the stream start and 2m frames afterwards")
        if cache is not None:
            cache.put(self, x[:, :, -1:].clone())  # a copy, not a view pinning the whole chunk
        if rest.shape[2] == 1:
            return first
        return torch.cat([first, self.time_conv(rest)], dim=2)


class UpBlock(nn.Module):
    """Decoder level: (num_res_blocks + 1) ResidualBlocks, then an optional Resample."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, dropout: float = 0.0,
                 upsample_mode: str | None = None) -> None:
        super().__init__()
        dims = [in_dim] + [out_dim] * (num_res_blocks + 1)
        self.resnets = nn.ModuleList([ResidualBlock(a, b, dropout) for a, b in zip(dims[:-1], dims[1:])])
        self.upsamplers = nn.ModuleList([Resample(out_dim, upsample_mode)]) if upsample_mode else None

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, cache)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, cache)
        return x


def _per_level(n: int | Sequence[int], levels: int) -> list[int]:
    n = [int(n)] * levels if isinstance(n, int) else [int(v) for v in n]
    if len(n) != levels:
        raise ValueError(f"num_res_blocks has {len(n)} entries, expected one per level ({levels})")
    return n


class Encoder3d(nn.Module):
    """Causal video encoder: x [B, in_channels, 1+4k, H, W] -> moments [B, out_channels, 1+k, H/8, W/8].

    Level i has `num_res_blocks[i]` ResidualBlocks at width `dim * dim_mult[i]`, then (except the
    last level) a Resample that halves H, W and, where `temporal_downsample[i]`, time.
    """

    def __init__(self, in_channels: int, dim: int, out_channels: int, dim_mult: Sequence[int],
                 num_res_blocks: int | Sequence[int], temporal_downsample: Sequence[bool], dropout: float = 0.0) -> None:
        super().__init__()
        dims = [dim * m for m in [1, *dim_mult]]
        blocks = _per_level(num_res_blocks, len(dim_mult))
        self.conv_in = CausalConv3d(in_channels, dims[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(blocks[i]):
                layers.append(ResidualBlock(in_dim, out_dim, dropout))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                layers.append(Resample(out_dim, "downsample3d" if temporal_downsample[i] else "downsample2d"))
        self.down_blocks = nn.ModuleList(layers)  # flat, as in diffusers (keeps key names identical)
        self.mid_block = MidBlock(dims[-1], dropout)
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        x = self.conv_in(x, cache)
        for layer in self.down_blocks:
            x = layer(x, cache)
        x = self.mid_block(x, cache)
        return self.conv_out(F.silu(self.norm_out(x)), cache)


class Decoder3d(nn.Module):
    """Causal video decoder: z [B, z_dim, 1+k, h, w] -> x [B, out_channels, 1+4k, 8h, 8w].

    Mirror of `Encoder3d`: level widths reversed; each upsampling Resample halves the width
    (Wan 2.1), so the next level's input width is half its predecessor's output width.
    """

    def __init__(self, dim: int, z_dim: int, dim_mult: Sequence[int], num_res_blocks: int | Sequence[int],
                 temporal_upsample: Sequence[bool], dropout: float = 0.0, out_channels: int = 3) -> None:
        super().__init__()
        dims = [dim * m for m in [dim_mult[-1], *dim_mult[::-1]]]
        blocks = _per_level(num_res_blocks, len(dim_mult))[::-1]
        self.conv_in = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0], dropout)
        self.up_blocks = nn.ModuleList()
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            in_dim = in_dim // 2 if i > 0 else in_dim  # the previous Resample halved the width
            mode = None
            if i != len(dim_mult) - 1:
                mode = "upsample3d" if temporal_upsample[i] else "upsample2d"
            self.up_blocks.append(UpBlock(in_dim, out_dim, blocks[i], dropout, mode))
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        x = self.conv_in(z, cache)
        x = self.mid_block(x, cache)
        for block in self.up_blocks:
            x = block(x, cache)
        return self.conv_out(F.silu(self.norm_out(x)), cache)
