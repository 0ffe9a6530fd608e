"""The `Denoiser`: the one place where the flow convention meets the network, for training and for sampling.

    denoiser = Denoiser(net, flow)
    loss = denoiser.loss(x0, cond, clean_mask=mask, generator=g)          # training, validation
    v = denoiser(x, t, cond, clean=z_clean, clean_mask=mask, uncond=neg, guider=cfg)   # every sampler step

Both go through `apply_clean_frames`: latent frames held clean (image-to-video: frame 0, extension: the first
k, streaming: the past) enter the network as their clean latents at t = 0 (Diffusion Forcing, Chen et al.
2024), so for the same x0, noise, t and mask the network receives the very same tensors in training and in
sampling. Clean frames are left out of the loss and get zero velocity, so a sampler keeps them bit-exact.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vidgen.diffusion.flow import RectifiedFlow, num_latent_tokens

Cond = dict[str, Any]


def apply_clean_frames(x: torch.Tensor, t: torch.Tensor, clean: torch.Tensor | None,
                       clean_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Network inputs with clean frames pinned: x `[B,C,T,H,W]`, t `[B]`/`[B,T]`, clean `[B|1,C,T,H,W]`,
    clean_mask bool `[B|1,T]` (True = clean) -> (x with clean frames from `clean`, t `[B,T]` with 0 there).

    Without a mask (or an all-False one) the inputs pass through unchanged.
    """
    if clean_mask is None:
        return x, t
    b, frames = x.shape[0], x.shape[2]
    mask = clean_mask.to(device=x.device, dtype=torch.bool).expand(b, frames)
    t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
    t = t[:, None].expand(b, frames) if t.ndim == 1 else t.expand(b, frames)
    x = torch.where(mask[:, None, :, None, None], clean.to(x).expand_as(x), x)
    return x, t.masked_fill(mask, 0.0)


class Denoiser:
    """`Denoiser(net, flow)`: `loss(...)` for training and `__call__(...)` for sampling over one network call.

    net: `net(x [B,C,T,H,W], t [B]|[B,T], **cond) -> v [B,C,T,H,W]` (the DiT); flow: the `RectifiedFlow`
    convention (noising, target, training-time t). Not an `nn.Module`: it holds the network, it does not own it.
    """

    def __init__(self, net: nn.Module, flow: RectifiedFlow):
        self.net, self.flow = net, flow

    @property
    def patch_size(self) -> tuple[int, ...]:
        return tuple(getattr(self.net, "patch_size", (1, 1, 1)))

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
        """The bare network call `net(x, t, **cond) -> v`."""
        return self.net(x, t, **(cond or {}))

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond, clean: torch.Tensor | None = None,
                 clean_mask: torch.Tensor | None = None, uncond: Cond | None = None,
                 guider: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
        """Sampling: velocity `[B,C,T,H,W]` at x, t `[B]`/`[B,T]`; clean frames pinned and given zero velocity.

        guider: e.g. `ClassifierFreeGuidance(scale)`, called as `guider(fn, x, t, cond, uncond)` (None: no CFG).
        """
        x_in, t_in = apply_clean_frames(x, t, clean, clean_mask)
        if guider is not None:
            v = guider(self.velocity, x_in, t_in, cond, uncond)
        else:
            v = self.velocity(x_in, t_in, cond)
        if clean_mask is not None:
            keep = ~clean_mask.to(device=v.device, dtype=torch.bool).expand(x.shape[0], x.shape[2])
            v = v * keep[:, None, :, None, None].to(v.dtype)
        return v

    def loss(self, x0: torch.Tensor, cond: Cond | None = None, t: torch.Tensor | None = None,
             noise: torch.Tensor | None = None, clean_mask: torch.Tensor | None = None,
             num_tokens: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Flow-matching MSE `||v(x_t, t) - (eps - x0)||^2` over the noisy frames; scalar.

        x0 `[B,C,T,H,W]`; t `[B]`/`[B,T]` (None: `flow.sample_t` with the resolution shift for `num_tokens`,
        by default the net's token count); noise (None: N(0, I) from `generator`); clean_mask bool `[B,T]`.
        """
        b, c, frames, h, w = x0.shape
        if noise is None:
            gen_device = generator.device if generator is not None else x0.device
            noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(x0.device)
        if t is None:
            tokens = num_tokens if num_tokens is not None else num_latent_tokens(x0.shape, self.patch_size)
            t = self.flow.sample_t(b, frames, tokens, generator=generator, device=x0.device)
        t = torch.as_tensor(t, device=x0.device, dtype=torch.float32)
        x_t = self.flow.add_noise(x0, noise, t)
        x_in, t_in = apply_clean_frames(x_t, t, x0, clean_mask)
        v = self.velocity(x_in, t_in, cond)
        err = (v.float() - self.flow.target(x0, noise).float()).pow(2)  # [B,C,T,H,W]
        if clean_mask is None:
            return err.mean()
        keep = (~clean_mask.to(x0.device).bool().expand(b, frames))[:, None, :, None, None].float()  # [B,1,T,1,1]
        return (err * keep).sum() / (keep.sum() * c * h * w).clamp_min(1.0)
