"""Distribution-matching distillation (DMD2; Yin et al. 2024, "Improved Distribution Matching Distillation for
Fast Image Synthesis"): a few-step student trained to match the teacher's output distribution.

    schedule = student_timesteps(steps=4, shift=s)                       # [1, .75, .5, .25] shifted, then 0
    x = student_rollout(student_fn, noise, schedule, renoise, exit_step)   # a student sample (grad at exit_step)
    loss_student = dmd.student_loss(x, cond, uncond, generator=g)        # DMD gradient (eqs. 7-8)
    loss_critic = dmd.critic_loss(x.detach(), cond, generator=g)         # flow matching on the student's samples

The student samples by "backward simulation" (DMD2 Sec. 4.5): from pure noise at t_0 = 1 it predicts x0, re-noises
that prediction to t_1 with fresh noise, predicts x0 again, ..., and returns the x0 of the last step. Training runs
the same chain (without gradients up to a random exit step, whose x0 prediction is trained), so a 1-4 step student
samples exactly as it trains; `sample_dmd` is that chain as a sampler (`vidgen.diffusion.sampling.SAMPLERS["dmd"]`).

The DMD gradient of a student sample x (DMD eq. 7-8, as DMD2 and FastVideo implement it): noise x to a random t,
x_t = (1 - t) x + t eps, read the real score (the frozen teacher, classifier-free guidance baked in) and the fake
score (a trainable critic tracking the student's distribution, no guidance) as x0 predictions, and move x along

    grad = (x0_fake - x0_real) / mean_per_sample |x - x0_real|,     loss = 0.5 ||x - (x - grad).detach()||^2

whose gradient with respect to x is `grad` (divided by the element count), with the two-time-scale update (the
caller updates the critic more often than the student). DMD1's regression loss is left out.

DMD2's GAN term (Sec. 4.3), optional: a small classifier `CriticHead` on the critic's last-block tokens tells real
latents from student samples, both noised to the same DMD level; the critic (with the head) learns it (non-saturating
loss, `gan_critic_loss`) and the student is pushed to be taken for real (`gan_student_loss`). It is the one term that
looks at real data: the distribution-matching term alone can only match the teacher, the GAN term can pass it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import trange

from vidgen.diffusion.denoiser import Denoiser
from vidgen.diffusion.flow import RectifiedFlow, num_latent_tokens, time_shift
from vidgen.diffusion.guidance import ClassifierFreeGuidance

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[dict[str, Any]], None]


def student_timesteps(steps: int, shift: float = 1.0) -> torch.Tensor:
    """The student's fixed schedule `[steps + 1]` float32: 1, 1 - 1/steps, ..., 1/steps shifted by
    `time_shift(., shift)` (SD3 Sec. 5.3.2), then a final 0 (e.g. steps=4, shift=1: [1, .75, .5, .25, 0])."""
    if steps < 1:
        raise ValueError(f"steps={steps}: a student needs at least 1 step")
    if not shift > 0:
        raise ValueError(f"shift={shift}: expected a positive timestep shift")
    u = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)[:-1]
    return torch.cat([time_shift(u, shift).float(), torch.zeros(1)])


def sample_dmd(fn: Denoise, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback | None = None,
               progress: bool = False, renoise: Sequence[torch.Tensor] | torch.Tensor | None = None) -> torch.Tensor:
    """DMD2 backward simulation: at each sigma predict x0 = x - t v, then re-noise it to the next sigma with
    `renoise[i]` (x = (1 - t') x0 + t' renoise[i]); x `[B, ...]` at sigmas[0] -> the last step's x0 (or, when
    sigmas[-1] > 0, x re-noised to it). renoise: `[len(sigmas) - 2, B, ...]` fresh noise, one per re-noising.
    """
    sig = sigmas.tolist()
    n = len(sig) - 1
    renoising = n - 1 if sig[-1] == 0 else n
    if renoising > 0 and (renoise is None or len(renoise) < renoising):
        raise ValueError(f"sampler=dmd: {renoising} re-noising steps need as many noise tensors, got "
                         f"{0 if renoise is None else len(renoise)}")
    s_in = x.new_ones(x.shape[0])
    for i in trange(n, disable=not progress, desc="dmd"):
        v = fn(x, sig[i] * s_in)
        if callback is not None:
            callback({"i": i, "x": x, "t": sig[i], "v": v})
        x0 = RectifiedFlow.predict_x0(x, sig[i] * s_in, v)
        x = x0 if sig[i + 1] == 0 else RectifiedFlow.add_noise(x0, renoise[i].to(x0), sig[i + 1] * s_in)
    return x


def student_rollout(fn: Denoise, noise: torch.Tensor, sigmas: torch.Tensor, renoise: torch.Tensor,
                    exit_step: int) -> torch.Tensor:
    """The student's sample at step `exit_step` of its schedule (DMD2 backward simulation): the steps before it run
    without gradients, its own x0 prediction with them. noise `[B, ...]`, sigmas `[steps + 1]` ending at 0, renoise
    `[steps - 1, B, ...]` -> x0 `[B, ...]`; exit_step = steps - 1 gives exactly `sample_dmd(fn, noise, sigmas)`."""
    steps = len(sigmas) - 1
    if not 0 <= exit_step < steps:
        raise ValueError(f"exit_step={exit_step}: expected a step of the {steps}-step schedule")
    with torch.no_grad():
        x = sample_dmd(fn, noise, sigmas[:exit_step + 1], renoise=renoise) if exit_step else noise
    return sample_dmd(fn, x, sigmas.new_tensor([sigmas[exit_step].item(), 0.0]))  # this step's x0, with grad


def dmd_gradient(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """DMD eq. 7-8: (x0_fake - x0_real) / mean_per_sample |x - x0_real|, all `[B, C, T, H, W]` (NaN -> 0)."""
    dims = tuple(range(1, x.ndim))
    grad = (x0_fake - x0_real) / (x - x0_real).abs().mean(dim=dims, keepdim=True)
    return torch.nan_to_num(grad)


class CriticHead(nn.Module):
    """DMD2's GAN classifier on the critic's features: last-block tokens `[B, N, D]` -> real/fake logits `[B]`
    (mean over tokens, then LayerNorm -> Linear -> SiLU -> Linear)."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens.float().mean(dim=1)).squeeze(-1)


class DistributionMatching:
    """The DMD2 losses over two denoisers sharing one flow convention.

    real: the frozen teacher (`Denoiser`), read with classifier-free guidance `real_guidance` (1: none); fake: the
    trainable critic (`Denoiser`), read without guidance; t_min / t_max: the DMD noise levels t are
    `time_shift(U(t_min, t_max), s)` with the resolution shift s the teacher trained with (DMD2 draws uniform
    timesteps in [0.02, 0.98] T; FastVideo shifts them as its sampler does).
    """

    def __init__(self, real: Denoiser, fake: Denoiser, real_guidance: float = 5.0, t_min: float = 0.02,
                 t_max: float = 0.98, head: CriticHead | None = None):
        if not 0.0 <= t_min < t_max <= 1.0:
            raise ValueError(f"t_min={t_min}, t_max={t_max}: expected 0 <= t_min < t_max <= 1")
        self.real, self.fake, self.flow = real, fake, real.flow
        self.guider = ClassifierFreeGuidance(real_guidance) if real_guidance != 1.0 else None
        self.t_min, self.t_max, self.head = t_min, t_max, head

    def sample_t(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """DMD noise levels `[B]` for x `[B, C, T, H, W]`."""
        u = self.t_min + (self.t_max - self.t_min) * torch.rand(x.shape[0], generator=generator)
        shift = self.flow.shift_for(num_latent_tokens(x.shape, self.real.patch_size))
        return time_shift(u, shift).to(x.device)

    @torch.no_grad()
    def scores(self, x: torch.Tensor, cond: dict[str, Any], uncond: dict[str, Any] | None,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_real, x0_fake) `[B, C, T, H, W]`: both denoisers' clean estimates of x noised to a DMD level t."""
        t = self.sample_t(x, generator)
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        x_t = self.flow.add_noise(x, noise, t)
        guider = self.guider if uncond is not None else None
        v_real = self.real(x_t, t, cond, uncond=uncond, guider=guider)
        v_fake = self.fake(x_t, t, cond)
        return self.flow.predict_x0(x_t, t, v_real.float()), self.flow.predict_x0(x_t, t, v_fake.float())

    def student_loss(self, x: torch.Tensor, cond: dict[str, Any], uncond: dict[str, Any] | None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """0.5 ||x - (x - grad).detach()||^2 (mean) for student samples x `[B, C, T, H, W]`: its gradient with
        respect to x is the DMD gradient; uncond (batch 1 or B): the teacher's unconditional branch."""
        x0_real, x0_fake = self.scores(x.detach(), cond, uncond, generator)
        grad = dmd_gradient(x.detach().float(), x0_real, x0_fake)
        return 0.5 * torch.nn.functional.mse_loss(x.float(), (x.detach().float() - grad))

    def critic_loss(self, x: torch.Tensor, cond: dict[str, Any],
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """The critic's flow-matching loss (`Denoiser.loss`) on detached student samples x `[B, C, T, H, W]`."""
        return self.fake.loss(x.detach(), cond, generator=generator)

    def gan_logits(self, x: torch.Tensor, cond: dict[str, Any], generator: torch.Generator | None = None
                   ) -> torch.Tensor:
        """`CriticHead` logits `[B]` (real > 0) of clean latents x `[B, C, T, H, W]` noised to a DMD level: the
        critic's forward at (x_t, t) up to its last block (the head reads those tokens)."""
        t = self.sample_t(x, generator)
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        tokens = []

        def capture(h: torch.Tensor, mod: torch.Tensor, run: Any) -> torch.Tensor:
            h = run(h)
            tokens.append(h)
            return h

        self.fake.velocity(self.flow.add_noise(x, noise, t), t, {**cond, "block_stack": capture})
        return self.head(tokens[0])

    def gan_critic_loss(self, real: torch.Tensor, fake: torch.Tensor, cond: dict[str, Any],
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """Non-saturating GAN loss of the critic + head: softplus(-D(real)) + softplus(D(fake)), fake detached."""
        return (F.softplus(-self.gan_logits(real, cond, generator)).mean()
                + F.softplus(self.gan_logits(fake.detach(), cond, generator)).mean())

    def gan_student_loss(self, x: torch.Tensor, cond: dict[str, Any], generator: torch.Generator | None = None
                         ) -> torch.Tensor:
        """The student's GAN loss softplus(-D(x)) for its samples x (gradients reach the critic's parameters too:
        the caller steps only the student's optimizer and clears the critic's gradients)."""
        return F.softplus(-self.gan_logits(x, cond, generator)).mean()
