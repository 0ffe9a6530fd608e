"""Streaming generation of any length with a causal DiT: chunk by chunk over a KV cache of the clean past.

    for index, z in stream_chunks(denoiser, prompts, num_chunks, chunk_shape, steps=25, guider=cfg, seed=0):
        ...   # z [B, C, chunk_frames, h, w]: chunk `index`, final (decode it, write it, drop it)

Each chunk starts from its own seeded noise (seed, chunk index), is integrated by the usual sampler through
`Denoiser.__call__` (the same network call and CFG as every other mode) with the cache passed as conditioning,
and is then run once more clean at t = 0 so that its keys/values enter the cache (CausVid / Self-Forcing
practice: later chunks see the clean past, as the clean-frame rule gives it in training). The cache keeps only
what later chunks can see (sliding window + sink chunks), so memory and time per chunk stay flat.

Prompt schedule: `prompts` is a list of `PromptSegment(start_chunk, cond, uncond)`. At a switch the cache is
emptied and re-filled by running the cached chunks' clean latents again under the new text (LongLive's KV
re-cache, Yang et al. 2025), so the next chunk continues the same frames under the new prompt instead of cutting.
Chunks before a switch are computed before it and do not depend on it. Extension: `context` latents (a clip's)
are pushed through the cache first, chunk by chunk, and generation continues after them.

A distilled streaming student (`sampler="dmd"`, trained on its own rollouts: `self_forcing_rollout`, Self-Forcing)
runs the same loop with its few-step schedule and no guidance.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vidgen.diffusion.denoiser import Denoiser
from vidgen.diffusion.distill import student_rollout
from vidgen.diffusion.sampling import SAMPLERS, _to_batch, sampler_start, seeded_noise

Cond = dict[str, Any]

# Chunk c of sample i starts from noise seeded by seed_i * CHUNK_SEED_STRIDE + c: independent of every other choice.
CHUNK_SEED_STRIDE = 1_000_003


@dataclass
class PromptSegment:
    """From chunk `start_chunk` on, condition on `cond` (and `uncond` for CFG, or None)."""

    start_chunk: int
    cond: Cond
    uncond: Cond | None = None


def chunk_seeds(seed: int | Sequence[int], batch: int, chunk: int) -> list[int]:
    """The noise seeds of chunk `chunk` for a batch: one per sample (`seed + i` for an int seed)."""
    seeds = [seed + i for i in range(batch)] if isinstance(seed, int) else [int(s) for s in seed]
    return [s * CHUNK_SEED_STRIDE + chunk for s in seeds]


def _with_cache(cond: Cond | None, cache: Any, offset: int) -> Cond | None:
    return None if cond is None else {**cond, "kv_cache": cache, "frame_offset": offset}


@torch.no_grad()
def stream_chunks(denoiser: Denoiser, prompts: Sequence[PromptSegment], num_chunks: int,
                  chunk_shape: Sequence[int], steps: int = 25, guider: Any = None, shift: float = 1.0,
                  sampler: str = "euler", seed: int | Sequence[int] = 0, context: torch.Tensor | None = None,
                  cache: Any = None, context_t: float = 0.0) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield `(chunk index, latents [B, C, chunk_frames, h, w])` for chunks `n0 .. n0 + num_chunks - 1`.

    denoiser.net: a causal DiT (`new_kv_cache`, `chunk_frames`); chunk_shape: `[B, C, chunk_frames, h, w]`;
    prompts: sorted by `start_chunk`, the first at or before chunk n0 (tensors already on the net's device, batch
    B or 1); guider: e.g. `ClassifierFreeGuidance` (with each segment's uncond), None: conditional only;
    context: clean latents `[B|1, C, n0 * chunk_frames, h, w]` to continue (extension), pushed through the cache
    first (n0 = their chunks; not yielded); cache: an existing `KVCache` (None: a new one).
    context_t: the past enters the cache noised to this flow time (0: clean). A little noise on the context
    (Diffusion Forcing, Chen et al. 2024, Sec. 3.3; SkyReels-V2) hides the small errors of generated chunks that a
    model trained on real clean context would otherwise amplify chunk after chunk; the model saw such noisy past
    chunks in training (independent t per chunk). The noise is seeded per chunk, so re-caching repeats it.
    """
    net = denoiser.net
    if not getattr(net, "causal", False):
        raise ValueError("streaming needs a causal DiT (attention=causal, e.g. experiment=quickstart_stream); this "
                         "checkpoint's DiT attends bidirectionally over its whole window")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r}; expected one of {sorted(SAMPLERS)}")
    if not prompts:
        raise ValueError("stream_chunks: no prompt")
    b, frames = chunk_shape[0], net.chunk_frames
    if chunk_shape[2] != frames:
        raise ValueError(f"chunk_shape {list(chunk_shape)}: a chunk is {frames} latent frame(s)")
    device = next(net.parameters()).device
    segments = [PromptSegment(p.start_chunk, _to_batch(p.cond, b, device),
                              None if p.uncond is None else _to_batch(p.uncond, b, device))
                for p in sorted(prompts, key=lambda p: p.start_chunk)]
    cache = net.new_kv_cache() if cache is None else cache
    kept: dict[int, torch.Tensor] = {}  # clean latents of the chunks in the cache (re-cached at a prompt switch)

    def segment_at(chunk: int) -> PromptSegment:
        current = [s for s in segments if s.start_chunk <= chunk]
        return current[-1] if current else segments[0]

    def call(x: torch.Tensor, t: torch.Tensor, seg: PromptSegment, chunk: int) -> torch.Tensor:
        off = chunk * frames
        return denoiser(x, t, _with_cache(seg.cond, cache, off), uncond=_with_cache(seg.uncond, cache, off),
                        guider=guider if seg.uncond is not None else None)

    def push(z: torch.Tensor, seg: PromptSegment, chunk: int) -> None:
        """Run clean chunk `chunk` (noised to `context_t`) so its keys/values enter the cache."""
        x, t = z, torch.full((z.shape[0],), float(context_t), device=z.device)
        if context_t > 0:
            noise = seeded_noise(z.shape, [s + CHUNK_SEED_STRIDE // 2 for s in chunk_seeds(seed, b, chunk)], z.device)
            x = denoiser.flow.add_noise(z, noise, t)
        call(x, t, seg, chunk)
        cache.commit(chunk)
        kept[chunk] = z
        for old in [i for i in kept if i not in cache.cached_chunks]:
            del kept[old]

    n0 = 0
    if context is not None:
        if context.shape[2] % frames:
            raise ValueError(f"context has {context.shape[2]} latent frames, not whole chunks of {frames}")
        for i, z in enumerate(context.split(frames, dim=2)):
            push(z.expand(b, *z.shape[1:]).to(device), segment_at(i), i)
        n0 = context.shape[2] // frames
    active = segment_at(n0)
    for chunk in range(n0, n0 + num_chunks):
        seg = segment_at(chunk)
        if seg is not active:  # prompt switch: re-fill the cache with the kept clean chunks under the new text
            active = seg
            cache.reset()
            for i, z in sorted(kept.items()):
                push(z, seg, i)
        x, sigmas, extra = sampler_start(sampler, steps, shift, chunk_shape, chunk_seeds(seed, b, chunk), device)
        z = SAMPLERS[sampler](lambda x_, t_: call(x_, t_, seg, chunk), x, sigmas, **extra)
        push(z, seg, chunk)
        yield chunk, z


def self_forcing_rollout(denoiser: Denoiser, cond: Cond, noise: torch.Tensor, sigmas: torch.Tensor,
                         renoise: torch.Tensor, exit_steps: Sequence[int]) -> torch.Tensor:
    """A causal student's own streamed clip, as `stream_chunks` with `sampler="dmd"` makes it (Self-Forcing, Huang
    et al. 2025): x0 `[B, C, T, H, W]` with gradients through one step per chunk.

    Chunk by chunk over a KV cache: chunk c runs the student's schedule `sigmas` (`student_rollout`: no gradients
    before step `exit_steps[c]`, that step's x0 prediction with them), then its (detached) x0 enters the cache by
    one clean pass (t = 0), so later chunks are conditioned on what the student itself
    generated, not on real frames: the exposure bias of training on real context is gone (Self-Forcing Sec. 3).
    noise `[B, C, T, H, W]`, renoise `[steps - 1, B, C, T, H, W]`. With every exit step the last one and the noises
    `stream_chunks` draws, this is `stream_chunks(sampler="dmd")` exactly (tests/test_distill.py).
    """
    net = denoiser.net
    frames = net.chunk_frames
    if noise.shape[2] % frames:
        raise ValueError(f"{noise.shape[2]} latent frames are not whole chunks of chunk_frames={frames}")
    cache, chunks = net.new_kv_cache(), []
    for c, sl in enumerate(range(0, noise.shape[2], frames)):
        part = slice(sl, sl + frames)
        chunk_cond = _with_cache(cond, cache, sl)
        z = student_rollout(lambda x, t: denoiser(x, t, chunk_cond), noise[:, :, part], sigmas,
                            renoise[:, :, :, part], int(exit_steps[c]))
        with torch.no_grad():  # the clean pass that puts this chunk's keys/values in the cache
            denoiser(z.detach(), torch.zeros(z.shape[0], device=z.device), chunk_cond)
            cache.commit(c)
        chunks.append(z)
    return torch.cat(chunks, dim=2)
