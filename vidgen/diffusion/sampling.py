"""Samplers for the rectified-flow ODE dx/dt = v(x, t), integrated from t = 1 (noise) to t = 0 (data).

k-diffusion style (Crowson): every sampler is a plain function over ONE denoise contract

    fn(x [B, ...], t [B]) -> v [B, ...]        (t = the current sigma, one per sample)

and `sigmas` is a decreasing schedule ending at 0 from `timesteps(steps, shift)`. Clean-frame conditioning
(image-to-video: 1 frame, extension: k frames) wraps `fn` with `hold_clean_frames`: those frames are pinned to
the given latents at t = 0 (the DiT's per-frame t path) and get zero velocity, so every sampler leaves them
exactly unchanged. `generate` composes the pieces: seeded noise -> schedule -> CFG -> clean frames -> sampler,
calling `RectifiedFlow.velocity`, the same denoiser call the training loss uses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import trange

from vidgen.diffusion.flow import RectifiedFlow, num_latent_tokens, time_shift
from vidgen.diffusion.guidance import ClassifierFreeGuidance

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[dict[str, Any]], None]


def timesteps(steps: int, shift: float = 1.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Shifted schedule `[steps + 1]` float32 from 1 to 0, equal to diffusers' FlowMatchEulerDiscreteScheduler.

    As diffusers does: linearly spaced between 1 and sigma_min = shift(1 / num_train_timesteps), then mapped by
    `time_shift(., shift)` (SD3 Sec. 5.3.2), then a final 0. diffusers' `timesteps` are `sigmas[:-1] * 1000`.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    # sigma_min exactly as the scheduler's constructor computes it (float32), then float64 like its numpy path.
    sigma_min = time_shift(torch.tensor(1.0) / num_train_timesteps, shift).item()
    sigmas = torch.linspace(1.0, sigma_min, steps, dtype=torch.float64)
    sigmas = time_shift(sigmas, shift).float()
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def sample_euler(fn: Denoise, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback | None = None,
                 progress: bool = False) -> torch.Tensor:
    """Euler steps x <- x + (sigma_next - sigma) v on the flow ODE; x `[B, ...]` -> x at sigmas[-1]."""
    s_in = x.new_ones(x.shape[0])
    sig = sigmas.tolist()
    for i in trange(len(sig) - 1, disable=not progress, desc="euler"):
        v = fn(x, sig[i] * s_in)
        if callback is not None:
            callback({"i": i, "x": x, "t": sig[i], "v": v})
        x = x + (sig[i + 1] - sig[i]) * v
    return x


def sample_heun(fn: Denoise, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback | None = None,
                progress: bool = False) -> torch.Tensor:
    """Heun (trapezoidal predictor-corrector, Karras et al. 2022 Alg. 1) on the flow ODE; Euler for a final step
    to t = 0, where the velocity is undefined for a second evaluation. x `[B, ...]` -> x at sigmas[-1]."""
    s_in = x.new_ones(x.shape[0])
    sig = sigmas.tolist()
    for i in trange(len(sig) - 1, disable=not progress, desc="heun"):
        v = fn(x, sig[i] * s_in)
        if callback is not None:
            callback({"i": i, "x": x, "t": sig[i], "v": v})
        dt = sig[i + 1] - sig[i]
        x_euler = x + dt * v
        if sig[i + 1] == 0:
            x = x_euler
        else:
            x = x + dt * 0.5 * (v + fn(x_euler, sig[i + 1] * s_in))
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {"euler": sample_euler, "heun": sample_heun}


def hold_clean_frames(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], clean: torch.Tensor) -> Denoise:
    """Wrap `fn(x, t [B, T]) -> v` so latent frames [0:k] are pinned to `clean` `[B, C, k, H, W]` at t = 0.

    The wrapped function takes t `[B]` (the sampler's sigma) and gives the network per-frame t `[B, T]`
    (0 for the clean frames); their velocity is returned as 0 so the ODE step keeps them bit-exact.
    """
    k = clean.shape[2]

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b, frames = x.shape[0], x.shape[2]
        x = torch.cat([clean.to(x), x[:, :, k:]], dim=2)
        t_frames = torch.cat([t.new_zeros(b, k), t[:, None].expand(b, frames - k)], dim=1)  # [B, T]
        v = fn(x, t_frames)
        return torch.cat([torch.zeros_like(v[:, :, :k]), v[:, :, k:]], dim=2)

    return denoise


def seeded_noise(shape: Sequence[int], seed: int | Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal `[B, ...]` float32; sample i from a CPU generator seeded seed[i] (or seed + i)."""
    b = shape[0]
    seeds = [seed + i for i in range(b)] if isinstance(seed, int) else list(seed)
    if len(seeds) != b:
        raise ValueError(f"{len(seeds)} seeds for a batch of {b}")
    noise = [torch.randn(tuple(shape[1:]), generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
    return torch.stack(noise).to(device)


def _to_batch(cond: dict[str, Any], batch: int, device: torch.device) -> dict[str, Any]:
    """Move tensors of a conditioning dict to `device` and broadcast a batch of 1 to `batch`."""
    out = {}
    for key, v in cond.items():
        if torch.is_tensor(v):
            v = v.to(device)
            if v.shape[0] == 1 and batch > 1:
                v = v.expand(batch, *v.shape[1:])
            elif v.shape[0] != batch:
                raise ValueError(f"conditioning {key!r} has batch {v.shape[0]}, expected {batch} (or 1)")
        out[key] = v
    return out


@torch.no_grad()
def generate(model: torch.nn.Module, text_cond: dict[str, Any], neg_cond: dict[str, Any] | None,
             shape: Sequence[int], steps: int = 50, guidance: float = 5.0, shift: float | None = 5.0,
             sampler: str = "euler", seed: int | Sequence[int] = 0, clean_latents: torch.Tensor | None = None,
             num_clean: int = 0, progress: bool = True, flow: RectifiedFlow | None = None,
             callback: Callback | None = None) -> torch.Tensor:
    """Sample latents z0 `[B, C, T, H, W]` = `shape` from text; the one high-level entry for sample.py / callbacks.

    text_cond / neg_cond: model keyword tensors, e.g. {"context": [B|1, L, D], "context_mask": [B|1, L]};
    neg_cond None or guidance == 1 disables CFG. shift None: resolution-dependent `flow.shift_for(tokens)`.
    seed: int (sample i uses seed + i) or one seed per sample. clean_latents `[B, C, >=k, H, W]` with
    num_clean = k: frames [0:k] are given (image-to-video k = 1, extension k > 1) and returned unchanged.
    Runs under no_grad in the model's current mode and dtype of its parameters' device; use autocast for bf16.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r}; expected one of {sorted(SAMPLERS)}")
    flow = flow or RectifiedFlow()
    device = next(model.parameters()).device
    b = shape[0]
    if shift is None:
        shift = flow.shift_for(num_latent_tokens(shape, getattr(model, "patch_size", (1, 1, 1))))
    cond = _to_batch(text_cond, b, device)
    uncond = _to_batch(neg_cond, 1 if _batch(neg_cond) == 1 else b, device) \
        if neg_cond is not None and guidance != 1.0 else None
    cfg = ClassifierFreeGuidance(guidance)

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return cfg(lambda x_, t_, c_: flow.velocity(model, x_, t_, c_), x, t, cond, uncond)

    x = seeded_noise(shape, seed, device)
    if num_clean > 0:
        if clean_latents is None or clean_latents.shape[2] < num_clean:
            raise ValueError(f"num_clean={num_clean} needs clean_latents with at least {num_clean} frames")
        clean = clean_latents[:, :, :num_clean].to(device=device, dtype=x.dtype)
        if clean.shape[0] == 1 and b > 1:
            clean = clean.expand(b, *clean.shape[1:])
        if clean.shape[:2] != x.shape[:2] or clean.shape[3:] != x.shape[3:]:
            raise ValueError(f"clean_latents {list(clean_latents.shape)} do not match shape {list(shape)}")
        x = torch.cat([clean, x[:, :, num_clean:]], dim=2)
        fn = hold_clean_frames(fn, clean)
    return SAMPLERS[sampler](fn, x, timesteps(steps, shift).to(device), callback=callback, progress=progress)


def _batch(cond: dict[str, Any]) -> int:
    """Batch size of the first tensor in a conditioning dict."""
    return next(v.shape[0] for v in cond.values() if torch.is_tensor(v))
