"""Samplers for the rectified-flow ODE dx/dt = v(x, t), integrated from t = 1 (noise) to t = 0 (data).

k-diffusion style (Crowson): every sampler is a plain function over ONE denoise contract

    fn(x [B, ...], t [B]) -> v [B, ...]        (t = the current sigma, one per sample)

and `sigmas` is a decreasing schedule ending at 0 from `timesteps(steps, shift)`. `generate` composes the
pieces: seeded noise -> schedule -> sampler over `Denoiser.__call__` (clean frames, CFG), the same network
call and clean-frame rule that `Denoiser.loss` trains.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import trange

from vidgen.diffusion.denoiser import Denoiser
from vidgen.diffusion.flow import num_latent_tokens, time_shift
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
def generate(denoiser: Denoiser, cond: dict[str, Any], shape: Sequence[int], steps: int = 50,
             guider: ClassifierFreeGuidance | None = None, uncond: dict[str, Any] | None = None,
             shift: float | None = None, sampler: str = "euler", seed: int | Sequence[int] = 0,
             clean: torch.Tensor | None = None, clean_mask: torch.Tensor | None = None, progress: bool = False,
             callback: Callback | None = None, start: torch.Tensor | None = None,
             strength: float = 1.0) -> torch.Tensor:
    """Sample latents z0 `[B, C, T, H, W]` = `shape`: seeded noise -> shifted schedule -> sampler over `denoiser`.

    cond / uncond: the conditioner's keyword tensors (batch B or 1); `guider` (e.g. CFG) combines them, None
    or uncond None: the conditional branch alone. shift None: the resolution-dependent `flow.shift_for(tokens)`
    the denoiser trained with. clean `[B|1, C, T, H, W]` + clean_mask bool `[B|1, T]`: frames given
    (image-to-video, extension) and returned unchanged. seed: int (sample i uses seed + i) or one per sample.
    start `[B|1, C, T, H, W]` + strength in [0, 1] (remix, SDEdit, Meng et al. 2022): start noised to t = strength
    with the seeded noise, then only the schedule's steps below it; strength 1 is text-to-video from the same
    noise, strength 0 returns `start`.
    Runs in the network's current mode, on its device; wrap in autocast for bf16.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r}; expected one of {sorted(SAMPLERS)}")
    device = next(denoiser.net.parameters()).device
    b = shape[0]
    if shift is None:
        shift = denoiser.flow.shift_for(num_latent_tokens(shape, denoiser.patch_size))
    cond = _to_batch(cond, b, device)
    if uncond is not None:
        uncond = _to_batch(uncond, 1 if _batch(uncond) == 1 else b, device)
    if uncond is None or guider is None:
        guider = uncond = None
    x = seeded_noise(shape, seed, device)
    if clean_mask is not None:
        if clean is None:
            raise ValueError("clean_mask needs the clean latents (clean=...)")
        clean = clean.to(device=device, dtype=x.dtype)
        clean_mask = clean_mask.to(device).bool()
        if clean.shape[1:] != x.shape[1:]:
            raise ValueError(f"clean latents {list(clean.shape)} do not match shape {list(shape)}")
        x = torch.where(clean_mask.expand(b, shape[2])[:, None, :, None, None], clean.expand_as(x), x)

    sigmas = timesteps(steps, shift).to(device)
    if start is not None and strength < 1.0:
        if not strength >= 0.0:
            raise ValueError(f"strength={strength}: expected a value in [0, 1]")
        x = denoiser.flow.add_noise(start.to(device=device, dtype=x.dtype).expand_as(x), x,
                                    torch.full((b,), float(strength), device=device))
        sigmas = torch.cat([sigmas.new_tensor([strength]), sigmas[sigmas < strength]])

    def fn(x_: torch.Tensor, t_: torch.Tensor) -> torch.Tensor:
        return denoiser(x_, t_, cond, clean=clean, clean_mask=clean_mask, uncond=uncond, guider=guider)

    return SAMPLERS[sampler](fn, x, sigmas, callback=callback, progress=progress)


def _batch(cond: dict[str, Any]) -> int:
    """Batch size of the first tensor in a conditioning dict."""
    return next(v.shape[0] for v in cond.values() if torch.is_tensor(v))
