"""Samplers for the rectified-flow ODE dx/dt = v(x, t), integrated from t = 1 (noise) to t = 0 (data).

k-diffusion style (Crowson): every sampler is a plain function over ONE denoise contract

    fn(x [B, ...], t [B]) -> v [B, ...]        (t = the current sigma, one per sample)

and `sigmas` is a decreasing schedule ending at 0 from `timesteps(steps, shift)`. `generate` composes the
pieces: seeded noise -> schedule -> sampler over `Denoiser.__call__` (clean frames, CFG), the same network
call and clean-frame rule that `Denoiser.loss` trains.

Joint audio + video (`generate(..., audio_shape=)`): the video and audio latents are packed into one flat `[B, N]`
tensor (`vidgen.diffusion.denoiser.JointLayout`), which every sampler integrates as its x unchanged.

Samplers: `euler`, `heun` (one and two calls per step), and the multistep solvers `dpmpp_2m` and `unipc` (one call
per step, second order from the previous step's prediction); `dmd`, a distilled student's few-step schedule and
backward simulation (x0 prediction, then re-noising with seeded noise; `vidgen.diffusion.distill`). The multistep
solvers integrate in the half log-SNR lambda = log(alpha_t / sigma_t) with the flow's alpha_t = 1 - t, sigma_t = t
(x_t = alpha_t x0 + sigma_t eps), on the data prediction x0 = x_t - t v; they equal diffusers'
`DPMSolverMultistepScheduler` / `UniPCMultistepScheduler` with `use_flow_sigmas=True,
prediction_type="flow_prediction"` (Wan 2.1's scheduler) run over the same sigmas
(tests/test_solvers.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import trange

from vidgen.diffusion.denoiser import Denoiser, JointLayout
from vidgen.diffusion.distill import sample_dmd, student_timesteps
from vidgen.diffusion.flow import RectifiedFlow, num_latent_tokens, time_shift
from vidgen.diffusion.guidance import ClassifierFreeGuidance
from vidgen.diffusion.step_cache import StepCache

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


def half_log_snr(t: torch.Tensor) -> torch.Tensor:
    """lambda = log(alpha_t / sigma_t) = log((1 - t) / t) of the flow, any shape: -inf at t = 1, +inf at t = 0."""
    return torch.log(1 - t) - torch.log(t)


def sample_dpmpp_2m(fn: Denoise, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback | None = None,
                    progress: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2) on the flow ODE; x `[B, ...]` -> x at sigmas[-1].

    Each step is the exact exponential integrator of the data prediction x0 = x - t v held linear in lambda:
    x <- (sigma_t / sigma_s) x - alpha_t (e^-h - 1) (D0 + D1 / 2), h = lambda_t - lambda_s, D0 = x0_i,
    D1 = (x0_i - x0_{i-1}) / r, r = (lambda_s - lambda_{i-1}) / h. The first step has no history and the last one
    is first order (D1 = 0), as diffusers does with `lower_order_final` / `final_sigmas_type="zero"`: into t = 0
    (lambda = inf) the step is x <- x0. From t = 1 (lambda = -inf) the next step's r is inf, so its D1 is 0.
    Coefficients in float32 on the CPU from `sigmas`, in diffusers' order of operations.
    """
    sig = sigmas.detach().float().cpu()
    s_in = x.new_ones(x.shape[0])
    n = len(sig) - 1
    x0_prev = None
    for i in trange(n, disable=not progress, desc="dpmpp_2m"):
        s, t = sig[i], sig[i + 1]
        v = fn(x, s.item() * s_in)
        if callback is not None:
            callback({"i": i, "x": x, "t": s.item(), "v": v})
        x0 = RectifiedFlow.predict_x0(x, s, v)
        h = half_log_snr(t) - half_log_snr(s)
        phi = (1 - t) * (torch.exp(-h) - 1.0)  # alpha_t (e^-h - 1)
        x = (t / s) * x - phi * x0
        if x0_prev is not None and i < n - 1:
            r = (half_log_snr(s) - half_log_snr(sig[i - 1])) / h
            x = x - (0.5 * phi) * ((1.0 / r) * (x0 - x0_prev))
        x0_prev = x0
    return x


def _unipc_step(x: torch.Tensor, t: torch.Tensor, s0: torch.Tensor, x0_s0: torch.Tensor, s1: torch.Tensor | None,
                x0_s1: torch.Tensor | None, x0_t: torch.Tensor | None) -> torch.Tensor:
    """One UniPC-bh2 update of x `[B, ...]` from noise level s0 to t (Zhao et al. 2023, data prediction).

    x0_s0: the data prediction at s0; x0_s1 (at the level s1 before s0, or None): makes it second order;
    x0_t (at t, or None): makes it the corrector UniC, which re-integrates the step s0 -> t from the same x with the
    prediction at t as well (no extra network call: it is the one the next step uses).
    """
    h = half_log_snr(t) - half_log_snr(s0)
    b_h = h_phi_1 = torch.expm1(-h)  # B(h) = e^-h - 1 ("bh2"), and h phi_1(h) of the exponential integrator
    x_t = t / s0 * x - (1 - t) * h_phi_1 * x0_s0  # DDIM / DPM-Solver++(1)
    if x0_s1 is not None:
        r = (half_log_snr(s1) - half_log_snr(s0)) / h
        d1 = (x0_s1 - x0_s0) / r
    if x0_t is None:  # UniP: order 2 with the paper's rho = 1/2
        return x_t if x0_s1 is None else x_t - (1 - t) * b_h * (0.5 * d1)
    if x0_s1 is None:  # UniC-1: rho = 1/2
        return x_t - (1 - t) * b_h * (0.5 * (x0_t - x0_s0))
    # UniC-2: rho solves R rho = g / B(h), R = [[1, 1], [r, 1]] (the paper's Vandermonde system),
    # g_k = k! h phi_{k+1}(h) built by phi_{k+1} = (phi_k - 1/k!) / h.
    g1 = h_phi_1 / -h - 1
    g2 = g1 / -h - 0.5
    rho = torch.linalg.solve(torch.stack([torch.ones(2), torch.stack([r, torch.ones(())])]),
                             torch.stack([g1 / b_h, g2 * 2 / b_h]))
    return x_t - (1 - t) * b_h * (rho[0] * d1 + rho[1] * (x0_t - x0_s0))


def sample_unipc(fn: Denoise, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback | None = None,
                 progress: bool = False) -> torch.Tensor:
    """UniPC (Zhao et al. 2023, "UniPC"), bh2, order 2 predictor + corrector, data prediction, on the flow ODE:
    Wan 2.1's default sampler (diffusers' UniPCMultistepScheduler). x `[B, ...]` -> x at sigmas[-1].

    Step i calls fn once at x_i, corrects x_i with that prediction (UniC, the order of the previous predictor), then
    predicts x_{i+1} (UniP, order 2, order 1 on the first and the last step: `lower_order_final`; into t = 0 that
    step is x <- x0). As diffusers does, a first sigma within 1e-6 of 1 is lowered by 1e-6, where lambda = -inf
    would make the order-2 system singular.
    """
    sig = sigmas.detach().float().cpu().clone()
    if abs(sig[0].item() - 1) < 1e-6:
        sig[0] -= 1e-6
    s_in = x.new_ones(x.shape[0])
    n = len(sig) - 1
    x_prev = x0_prev = x0_prev2 = None  # x_{i-1} before its predictor; x0 at steps i-1, i-2
    for i in trange(n, disable=not progress, desc="unipc"):
        v = fn(x, sig[i].item() * s_in)
        if callback is not None:
            callback({"i": i, "x": x, "t": sig[i].item(), "v": v})
        x0 = RectifiedFlow.predict_x0(x, sig[i], v)
        if i > 0:  # the corrector has the order of the predictor of step i - 1
            x = _unipc_step(x_prev, sig[i], sig[i - 1], x0_prev, sig[i - 2] if x0_prev2 is not None else None,
                            x0_prev2, x0)
        second = 0 < i < n - 1
        x_prev = x
        x = _unipc_step(x, sig[i + 1], sig[i], x0, sig[i - 1] if second else None, x0_prev if second else None, None)
        x0_prev2, x0_prev = (x0_prev if second else None), x0
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {"euler": sample_euler, "heun": sample_heun,
                                                    "dpmpp_2m": sample_dpmpp_2m, "unipc": sample_unipc,
                                                    "dmd": sample_dmd}


def seeded_noise(shape: Sequence[int], seed: int | Sequence[int], device: torch.device | str = "cpu",
                 draws: int | None = None) -> torch.Tensor:
    """Standard normal `[B, ...]` float32; sample i from a CPU generator seeded seed[i] (or seed + i).

    draws: `[draws, B, ...]`, the successive draws of each sample's generator (the first is the `[B, ...]` noise of
    draws=None; the others are the `dmd` sampler's re-noising).
    """
    b = shape[0]
    seeds = [seed + i for i in range(b)] if isinstance(seed, int) else list(seed)
    if len(seeds) != b:
        raise ValueError(f"{len(seeds)} seeds for a batch of {b}")
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    noise = torch.stack([torch.stack([torch.randn(tuple(shape[1:]), generator=g) for g in gens])
                         for _ in range(draws or 1)])
    return (noise if draws else noise[0]).to(device)


def seeded_joint_noise(shape: Sequence[int], audio_shape: Sequence[int], seed: int | Sequence[int],
                       device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(video noise `shape`, audio noise `audio_shape`) float32; sample i's generator (seed[i] or seed + i) draws its
    video noise first, exactly `seeded_noise`'s, then its audio noise: a seed gives the same video noise with sound
    or without."""
    b = shape[0]
    seeds = [seed + i for i in range(b)] if isinstance(seed, int) else list(seed)
    if len(seeds) != b:
        raise ValueError(f"{len(seeds)} seeds for a batch of {b}")
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    pairs = [(torch.randn(tuple(shape[1:]), generator=g), torch.randn(tuple(audio_shape[1:]), generator=g))
             for g in gens]
    return torch.stack([p[0] for p in pairs]).to(device), torch.stack([p[1] for p in pairs]).to(device)


def sampler_start(sampler: str, steps: int, shift: float, shape: Sequence[int], seed: int | Sequence[int],
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(seeded noise x `shape`, sigmas `[steps + 1]`, the sampler's extra arguments) for `steps` steps of `sampler`.

    Every sampler runs the shifted schedule `timesteps(steps, shift)` from one noise draw, except `dmd` (a
    distilled student): its own `student_timesteps` and `steps - 1` more draws of each sample's generator for the
    re-noising between its steps.
    """
    if sampler != "dmd":
        return seeded_noise(shape, seed, device), timesteps(steps, shift).to(device), {}
    noise = seeded_noise(shape, seed, device, draws=steps)
    return noise[0], student_timesteps(steps, shift).to(device), {"renoise": noise[1:]}


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
             strength: float = 1.0, step_cache: float | None = None, audio_shape: Sequence[int] | None = None,
             audio_clean: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sample latents z0 `[B, C, T, H, W]` = `shape`: seeded noise -> shifted schedule -> sampler over `denoiser`.

    cond / uncond: the conditioner's keyword tensors (batch B or 1); `guider` (e.g. CFG) combines them, None
    or uncond None: the conditional branch alone. shift None: the resolution-dependent `flow.shift_for(tokens)`
    the denoiser trained with. clean `[B|1, C, T, H, W]` + clean_mask bool `[B|1, T]`: frames given
    (image-to-video, extension) and returned unchanged. seed: int (sample i uses seed + i) or one per sample.
    start `[B|1, C, T, H, W]` + strength in [0, 1] (remix, SDEdit, Meng et al. 2022): start noised to t = strength
    with the seeded noise, then only the schedule's steps below it; strength 1 is text-to-video from the same
    noise, strength 0 returns `start`. step_cache: a `StepCache` threshold (TeaCache): steps whose DiT input barely
    changed reuse the blocks' last residual (0: never skips, the same result as None; None: off).
    audio_shape `[B, Ca, Ta]` (a DiT with an audio stream): video and audio latents integrated together, packed in
    one tensor (`JointLayout`), CFG on both; returns (z0, a0 `[B, Ca, Ta]`). Video-to-audio: clean = the video's
    latents, clean_mask all True; audio-to-video: audio_clean `[B|1, Ca, Ta]`, returned unchanged.
    Runs in the network's current mode, on its device; wrap in autocast for bf16.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r}; expected one of {sorted(SAMPLERS)}")
    if audio_shape is not None:
        return _generate_joint(denoiser, cond, shape, audio_shape, steps, guider, uncond, shift, sampler, seed, clean,
                               clean_mask, audio_clean, progress, callback, start, step_cache)
    if audio_clean is not None:
        raise ValueError("audio_clean needs audio_shape (the audio latents' [B, Ca, Ta])")
    device = next(denoiser.net.parameters()).device
    b = shape[0]
    if shift is None:
        shift = denoiser.flow.shift_for(num_latent_tokens(shape, denoiser.patch_size))
    cond, uncond, guider = _conds(cond, uncond, guider, b, device)
    if sampler == "dmd" and clean_mask is not None:  # its re-noising would noise the given frames
        raise ValueError("sampler=dmd: a distilled student samples text-to-video only (no image or clip to hold)")
    x, sigmas, extra = sampler_start(sampler, steps, shift, shape, seed, device)
    if clean_mask is not None:
        clean, clean_mask = _clean(clean, clean_mask, shape, device, x.dtype)
        x = torch.where(clean_mask.expand(b, shape[2])[:, None, :, None, None], clean.expand_as(x), x)

    sigmas = sigmas.to(device)
    if step_cache is not None:  # a fresh cache per run; the last step always runs the blocks (as TeaCache)
        denoiser = Denoiser(StepCache(denoiser.net, step_cache, last_t=sigmas[-2].item()), denoiser.flow)
    if start is not None and strength < 1.0:
        if not strength >= 0.0:
            raise ValueError(f"strength={strength}: expected a value in [0, 1]")
        x = denoiser.flow.add_noise(start.to(device=device, dtype=x.dtype).expand_as(x), x,
                                    torch.full((b,), float(strength), device=device))
        sigmas = torch.cat([sigmas.new_tensor([strength]), sigmas[sigmas < strength]])

    def fn(x_: torch.Tensor, t_: torch.Tensor) -> torch.Tensor:
        return denoiser(x_, t_, cond, clean=clean, clean_mask=clean_mask, uncond=uncond, guider=guider)

    return SAMPLERS[sampler](fn, x, sigmas, callback=callback, progress=progress, **extra)


def _conds(cond: dict[str, Any], uncond: dict[str, Any] | None, guider: ClassifierFreeGuidance | None, b: int,
           device: torch.device) -> tuple[dict[str, Any], dict[str, Any] | None, ClassifierFreeGuidance | None]:
    """cond / uncond on `device` at batch b (uncond may stay 1); both None-ed out of CFG when either is missing."""
    cond = _to_batch(cond, b, device)
    if uncond is not None:
        uncond = _to_batch(uncond, 1 if _batch(uncond) == 1 else b, device)
    if uncond is None or guider is None:
        guider = uncond = None
    return cond, uncond, guider


def _clean(clean: torch.Tensor | None, clean_mask: torch.Tensor, shape: Sequence[int], device: torch.device,
           dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The given frames `[B|1, C, T, H, W]` and their mask bool `[B|1, T]` on `device`, checked against `shape`."""
    if clean is None:
        raise ValueError("clean_mask needs the clean latents (clean=...)")
    clean = clean.to(device=device, dtype=dtype)
    if tuple(clean.shape[1:]) != tuple(shape[1:]):
        raise ValueError(f"clean latents {list(clean.shape)} do not match shape {list(shape)}")
    return clean, clean_mask.to(device).bool()


def _generate_joint(denoiser: Denoiser, cond: dict[str, Any], shape: Sequence[int], audio_shape: Sequence[int],
                    steps: int, guider: ClassifierFreeGuidance | None, uncond: dict[str, Any] | None,
                    shift: float | None, sampler: str, seed: int | Sequence[int], clean: torch.Tensor | None,
                    clean_mask: torch.Tensor | None, audio_clean: torch.Tensor | None, progress: bool,
                    callback: Callback | None, start: torch.Tensor | None,
                    step_cache: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`generate` with audio: (z0 `shape`, a0 `audio_shape`) integrated as one packed tensor."""
    if sampler == "dmd" or start is not None or step_cache is not None:
        raise ValueError("joint audio + video samples with euler / heun / dpmpp_2m / unipc, without start (remix) "
                         "or step_cache")
    device = next(denoiser.net.parameters()).device
    b = shape[0]
    layout = JointLayout.of(tuple(shape), tuple(audio_shape))
    if shift is None:  # the video's token count, as `Denoiser.loss` draws t for both modalities
        shift = denoiser.flow.shift_for(num_latent_tokens(shape, denoiser.patch_size))
    cond, uncond, guider = _conds(cond, uncond, guider, b, device)
    z, a = seeded_joint_noise(shape, audio_shape, seed, device)
    if clean_mask is not None:
        clean, clean_mask = _clean(clean, clean_mask, shape, device, z.dtype)
        z = torch.where(clean_mask.expand(b, shape[2])[:, None, :, None, None], clean.expand_as(z), z)
    if audio_clean is not None:
        audio_clean = audio_clean.to(device=device, dtype=a.dtype)
        if tuple(audio_clean.shape[1:]) != tuple(audio_shape[1:]):
            raise ValueError(f"audio_clean {list(audio_clean.shape)} does not match audio_shape {list(audio_shape)}")
        a = audio_clean.expand_as(a).clone()
    sigmas = timesteps(steps, shift).to(device)

    def fn(x_: torch.Tensor, t_: torch.Tensor) -> torch.Tensor:
        return denoiser(x_, t_, cond, clean=clean, clean_mask=clean_mask, uncond=uncond, guider=guider,
                        layout=layout, audio_clean=audio_clean)

    x = SAMPLERS[sampler](fn, layout.pack(z, a), sigmas, callback=callback, progress=progress)
    return layout.unpack(x)


def _batch(cond: dict[str, Any]) -> int:
    """Batch size of the first tensor in a conditioning dict."""
    return next(v.shape[0] for v in cond.values() if torch.is_tensor(v))
