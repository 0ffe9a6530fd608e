"""Multistep solvers and the step cache: dpmpp_2m / unipc = diffusers' schedulers bit for bit, their accuracy on an
ODE with a known solution, and the step cache's exactness at threshold 0 and measured error at its default.

Run with `-s` to see the measured figures.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from test_diffusion import text, tiny_dit  # the same tiny DiT and text context
from vidgen.diffusion.denoiser import Denoiser
from vidgen.diffusion.flow import RectifiedFlow, time_shift
from vidgen.diffusion.guidance import ClassifierFreeGuidance
from vidgen.diffusion.sampling import SAMPLERS, generate, timesteps
from vidgen.diffusion.step_cache import DEFAULT_THRESHOLD, StepCache
from vidgen.models.dit import DiT


# Wan 2.1's scheduler (Wan-AI/Wan2.1-T2V-1.3B-Diffusers scheduler_config.json) minus its flow_shift.
WAN_UNIPC = dict(num_train_timesteps=1000, solver_order=2, prediction_type="flow_prediction", predict_x0=True,
                 solver_type="bh2", lower_order_final=True, disable_corrector=[], use_flow_sigmas=True,
                 final_sigmas_type="zero", timestep_spacing="linspace")
# The same flow settings for DPM-Solver++(2M) (as the SANA / Wan community configs set it).
FLOW_DPMPP_2M = dict(num_train_timesteps=1000, solver_order=2, prediction_type="flow_prediction",
                     algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
                     use_flow_sigmas=True, final_sigmas_type="zero")


def diffusers_scheduler(name: str, steps: int, shift: float, ours: bool):
    """diffusers' scheduler for `name`, set to our `timesteps(steps, shift)` (ours=True) or to its own flow sigmas."""
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    if name == "unipc":
        sched = UniPCMultistepScheduler(**WAN_UNIPC, flow_shift=shift)
        if ours:  # our unshifted grid (FlowMatchEulerDiscreteScheduler's); the scheduler shifts it by flow_shift
            sigma_min = time_shift(torch.tensor(1.0) / 1000, shift).item()
            sched.set_timesteps(sigmas=np.linspace(1.0, sigma_min, steps))
        else:
            sched.set_timesteps(steps)
    else:
        sched = DPMSolverMultistepScheduler(**FLOW_DPMPP_2M, flow_shift=shift)
        sched.set_timesteps(steps)
        if ours:  # set_timesteps takes no flow sigmas here: its schedule is replaced by ours
            sched.sigmas = timesteps(steps, shift)
    sched.set_begin_index(0)
    return sched


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
@pytest.mark.parametrize("steps", [1, 10, 25])
def test_diffusers_flow_schedulers_take_our_schedule(steps, shift):
    ours = timesteps(steps, shift)
    unipc = diffusers_scheduler("unipc", steps, shift, ours=True).sigmas
    # UniPC lowers a first sigma of 1 by 1e-6 (lambda(1) = -inf), and so does sample_unipc; the rest is equal.
    assert torch.equal(unipc[1:], ours[1:]) and unipc[0] == torch.tensor(1.0) - 1e-6
    assert torch.equal(diffusers_scheduler("dpmpp_2m", steps, shift, ours=True).sigmas, ours)


@pytest.mark.parametrize("ours", [True, False], ids=["our_schedule", "diffusers_schedule"])
@pytest.mark.parametrize("steps,shift", [(1, 1.0), (2, 3.0), (10, 5.0), (25, 3.0)])
@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc"])
def test_solver_equals_diffusers_scheduler(name, steps, shift, ours):
    """The same velocity field (a tiny random DiT with CFG), noise and sigmas: every x_i and the end point equal."""
    denoiser, cond, uncond = Denoiser(tiny_dit(), RectifiedFlow()), text(2, 5, 1), text(1, 3, 2)
    fn = lambda x_, t_: denoiser(x_, t_, cond, uncond=uncond, guider=ClassifierFreeGuidance(4.0))  # noqa: E731
    noise = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    sched = diffusers_scheduler(name, steps, shift, ours)
    reference, x = [], noise
    with torch.no_grad():
        for i in range(steps):
            reference.append(x)
            v = fn(x, sched.sigmas[i].item() * torch.ones(2))
            x = sched.step(v, sched.timesteps[i], x).prev_sample
        reference.append(x)
        sigmas = timesteps(steps, shift) if ours else sched.sigmas
        trajectory = []
        end = SAMPLERS[name](fn, noise, sigmas, callback=lambda d: trajectory.append(d["x"]))
    trajectory.append(end)
    worst = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(trajectory, reference))
    print(f"\n{name} vs diffusers, {steps} steps, shift {shift}, {'our' if ours else 'its'} schedule: "
          f"max relative difference {worst:.1e} over {len(reference)} states")
    assert len(trajectory) == len(reference)
    assert all(torch.equal(a, b) for a, b in zip(trajectory, reference)), worst


def gaussian_velocity(m: float, s: float):
    """Exact v(x_t, t) = E[eps - x0 | x_t] for x0 ~ N(m, s^2), eps ~ N(0, 1), x_t = (1-t) x0 + t eps."""

    def v(x, t):
        t = t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        a = 1 - t
        var = a * a * s * s + t * t  # Var[x_t]; Cov[x0, x_t] = a s^2, Cov[eps, x_t] = t
        return (t - a * s * s) / var * (x - a * m) - m

    return v


def gaussian_errors(sigmas: torch.Tensor, names=("euler", "dpmpp_2m", "unipc"), m=1.5, s=0.5) -> dict[str, float]:
    """Mean |x0 - exact| over 20k samples of N(m, s^2) data; the 1D flow map is monotone: x1 -> m + s x1."""
    x1 = torch.randn(20000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return {n: (SAMPLERS[n](gaussian_velocity(m, s), x1, sigmas) - (m + s * x1)).abs().mean().item() for n in names}


def test_multistep_solvers_are_second_order_on_gaussian_data():
    """10 steps on diffusers' solver schedule (Wan's UniPC flow sigmas): dpmpp_2m / unipc >10x more accurate than
    euler. On our FlowMatchEuler schedule their error at 10 steps is no better than euler's: its last step before 0
    goes to sigma ~ 1e-3 (lambda 2 -> 7), a long second-order extrapolation. There they still converge at second
    order, euler at first."""
    solver_schedule = diffusers_scheduler("unipc", 10, 1.0, ours=False).sigmas
    errors = gaussian_errors(solver_schedule)
    ours = {steps: gaussian_errors(timesteps(steps, 1.0)) for steps in (10, 20, 40, 80)}
    show = lambda errs: ", ".join(f"{k} {v:.2e}" for k, v in errs.items())  # noqa: E731
    print(f"\nmean |error| at 10 steps, diffusers' solver schedule: {show(errors)}")
    for steps, errs in ours.items():
        print(f"mean |error| at {steps} steps, timesteps(steps, 1): {show(errs)}")
    assert errors["dpmpp_2m"] < errors["euler"] / 10 and errors["unipc"] < errors["euler"] / 10, errors
    for name in ("dpmpp_2m", "unipc"):
        assert ours[40][name] / ours[80][name] > 3.5 and ours[80][name] < ours[80]["euler"] / 3, (name, ours)
    assert 1.8 < ours[40]["euler"] / ours[80]["euler"] < 2.2


# ------------------------------------------------------------------------------------------ the step cache


def computed_calls(dit: DiT) -> list[int]:
    """A counter of the calls that ran the blocks (a hook on the first block), to measure what the cache skips."""
    calls = []
    dit.blocks[0].register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("sampler", ["euler", "heun", "unipc"])
def test_step_cache_at_threshold_zero_is_the_uncached_path(sampler):
    denoiser = Denoiser(tiny_dit(), RectifiedFlow())
    clean = torch.randn(2, 4, 3, 8, 8)
    kwargs = dict(shape=(2, 4, 3, 8, 8), steps=6, guider=ClassifierFreeGuidance(3.0), uncond=text(1, 2, 2), shift=3.0,
                  sampler=sampler, seed=0, clean=clean, clean_mask=(torch.arange(3) < 1)[None])  # i2v: per-frame t
    assert torch.equal(generate(denoiser, text(2, 5, 1), step_cache=0.0, **kwargs),
                       generate(denoiser, text(2, 5, 1), **kwargs))


def test_step_cache_runs_the_first_and_last_step():
    dit = tiny_dit()
    calls = computed_calls(dit)
    generate(Denoiser(dit, RectifiedFlow()), text(1, 5, 1), (1, 4, 3, 8, 8), steps=10, shift=3.0, step_cache=1e9)
    assert len(calls) == 2  # every step in between reuses the first step's residual
    with pytest.raises(ValueError, match="step_cache=-0.1: expected a threshold >= 0"):
        StepCache(dit, -0.1)


def test_step_cache_error_at_its_default_threshold():
    """25 steps of a tiny random DiT with CFG: the final latents with and without the cache, and the steps skipped."""
    dit, steps = tiny_dit(), 25
    denoiser = Denoiser(dit, RectifiedFlow())
    kwargs = dict(shape=(2, 4, 5, 16, 16), guider=ClassifierFreeGuidance(5.0), uncond=text(1, 3, 2), shift=3.0, seed=0)
    calls = computed_calls(dit)
    for sampler in ("euler", "unipc"):
        exact = generate(denoiser, text(2, 5, 1), steps=steps, sampler=sampler, **kwargs)
        calls.clear()
        cached = generate(denoiser, text(2, 5, 1), steps=steps, sampler=sampler, step_cache=DEFAULT_THRESHOLD, **kwargs)
        computed = len(calls)
        fewer = generate(denoiser, text(2, 5, 1), steps=computed, sampler=sampler, **kwargs)  # same compute, no cache
        error = (cached - exact).abs().mean().item()
        relative = error / exact.abs().mean().item()
        fewer_error = (fewer - exact).abs().mean().item()
        print(f"\nstep cache, threshold {DEFAULT_THRESHOLD}, {sampler}, {steps} steps: skipped "
              f"{1 - computed / steps:.0%} of the steps, mean |latent diff| {error:.4f} ({relative:.1%} of mean "
              f"|latent|); {computed} uncached steps instead: {fewer_error:.4f}")
        assert 0.3 < 1 - computed / steps < 0.8 and relative < 0.05
