"""Video diffusion transformer (DiT) in the Wan 2.1 layout: predicts the flow velocity of a latent video.

    v = DiT(...)(z, t, context, context_mask)
      z        [B, C, T, H, W]   noisy latent (T latent frames)
      t        [B] or [B, T]     flow time in [0, 1] (0 = clean, 1 = noise), per sample or per latent frame
      context  [B, L, text_dim]  text token embeddings; context_mask [B, L] bool (True = real token) or None
      v        [B, C_out, T, H, W]

Pipeline: Conv3d patchify (patch (1, 2, 2)) -> `depth` x DiTBlock [adaLN-modulated self-attention with
3D RoPE + QK RMS-norm, cross-attention to the text, adaLN-modulated GELU MLP] -> final LayerNorm +
modulation -> zero-initialised linear -> unpatchify. Timestep conditioning (Peebles & Xie 2023, adaLN):
sinusoid(t * timestep_scale) -> MLP -> `temb [.., D]` -> SiLU -> Linear -> 6 vectors per block, plus a
learned per-block offset (`scale_shift_table`, Wan 2.1). With per-frame `t` every latent frame gets its own
modulation, broadcast over that frame's tokens: this is what image-to-video / extension / streaming use
(clean frames at t = 0, see `vidgen/diffusion`).

Parameter names mirror diffusers' `WanTransformer3DModel` (see `vidgen/io/convert_wan_dit.py`, which only
renames `to_out.0` and the MLP), and `t` is scaled by 1000 before the sinusoid as Wan does, so published
Wan 2.1 weights load and reproduce diffusers' output. Imported Wan weights expect the text context the
way Wan feeds it: UMT5-XXL embeddings zero-padded to 512 tokens with `context_mask=None`.

Causal: `attention="causal"` makes self-attention block-causal over chunks of latent frames (sliding window +
sink chunks, `vidgen/models/causal_attention.py`); the whole clip trains at once under that mask, and streaming
feeds one chunk at a time with a `KVCache` of the earlier ones (`forward(kv_cache=...)`), computing the same
function. Same weights in both modes: a bidirectional checkpoint fine-tunes into a causal one.

For scale: `gradient_checkpointing = True` recomputes each block in backward; `DiTBlock` is the FSDP wrap unit
(`vidgen/training/parallelize.py`); `t` can be any float tensor (no graph breaks under `torch.compile`);
`sp` splits the tokens over the ranks of a process group (`vidgen.training.sequence_parallel`, Ulysses).

Joint audio + video: `audio_channels > 0` adds an audio stream (`vidgen.models.joint_audio`): audio latents
`[B, Ca, Ta]` become tokens after the video tokens of one sequence, with temporal RoPE positions on the video's clock
and adaLN modulation by their own noise level t_audio; `forward(..., audio=, t_audio=)` then returns (v, v_audio).
With `audio_channels = 0` (default) the DiT has no audio parameter and is exactly the video DiT above.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from vidgen.models.layers import Attention, FeedForward, FP32LayerNorm, RotaryEmbedding3D, gate, modulate, \
    timestep_embedding
from vidgen.models.base import Configurable, capture_config
from vidgen.models.causal_attention import ATTENTION_MODES, KVCache, LayerKV, block_causal_mask
from vidgen.models.joint_audio import AudioStream, JointModulation, audio_times, joint_block_causal_mask

# The blocks' adaLN input: `[B, F, 6, D]` per latent frame, or a `JointModulation` (video + audio tokens).
Modulation = torch.Tensor | JointModulation
# `block_stack(x, mod, run) -> x`: runs (or stands in for) the block stack `run` on tokens x (see `DiT.forward`).
BlockStack = Callable[[torch.Tensor, Modulation, Callable[[torch.Tensor], torch.Tensor]], torch.Tensor]


def spatial_position_embedding(frames: int, height: int, width: int, dim: int, device: torch.device | None = None,
                               ) -> torch.Tensor:
    """Fixed 2D sin-cos embedding `[frames*height*width, dim]` (frame-major tokens): half the channels encode the
    token's row, half its column (each as `timestep_embedding` of the index); the same for every frame."""
    rows = timestep_embedding(torch.arange(height, device=device), dim // 2)  # [H, D/2]
    cols = timestep_embedding(torch.arange(width, device=device), dim - dim // 2)  # [W, D - D/2]
    grid = torch.cat([rows[:, None].expand(-1, width, -1), cols[None].expand(height, -1, -1)], dim=-1)
    return grid.reshape(1, height * width, dim).expand(frames, -1, -1).reshape(frames * height * width, dim)


def local_frames(per_frame: torch.Tensor, start: int, end: int, tokens_per_frame: int) -> torch.Tensor:
    """The rows of a per-frame tensor `[B, F, ...]` that cover tokens [start, end): `[B, F_local, ...]`.

    As `modulate` / `gate` read it, row i covers the i-th run of (end - start) / F_local local tokens. A run of
    g = gcd(tokens_per_frame, end - start) tokens never straddles two frames, so a shard that starts mid-frame
    still gets each token's own frame. F = 1 (one t per sample) is shared by every token and returned as is.
    """
    if per_frame.shape[1] == 1:
        return per_frame
    g = math.gcd(tokens_per_frame, end - start)
    rows = torch.arange(start, end, g, device=per_frame.device) // tokens_per_frame  # frame of each g-token run
    return per_frame[:, rows]


def adaln(op: Callable[..., torch.Tensor], x: torch.Tensor, mod: Modulation, *rows: int) -> torch.Tensor:
    """`op` (`modulate` / `gate`) of tokens x `[B, N, D]` with the rows `rows` of mod `[B, F, 6, D]` (tokens grouped
    by latent frame), or of a `JointModulation` (video and audio tokens each with their own): `[B, N, D]`."""
    if isinstance(mod, JointModulation):
        return mod.apply(op, x, *rows)
    return op(x, *(mod[:, :, r] for r in rows))


class MLPEmbedder(nn.Module):
    """Two-layer MLP `[..., in] -> [..., out]` (diffusers' TimestepEmbedding / PixArtAlphaTextProjection)."""

    def __init__(self, in_dim: int, out_dim: int, act: nn.Module):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.act = act
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class ConditionEmbedder(nn.Module):
    """Time and text embedding: t `[B, F]` -> (temb `[B, F, D]`, mod `[B, F, 6, D]`); text `[B, L, Dt] -> [B, L, D]`."""

    def __init__(self, dim: int, freq_dim: int, text_dim: int, timestep_scale: float):
        super().__init__()
        self.freq_dim, self.timestep_scale = freq_dim, timestep_scale
        self.time_embedder = MLPEmbedder(freq_dim, dim, nn.SiLU())
        self.time_proj = nn.Linear(dim, 6 * dim)  # applied after SiLU(temb), as Wan's `time_projection`
        self.text_embedder = MLPEmbedder(text_dim, dim, nn.GELU(approximate="tanh"))

    def time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t `[B, F]` -> temb `[B, F, D]`, per-block modulation `[B, F, 6, D]` (float32 for bf16 stability)."""
        freq = timestep_embedding(t * self.timestep_scale, self.freq_dim)  # [B, F, freq_dim]
        temb = self.time_embedder(freq.to(self.time_embedder.linear_1.weight.dtype))
        mod = self.time_proj(nn.functional.silu(temb))
        return temb.float(), rearrange(mod.float(), "b f (six d) -> b f six d", six=6)


class DiTBlock(nn.Module):
    """One transformer block `[B, N, D] -> [B, N, D]` (Wan 2.1 block), modulated per latent frame."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, cross_attn_norm: bool = True, qk_norm: bool = True,
                 eps: float = 1e-6):
        super().__init__()
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.attn1 = Attention(dim, num_heads, qk_norm=qk_norm, eps=eps)
        self.norm2 = FP32LayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.attn2 = Attention(dim, num_heads, qk_norm=qk_norm, eps=eps)
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = FeedForward(dim, ffn_dim)
        # Learned offsets added to the shared timestep modulation: each block gets its own adaLN.
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None,
                mod: Modulation, rope_cos: torch.Tensor, rope_sin: torch.Tensor,
                attn_mask: torch.Tensor | None = None, cache: LayerKV | None = None) -> torch.Tensor:
        """x `[B, N, D]` (N = F*S video tokens, then any audio tokens), context `[B, L, D]`, mod `[B, F, 6, D]`
        (F = 1: one t per sample) or a `JointModulation`, rope `[N, Dh/2]`; attn_mask `[N, N]` (block-causal) and
        cache (earlier chunks' keys/values) for a causal DiT."""
        m = self.modulation(mod)  # rows: shift/scale/gate of self-attention, then of the MLP
        # Residual stream and modulation in float32 (as Wan), sub-layers in the input dtype.
        h = adaln(modulate, self.norm1(x.float()), m, 0, 1).type_as(x)
        attn = self.attn1(h, rope=(rope_cos, rope_sin), attn_mask=attn_mask, cache=cache)
        x = (x.float() + adaln(gate, attn.float(), m, 2)).type_as(x)
        h = self.norm2(x.float()).type_as(x)
        x = x + self.attn2(h, context, mask=context_mask)
        h = adaln(modulate, self.norm3(x.float()), m, 3, 4).type_as(x)
        x = (x.float() + adaln(gate, self.ffn(h).float(), m, 5)).type_as(x)
        return x

    def modulation(self, mod: Modulation) -> Modulation:
        """This block's adaLN: the shared timestep modulation plus its learned offsets, `[B, F, 6, D]` (or joint)."""
        table = self.scale_shift_table[:, None]  # [1, 1, 6, D]
        return mod.plus(table) if isinstance(mod, JointModulation) else table + mod

    def modulated_input(self, x: torch.Tensor, mod: Modulation) -> torch.Tensor:
        """What self-attention sees: adaLN(x) float32 `[B, N, D]` for x `[B, N, D]`, mod `[B, F, 6, D]` (or joint)."""
        return adaln(modulate, self.norm1(x.float()), self.modulation(mod), 0, 1)


class DiT(nn.Module, Configurable):
    """Latent video DiT: `forward(z [B,C,T,H,W], t [B]|[B,T], context [B,L,text_dim], mask [B,L]) -> v [B,C_out,T,H,W]`.

    Args: in_channels / out_channels (None = in_channels): latent channels (wire to the VAE's latent channels);
    dim, depth, num_heads: width, number of blocks, attention heads (head dim = dim / num_heads);
    ffn_dim: MLP hidden width (None = 4 * dim); text_dim: width of the text encoder output (wire to it);
    freq_dim: sinusoid width for t; patch_size: (pt, ph, pw); cross_attn_norm / qk_norm / eps: as Wan 2.1;
    rope_theta: RoPE base; timestep_scale: t in [0, 1] is multiplied by this before the sinusoid (1000 = Wan);
    text_mask: whether the text padding mask reaches cross-attention (Wan 2.1: False, it attends to the zero
    padding as diffusers' `WanTransformer3DModel` does); abs_pos: also add a fixed 2D sin-cos embedding of each
    token's (row, column) to the patch embeddings (as DiT / PixArt do; not in Wan 2.1, off by default). RoPE alone
    is relative: from pure noise a small model trained briefly has no way to know where in the frame a token is,
    and cannot lay out a scene (the CPU demo turns it on);
    attention: "full" (bidirectional, Wan 2.1) or "causal": block-causal over chunks of `chunk_frames` latent
    frames, each chunk seeing itself, the `window_chunks - 1` chunks before it (None: all) and the first
    `sink_chunks` chunks (`vidgen.models.causal_attention`); a causal DiT streams with a `KVCache`
    (`forward(kv_cache=...)`, `new_kv_cache()`). The mode is part of the config, so checkpoints record it.
    gradient_checkpointing: recompute blocks in backward (also settable as an attribute).
    audio_channels: channels Ca of audio latents (wire to the audio VAE); 0 (default) = no audio stream, not one
    audio parameter. audio_per_latent_frame: a, how many audio latents tile one video latent frame's window (the
    common clock; the audio VAE gives it): audio `[B, Ca, T * a]` goes with latent `[B, C, T, H, W]`
    (`vidgen.models.joint_audio`).
    `sp` (attribute, default None): sequence parallelism, each of P ranks running 1/P of the tokens; set by
    `vidgen.training.sequence_parallel.enable_sequence_parallel`; inputs and outputs stay those of one process.
    """

    def __init__(self, in_channels: int = 16, out_channels: int | None = None, dim: int = 384, depth: int = 12,
                 num_heads: int = 6, ffn_dim: int | None = None, text_dim: int = 256, freq_dim: int = 256,
                 patch_size: Sequence[int] = (1, 2, 2), cross_attn_norm: bool = True, qk_norm: bool = True,
                 eps: float = 1e-6, rope_theta: float = 10000.0, timestep_scale: float = 1000.0,
                 text_mask: bool = True, abs_pos: bool = False, attention: str = "full", chunk_frames: int = 1,
                 window_chunks: int | None = None, sink_chunks: int = 0, gradient_checkpointing: bool = False,
                 audio_channels: int = 0, audio_per_latent_frame: int = 1):
        super().__init__()
        self.config = capture_config(DiT, locals())
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention={attention!r}: expected one of {ATTENTION_MODES}")
        if attention == "causal" and (chunk_frames < 1 or chunk_frames % int(patch_size[0])):
            raise ValueError(f"chunk_frames={chunk_frames}: expected a positive multiple of the temporal patch "
                             f"{patch_size[0]}")
        if window_chunks is not None and window_chunks < 1:
            raise ValueError(f"window_chunks={window_chunks}: expected >= 1 (or null: every earlier chunk)")
        if audio_channels < 0 or audio_per_latent_frame < 1:
            raise ValueError(f"audio_channels={audio_channels}, audio_per_latent_frame={audio_per_latent_frame}: "
                             f"expected >= 0 (0: no audio) and >= 1")
        self.attention, self.chunk_frames = attention, int(chunk_frames)
        self.window_chunks, self.sink_chunks = window_chunks, int(sink_chunks)
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.dim, self.num_heads = dim, num_heads
        self.patch_size = tuple(int(p) for p in patch_size)
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size must be (pt, ph, pw), got {patch_size}")
        self.gradient_checkpointing = gradient_checkpointing
        self.text_mask, self.abs_pos = text_mask, abs_pos
        self.sp = None  # sequence parallelism (vidgen.training.sequence_parallel)

        self.rope = RotaryEmbedding3D(dim // num_heads, theta=rope_theta)
        self.patch_embedding = nn.Conv3d(in_channels, dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.condition_embedder = ConditionEmbedder(dim, freq_dim, text_dim, timestep_scale)
        self.blocks = nn.ModuleList([
            DiTBlock(dim, num_heads, ffn_dim or 4 * dim, cross_attn_norm, qk_norm, eps) for _ in range(depth)
        ])
        self.norm_out = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, self.out_channels * math.prod(self.patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        self.audio_stream = AudioStream(audio_channels, dim, audio_per_latent_frame, eps) if audio_channels else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """DiT init: xavier linears, zero biases, N(0, 0.02) time MLP, zero output projections (v = 0 at init)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embedding.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a linear layer over the flattened patch
        nn.init.zeros_(self.patch_embedding.bias)
        for lin in (self.condition_embedder.time_embedder.linear_1, self.condition_embedder.time_embedder.linear_2):
            nn.init.normal_(lin.weight, std=0.02)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        if self.audio_stream is not None:
            self.audio_stream.reset_parameters()

    def frame_times(self, t: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
        """t `[B]` -> `[B, 1]`; per-frame t `[B, T]` -> `[B, T / pt]` (a temporal patch takes its first frame's t)."""
        t = torch.as_tensor(t, dtype=torch.float32, device=self.patch_embedding.weight.device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.ndim == 1:
            return rearrange(t.expand(batch), "b -> b 1")
        if t.shape != (batch, frames):
            raise ValueError(f"per-frame t must be [B, T] = [{batch}, {frames}], got {list(t.shape)}")
        return t[:, :: self.patch_size[0]]  # frames in one temporal patch share a token, hence one t

    @property
    def causal(self) -> bool:
        return self.attention == "causal"

    def new_kv_cache(self) -> KVCache:
        """An empty `KVCache` for streaming this (causal) DiT chunk by chunk."""
        if not self.causal:
            raise ValueError("a KV cache needs a causal DiT (attention=causal); this one attends bidirectionally")
        return KVCache(len(self.blocks), self.window_chunks, self.sink_chunks)

    def self_attention_mask(self, frames: int, tokens_per_frame: int, device: torch.device,
                            num_audio: int = 0) -> torch.Tensor | None:
        """The block-causal mask over `frames` token frames, then `num_audio` audio tokens (None: full attention)."""
        if not self.causal:
            return None
        per_chunk = self.chunk_frames // self.patch_size[0]
        if frames % per_chunk:
            raise ValueError(f"{frames * self.patch_size[0]} latent frames are not whole chunks of chunk_frames="
                             f"{self.chunk_frames}")
        if num_audio:  # an audio token is in the chunk of the latent frame whose window it tiles
            return joint_block_causal_mask(frames // per_chunk, per_chunk * tokens_per_frame,
                                           num_audio // (frames // per_chunk), self.window_chunks, self.sink_chunks,
                                           device)
        return block_causal_mask(frames // per_chunk, per_chunk * tokens_per_frame, self.window_chunks,
                                 self.sink_chunks, device)

    def forward(self, z: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor | None = None, frame_offset: int = 0,
                kv_cache: KVCache | None = None, block_stack: BlockStack | None = None,
                audio: torch.Tensor | None = None, t_audio: torch.Tensor | None = None,
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Velocity `[B, C_out, T, H, W]` of latent z `[B, C, T, H, W]` at flow time t `[B]` or `[B, T]`.

        `frame_offset` shifts the temporal RoPE positions (a window that starts at latent frame `frame_offset`), the
        audio tokens' with the video's.
        `kv_cache` (causal DiT): z is ONE chunk (`chunk_frames` latent frames) at `frame_offset`; it attends to the
        cached earlier chunks and to itself, and leaves its keys/values pending for `kv_cache.commit`.
        `block_stack(x [B, N, D], mod [B, F', 6, D] | JointModulation, run) -> [B, N, D]` is called in place of
        `run(x)`, the blocks, and may skip them (a step cache, `vidgen.diffusion.step_cache`).
        `audio` `[B, Ca, Ta]`, Ta = T * audio_per_latent_frame (a DiT with audio_channels = Ca): audio latents at flow
        time `t_audio` `[B]` or `[B, Ta]` (None: t, which must then be per sample), joined to the video tokens
        (`vidgen.models.joint_audio`); the call then returns `(v, v_audio [B, Ca, Ta])`. Not with kv_cache or sp.
        """
        b, c, frames, height, width = z.shape
        pt, ph, pw = self.patch_size
        if c != self.in_channels or frames % pt or height % ph or width % pw:
            raise ValueError(f"latent {list(z.shape)} does not fit in_channels={self.in_channels}, "
                             f"patch_size={self.patch_size} (T, H, W must be multiples of the patch)")
        if audio is not None or t_audio is not None:
            self.check_audio(audio, b, frames, kv_cache)
        f, h, w = frames // pt, height // ph, width // pw

        x = self.patch_embedding(z)
        x = rearrange(x, "b d f h w -> b (f h w) d")  # tokens, frame-major
        if self.abs_pos:
            x = x + spatial_position_embedding(f, h, w, self.dim, x.device).to(x.dtype)
        temb, mod = self.condition_embedder.time(self.frame_times(t, b, frames))  # [B, F', D], [B, F', 6, D]
        context = self.condition_embedder.text_embedder(context)  # [B, L, D]
        if not self.text_mask:
            context_mask = None
        rope_cos, rope_sin = self.rope(f, h, w, offset=(frame_offset // pt, 0, 0), device=z.device)
        num_video, num_audio = x.shape[1], 0 if audio is None else audio.shape[2]
        if audio is not None:  # one joint sequence: the audio tokens after the video tokens
            x_audio, temb_audio, mod_audio, (cos_a, sin_a) = self.audio_tokens(audio, t, t_audio, h, w, frame_offset)
            x = torch.cat([x, x_audio], dim=1)  # [B, Nv + Ta, D]
            mod = JointModulation(mod, mod_audio, num_video)
            rope_cos, rope_sin = torch.cat([rope_cos, cos_a]), torch.cat([rope_sin, sin_a])  # [Nv + Ta, Dh/2]
        if kv_cache is not None:
            if not self.causal:
                raise ValueError("kv_cache given to a DiT with attention=full: only a causal DiT streams")
            if frames != self.chunk_frames:
                raise ValueError(f"with a kv_cache z must be one chunk of {self.chunk_frames} latent frame(s), "
                                 f"got {frames}")
            if self.sp is not None:
                raise ValueError("kv_cache streaming does not run sequence-parallel: turn it off with "
                                 "enable_sequence_parallel(dit, None)")
            attn_mask, caches = None, kv_cache.layers
        else:
            attn_mask, caches = self.self_attention_mask(f, h * w, z.device, num_audio), [None] * len(self.blocks)
        if self.sp is not None:  # this rank's tokens; attention exchanges them for heads, the mask stays whole
            start, end = self.sp.token_range(x.shape[1])
            x, rope_cos, rope_sin = x[:, start:end], rope_cos[start:end], rope_sin[start:end]  # [B, N/P, D], [N/P, ..]
            temb, mod = (local_frames(a, start, end, h * w) for a in (temb, mod))  # the frames of those tokens

        def run(x: torch.Tensor) -> torch.Tensor:  # the blocks, [B, N, D] -> [B, N, D]
            for block, cache in zip(self.blocks, caches):
                if self.gradient_checkpointing and torch.is_grad_enabled():
                    x = checkpoint(block, x, context, context_mask, mod, rope_cos, rope_sin, attn_mask, cache,
                                   use_reentrant=False)
                else:
                    x = block(x, context, context_mask, mod, rope_cos, rope_sin, attn_mask, cache)
            return x

        x = run(x) if block_stack is None else block_stack(x, mod, run)
        if audio is not None:
            x, x_audio = x[:, :num_video], x[:, num_video:]  # [B, Nv, D], [B, Ta, D]

        shift, scale = (self.scale_shift_table[:, None] + temb[:, :, None]).unbind(dim=2)  # [B, F', D] each
        x = modulate(self.norm_out(x.float()), shift, scale).type_as(x)
        x = self.proj_out(x)  # [B, N, pt*ph*pw*C_out]
        if self.sp is not None:
            x = self.sp.gather_tokens(x)  # [B, N/P, ..] on each rank -> [B, N, ..] on every rank
        v = rearrange(x, "b (f h w) (pt ph pw c) -> b c (f pt) (h ph) (w pw)", f=f, h=h, w=w, pt=pt, ph=ph, pw=pw)
        return v if audio is None else (v, self.audio_stream.head(x_audio, temb_audio))

    def check_audio(self, audio: torch.Tensor | None, batch: int, frames: int, kv_cache: KVCache | None) -> None:
        """Refuse, with one clear line, audio that this DiT or this call cannot take."""
        if audio is None:
            raise ValueError("t_audio given without audio: pass audio [B, Ca, Ta] too, or neither")
        if self.audio_stream is None:
            raise ValueError("audio given to a DiT with audio_channels=0 (no audio stream): build it with "
                             "audio_channels = the audio latent channels")
        if kv_cache is not None:
            raise ValueError("audio does not stream: a kv_cache (chunk by chunk) forward takes no audio; generate "
                             "joint audio + video as whole clips")
        if self.sp is not None:
            raise ValueError("audio does not run sequence-parallel: turn it off with enable_sequence_parallel(dit, "
                             "None)")
        self.audio_stream.check(audio, batch, frames)

    def audio_tokens(self, audio: torch.Tensor, t: torch.Tensor, t_audio: torch.Tensor | None, height: int,
                     width: int, frame_offset: int,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Audio `[B, Ca, Ta]` -> its tokens `[B, Ta, D]`, time embedding `[B, Ta | 1, D]`, modulation
        `[B, Ta | 1, 6, D]` and RoPE (cos, sin) `[Ta, Dh/2]` beside a video token grid height x width."""
        b, _, num_audio = audio.shape
        temb, mod = self.condition_embedder.time(audio_times(t, t_audio, b, num_audio, audio.device))
        pt = self.patch_size[0]
        positions = self.audio_stream.rope_positions(num_audio, height, width, pt, frame_offset // pt, audio.device)
        return self.audio_stream.embed(audio), temb, mod, self.rope.at(positions)
