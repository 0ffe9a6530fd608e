"""Transformer building blocks shared by the DiT and the byte text encoder.

- `FP32LayerNorm`: LayerNorm computed in float32 whatever the input dtype (bf16-safe statistics).
- `Attention`: multi-head self/cross attention over `F.scaled_dot_product_attention`, optional
  QK RMS-norm across heads (Wan 2.1) and rotary embeddings, boolean key padding mask.
- `RotaryEmbedding3D`: 3D RoPE whose head dim is split over (t, h, w) exactly as Wan 2.1 / diffusers'
  `WanRotaryPosEmbed` (or at explicit, fractional positions); `apply_rope` rotates interleaved channel pairs
  (x[2i], x[2i+1]).
- `FeedForward`: Linear -> GELU(tanh) -> Linear.
- `timestep_embedding`: sinusoidal frequency embedding (DDPM / "Attention is all you need"), cos first.
- `modulate` / `gate`: adaLN (DiT, Peebles & Xie 2023, Sec. 3.2) applied per latent frame: tokens are
  `[B, N, D]` with `N = F * S` (F frames of S tokens each) and the modulation is `[B, F, D]` (or `[B, 1, D]`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vidgen.models.causal_attention import LayerKV


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm evaluated in float32 and cast back: `[..., D] -> [..., D]`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class FeedForward(nn.Module):
    """Position-wise MLP `[B, N, D] -> [B, N, D]` with a tanh-approximated GELU (as Wan / PixArt)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding `[...] -> [..., dim]` (float32), `[cos | sin]` order as diffusers' `flip_sin_to_cos`."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[..., None] * freqs  # [..., half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN `x * (1 + scale) + shift`, per frame: x `[B, F*S, D]`, shift/scale `[B, F, D]` -> `[B, F*S, D]`."""
    x = rearrange(x, "b (f s) d -> b f s d", f=shift.shape[1])  # tokens grouped by latent frame
    x = x * (1 + scale[:, :, None]) + shift[:, :, None]
    return rearrange(x, "b f s d -> b (f s) d")


def gate(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Residual gate `x * g`, per frame: x `[B, F*S, D]`, g `[B, F, D]` -> `[B, F*S, D]`."""
    x = rearrange(x, "b (f s) d -> b f s d", f=g.shape[1])
    return rearrange(x * g[:, :, None], "b f s d -> b (f s) d")


# ----------------------------------------------------------------------------------------------- RoPE


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels of one head given to (t, h, w): h = w = 2*(head_dim//6), t gets the rest (Wan 2.1 split)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


class RotaryEmbedding3D(nn.Module):
    """3D rotary position embedding (Su et al. 2021, RoFormer) on a (frames, height, width) token grid.

    `forward(f, h, w, offset)` -> `(cos, sin)`, each `[f*h*w, head_dim/2]` float32, tokens in (f h w) order.
    Angles are computed in float64 on the fly (no buffers: safe to build on the meta device), matching
    diffusers' `WanRotaryPosEmbed` tables. `offset` shifts positions (e.g. frames of a streaming window).
    `at(positions [N, 3])` gives the same for tokens at explicit, possibly fractional, positions.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.axis_dims = rope_axis_dims(head_dim)

    def forward(self, f: int, h: int, w: int, offset: tuple[int, int, int] = (0, 0, 0),
                device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = angle_dtype(device)
        angles = []
        for n, dim, off in zip((f, h, w), self.axis_dims, offset):
            inv_freq = self.inv_freq(dim, dtype, device)  # [dim/2]
            pos = torch.arange(n, dtype=dtype, device=device) + off
            angles.append(torch.outer(pos, inv_freq))  # [n, dim/2]
        grid = torch.cat([  # every token gets (t-angles | h-angles | w-angles)
            angles[0][:, None, None].expand(f, h, w, -1),
            angles[1][None, :, None].expand(f, h, w, -1),
            angles[2][None, None, :].expand(f, h, w, -1),
        ], dim=-1)
        grid = rearrange(grid, "f h w d -> (f h w) d")  # [N, head_dim/2]
        return grid.cos().float(), grid.sin().float()

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(cos, sin)`, each `[N, head_dim/2]` float32, of tokens at explicit (t, h, w) positions `[N, 3]`, which may
        be fractional (the audio tokens of `vidgen.models.joint_audio`); at integer positions it equals `forward`."""
        dtype = angle_dtype(positions.device)
        pos = positions.to(dtype)
        grid = torch.cat([torch.outer(pos[:, axis], self.inv_freq(dim, dtype, positions.device))  # [N, dim/2]
                          for axis, dim in enumerate(self.axis_dims)], dim=-1)  # [N, head_dim/2]
        return grid.cos().float(), grid.sin().float()

    def inv_freq(self, dim: int, dtype: torch.dtype, device: torch.device | None) -> torch.Tensor:
        """Rotation frequencies `[dim/2]` of one axis with `dim` channels: theta^(-2i/dim)."""
        return 1.0 / (self.theta ** (torch.arange(0, dim, 2, dtype=dtype, device=device) / dim))


def angle_dtype(device: torch.device | None) -> torch.dtype:
    """RoPE angles in float64 (diffusers' tables), float32 on MPS (which has no float64)."""
    return torch.float32 if device is not None and torch.device(device).type == "mps" else torch.float64


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x `[B, heads, N, Dh]` by angles `[N, Dh/2]`; float32 math, input dtype out."""
    x1, x2 = rearrange(x.float(), "... (d two) -> two ... d", two=2)  # even / odd channels
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return rearrange(out, "... d two -> ... (d two)").to(x.dtype)


# ------------------------------------------------------------------------------------------ attention


class Attention(nn.Module):
    """Multi-head attention `[B, N, D] (+ context [B, L, Dc]) -> [B, N, D]` via SDPA.

    Self-attention when `context is None`. `qk_norm` applies RMSNorm to the full projected q and k
    (across heads, Wan 2.1 "rms_norm_across_heads"), which keeps attention logits bounded in large
    models (Dehghani et al. 2023, ViT-22B). `mask` is a key padding mask `[B, L]`, True = attend.
    `sp` (set by `vidgen.training.sequence_parallel.enable_sequence_parallel`, None by default): x holds this
    rank's shard of the tokens, and self-attention runs over all of them with this rank's share of the heads
    (`sp.all_to_all`, DeepSpeed-Ulysses).
    """

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None, qk_norm: bool = True,
                 eps: float = 1e-6):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        kv_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(kv_dim, dim)
        self.to_v = nn.Linear(kv_dim, dim)
        self.to_out = nn.Linear(dim, dim)
        self.norm_q = nn.RMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.norm_k = nn.RMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.sp = None  # sequence parallelism (vidgen.training.sequence_parallel)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None, attn_mask: torch.Tensor | None = None,
                cache: LayerKV | None = None) -> torch.Tensor:
        """`mask`: key padding `[B, L]`; `attn_mask`: `[N, N]` bool over self-attention tokens (block-causal);
        `cache`: the keys/values of earlier chunks (`vidgen.models.causal_attention`), prepended to this input's."""
        kv = x if context is None else context
        q = self.norm_q(self.to_q(x))
        k = self.norm_k(self.to_k(kv))
        v = self.to_v(kv)
        q, k, v = (rearrange(a, "b n (h d) -> b h n d", h=self.num_heads) for a in (q, k, v))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.attend(k, v)
        if mask is not None:
            # A row with no valid key would softmax over nothing (NaN): let it see every key instead.
            mask = mask | ~mask.any(dim=-1, keepdim=True)
            attn_mask = rearrange(mask.bool(), "b l -> b 1 1 l")  # broadcast over heads and queries
        if self.sp is not None:  # Ulysses: [B, H, N/P, Dh] -> [B, H/P, N, Dh], one exchange for q, k, v
            q, k, v = self.sp.all_to_all(torch.stack([q, k, v]), scatter_dim=2, gather_dim=3).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        if self.sp is not None:
            out = self.sp.all_to_all(out, scatter_dim=2, gather_dim=1)  # [B, H/P, N, Dh] -> [B, H, N/P, Dh]
        out = rearrange(out, "b h n d -> b n (h d)").to(x.dtype)
        return self.to_out(out)
