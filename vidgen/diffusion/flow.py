"""Rectified flow: the ONE place where the noising convention is written (training, validation and sampling).

Convention (Liu et al. 2022, "Flow Straight and Fast"; Esser et al. 2024, SD3 Sec. 2-3):

    x_t = (1 - t) * x0 + t * eps,      t in [0, 1], t = 0 clean, t = 1 pure noise
    v   = d x_t / dt = eps - x0        (the network's target)

so sampling integrates dx/dt = v from t = 1 down to t = 0, and x0 = x_t - t * v.

`t` is per sample `[B]` or per latent frame `[B, T]` (Diffusion Forcing, Chen et al. 2024): frames held
clean (image-to-video, extension, streaming) get t = 0 and are left out of the loss.

Model contract: `model(x_t [B,C,T,H,W], t [B]|[B,T], **cond) -> v [B,C,T,H,W]`, with `cond` a dict of
keyword tensors, e.g. `{"context": [B, L, D], "context_mask": [B, L] bool}` (the DiT's signature).

Training-time t (`sample_t`): logit-normal u = sigmoid(N(logit_mean, logit_std)) (SD3 Sec. 3.1, "rf/lognorm"),
then the timestep shift  t = s*u / (1 + (s - 1)*u)  (SD3 Sec. 5.3.2) with a shift that grows with the number of
latent tokens n (more tokens = more redundant pixels, so more noise is needed to destroy the signal):

    s(n) = base_shift * sqrt(n / base_tokens)        clamped to [min_shift, max_shift]

(SD3 derives sqrt(m/n) as the factor keeping the per-pixel signal-to-noise ratio of a resolution m equal to that
of the reference resolution n; Wan 2.1 samples with a fixed s = 5 at 480p.) `time_shift` is the same map the
sampler's schedule uses (`vidgen.diffusion.sampling.timesteps`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch



def time_shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Shift flow times towards noise: `s*t / (1 + (s-1)*t)` (SD3 Sec. 5.3.2; diffusers' `shift`). Any shape."""
    return shift * t / (1 + (shift - 1) * t)


def expand_t(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast t `[B]` -> `[B,1,1,1,1]` or per-frame t `[B,T]` -> `[B,1,T,1,1]` against x `[B,C,T,H,W]`."""
    t = torch.as_tensor(t, device=x.device, dtype=x.dtype)
    if t.ndim == 0 or t.ndim == 1:
        return t.reshape(-1, *([1] * (x.ndim - 1)))
    if t.ndim == 2 and x.ndim == 5 and t.shape[1] == x.shape[2]:
        return t[:, None, :, None, None]
    raise ValueError(f"t of shape {list(t.shape)} fits neither [B] nor [B, T] for x of shape {list(x.shape)}")


class RectifiedFlow:
    """The flow-matching convention: noising, target, x0 / noise prediction, training-time t density.

    Args: logit_mean, logit_std: logit-normal t density; base_shift, base_tokens, min_shift, max_shift: the
    resolution-dependent shift `s(n)` above (base_shift=1 with no token dependence when base_tokens=None);
    per_frame_t: draw an independent t per latent frame (Diffusion Forcing) instead of one per sample;
    t_chunk: with per_frame_t, frames share one t in groups of this many (a causal DiT's `chunk_frames`).
    The network call, the loss and the clean-frame rule live in `vidgen.diffusion.denoiser.Denoiser`.
    """

    def __init__(self, logit_mean: float = 0.0, logit_std: float = 1.0, base_shift: float = 1.0,
                 base_tokens: int | None = 256, min_shift: float = 1.0, max_shift: float = 8.0,
                 per_frame_t: bool = False, t_chunk: int = 1):
        self.logit_mean, self.logit_std = logit_mean, logit_std
        self.base_shift, self.base_tokens = base_shift, base_tokens
        self.min_shift, self.max_shift = min_shift, max_shift
        self.per_frame_t = per_frame_t
        if t_chunk < 1:
            raise ValueError(f"t_chunk={t_chunk}: expected >= 1 latent frame")
        self.t_chunk = int(t_chunk)

    # ---------------------------------------------------------------- the convention (written once)
    @staticmethod
    def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - t) x0 + t eps; x0, noise `[B,C,T,H,W]`, t `[B]` or `[B,T]` -> `[B,C,T,H,W]`."""
        t = expand_t(t, x0)
        return (1 - t) * x0 + t * noise

    @staticmethod
    def target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Velocity target v = eps - x0 (= d x_t / dt), `[B,C,T,H,W]`."""
        return noise - x0

    @staticmethod
    def predict_x0(x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Clean estimate x0 = x_t - t v, `[B,C,T,H,W]`."""
        return x_t - expand_t(t, x_t) * v

    @staticmethod
    def predict_noise(x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Noise estimate eps = x_t + (1 - t) v, `[B,C,T,H,W]`."""
        return x_t + (1 - expand_t(t, x_t)) * v

    # ---------------------------------------------------------------- timestep density
    def shift_for(self, num_tokens: int) -> float:
        """Resolution-dependent shift s(n) = base_shift * sqrt(n / base_tokens), clamped (SD3 Sec. 5.3.2)."""
        if self.base_tokens is None:
            return self.base_shift
        s = self.base_shift * math.sqrt(num_tokens / self.base_tokens)
        return min(max(s, self.min_shift), self.max_shift)

    def sample_t(self, batch: int, frames: int = 1, num_tokens: int | None = None,
                 generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        """Shifted logit-normal training times: `[B]`, or `[B, frames]` when `per_frame_t` (one per `t_chunk`)."""
        shape = (batch, -(-frames // self.t_chunk)) if self.per_frame_t else (batch,)
        u = torch.randn(shape, generator=generator, device=generator.device if generator is not None else device)
        u = torch.sigmoid(self.logit_mean + self.logit_std * u)
        shift = self.shift_for(num_tokens) if num_tokens is not None else self.base_shift
        t = time_shift(u, shift).to(device)
        return t.repeat_interleave(self.t_chunk, dim=1)[:, :frames] if self.per_frame_t else t


def num_latent_tokens(shape: Sequence[int], patch_size: Sequence[int] = (1, 2, 2)) -> int:
    """Transformer tokens of a latent of shape `[B, C, T, H, W]` under a (pt, ph, pw) patch."""
    return math.prod(shape[2:]) // math.prod(patch_size)


def pad_tokens(context: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad context `[B, L, D]` with zeros and mask `[B, L]` with False to `length` tokens."""
    pad = length - context.shape[1]
    if pad <= 0:
        return context, mask
    context = torch.nn.functional.pad(context, (0, 0, 0, pad))
    mask = torch.nn.functional.pad(mask, (0, pad), value=False)
    return context, mask
