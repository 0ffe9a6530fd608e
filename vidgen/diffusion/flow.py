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
from collections.abc import Callable, Sequence
from typing import Any

import torch

Cond = dict[str, Any]
VelocityModel = Callable[..., torch.Tensor]


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


def frame_mask(clean_frames: int | torch.Tensor | None, batch: int, frames: int,
               device: torch.device) -> torch.Tensor | None:
    """Clean-frame spec -> bool `[B, T]` (True = clean): an int k means frames [0:k]; a bool tensor passes through."""
    if clean_frames is None:
        return None
    if isinstance(clean_frames, int):
        if not 0 <= clean_frames <= frames:
            raise ValueError(f"clean_frames={clean_frames} outside [0, {frames}] latent frames")
        return (torch.arange(frames, device=device) < clean_frames).expand(batch, frames)
    mask = torch.as_tensor(clean_frames, device=device).bool()
    if mask.ndim == 1:
        mask = mask.expand(batch, frames)
    if mask.shape != (batch, frames):
        raise ValueError(f"clean_frames mask must be [B, T] = [{batch}, {frames}], got {list(mask.shape)}")
    return mask


class RectifiedFlow:
    """The flow-matching objective and denoiser: noising, target, loss, x0 prediction, timestep sampling.

    Args: logit_mean, logit_std: logit-normal t density; base_shift, base_tokens, min_shift, max_shift: the
    resolution-dependent shift `s(n)` above (base_shift=1 with no token dependence when base_tokens=None);
    per_frame_t: draw an independent t per latent frame (Diffusion Forcing) instead of one per sample;
    cfg_dropout: probability to drop the text of a training sample (for classifier-free guidance).
    """

    def __init__(self, logit_mean: float = 0.0, logit_std: float = 1.0, base_shift: float = 1.0,
                 base_tokens: int | None = 256, min_shift: float = 1.0, max_shift: float = 8.0,
                 per_frame_t: bool = False, cfg_dropout: float = 0.1):
        self.logit_mean, self.logit_std = logit_mean, logit_std
        self.base_shift, self.base_tokens = base_shift, base_tokens
        self.min_shift, self.max_shift = min_shift, max_shift
        self.per_frame_t = per_frame_t
        self.cfg_dropout = cfg_dropout

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

    @staticmethod
    def velocity(model: VelocityModel, x_t: torch.Tensor, t: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
        """The denoiser call shared by training and every sampler: `model(x_t, t, **cond) -> v`."""
        return model(x_t, t, **(cond or {}))

    # ---------------------------------------------------------------- timestep density
    def shift_for(self, num_tokens: int) -> float:
        """Resolution-dependent shift s(n) = base_shift * sqrt(n / base_tokens), clamped (SD3 Sec. 5.3.2)."""
        if self.base_tokens is None:
            return self.base_shift
        s = self.base_shift * math.sqrt(num_tokens / self.base_tokens)
        return min(max(s, self.min_shift), self.max_shift)

    def sample_t(self, batch: int, frames: int = 1, num_tokens: int | None = None,
                 generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        """Shifted logit-normal training times: `[B]`, or `[B, frames]` when `per_frame_t`."""
        shape = (batch, frames) if self.per_frame_t else (batch,)
        u = torch.randn(shape, generator=generator, device=generator.device if generator is not None else device)
        u = torch.sigmoid(self.logit_mean + self.logit_std * u)
        shift = self.shift_for(num_tokens) if num_tokens is not None else self.base_shift
        return time_shift(u, shift).to(device)

    # ---------------------------------------------------------------- training
    def loss(self, model: VelocityModel, x0: torch.Tensor, cond: Cond | None = None, t: torch.Tensor | None = None,
             noise: torch.Tensor | None = None, clean_frames: int | torch.Tensor | None = None,
             num_tokens: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Flow-matching MSE `||model(x_t, t) - (eps - x0)||^2` averaged over noisy elements; scalar.

        x0 `[B,C,T,H,W]` clean latents; t `[B]`/`[B,T]` (None: `sample_t`; the shift uses `num_tokens`, by
        default T*H*W / prod(model.patch_size));
        noise (None: standard normal); clean_frames: int k (frames [0:k]) or bool `[B,T]`: these frames get
        t = 0 (so x_t = x0 there, the conditioning) and are excluded from the loss.
        """
        b, c, frames, h, w = x0.shape
        if noise is None:
            gen_device = generator.device if generator is not None else x0.device
            noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(x0.device)
        if t is None:
            if num_tokens is None:  # the DiT exposes its patch size; other models count latent positions
                num_tokens = num_latent_tokens(x0.shape, getattr(model, "patch_size", (1, 1, 1)))
            t = self.sample_t(b, frames, num_tokens, generator=generator, device=x0.device)
        t = torch.as_tensor(t, device=x0.device, dtype=torch.float32)
        clean = frame_mask(clean_frames, b, frames, x0.device)
        if clean is not None:
            t = (t[:, None].expand(b, frames) if t.ndim == 1 else t).masked_fill(clean, 0.0)
        x_t = self.add_noise(x0, noise, t)
        v = self.velocity(model, x_t, t, cond)
        err = (v.float() - self.target(x0, noise).float()).pow(2)  # [B,C,T,H,W]
        if clean is None:
            return err.mean()
        keep = (~clean)[:, None, :, None, None].float()  # [B,1,T,1,1]
        return (err * keep).sum() / (keep.sum() * c * h * w).clamp_min(1.0)

    # ---------------------------------------------------------------- classifier-free guidance dropout
    def drop_captions(self, captions: Sequence[str], generator: torch.Generator | None = None) -> list[str]:
        """Replace each caption by "" with probability `cfg_dropout` (for a text encoder trained jointly)."""
        drop = torch.rand(len(captions), generator=generator) < self.cfg_dropout
        return ["" if d else c for c, d in zip(captions, drop.tolist())]

    def drop_embeddings(self, context: torch.Tensor, mask: torch.Tensor | None, null_context: torch.Tensor,
                        null_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Replace samples' text by the null ("") embedding with probability `cfg_dropout` (precomputed text).

        context `[B, L, D]`, mask `[B, L]` (None = all valid); null_context `[L0, D]` or `[1, L0, D]`,
        null_mask `[L0]`/`[1, L0]`. Returns (context, mask) padded to max(L, L0) with zeros / False.
        """
        b = context.shape[0]
        null_context = null_context.reshape(1, *null_context.shape[-2:]).to(context)
        if mask is None:
            mask = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
        if null_mask is None:
            null_mask = torch.ones(null_context.shape[:2], dtype=torch.bool, device=context.device)
        null_mask = null_mask.reshape(1, -1).bool().to(context.device)
        length = max(context.shape[1], null_context.shape[1])
        context, mask = pad_tokens(context, mask.bool(), length)
        null_context, null_mask = pad_tokens(null_context, null_mask, length)
        drop = (torch.rand(b, generator=generator) < self.cfg_dropout).to(context.device)
        context = torch.where(drop[:, None, None], null_context, context)
        mask = torch.where(drop[:, None], null_mask, mask)
        return context, mask


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
