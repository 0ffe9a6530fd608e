"""The `Denoiser`: the one place where the flow convention meets the network, for training and for sampling.

    denoiser = Denoiser(net, flow)
    loss = denoiser.loss(x0, cond, clean_mask=mask, generator=g)          # training, validation
    v = denoiser(x, t, cond, clean=z_clean, clean_mask=mask, uncond=neg, guider=cfg)   # every sampler step

Both go through `apply_clean_frames`: latent frames held clean (image-to-video: frame 0, extension: the first
k, streaming: the past) enter the network as their clean latents at t = 0 (Diffusion Forcing, Chen et al.
2024), so for the same x0, noise, t and mask the network receives the very same tensors in training and in
sampling. Clean frames are left out of the loss and get zero velocity, so a sampler keeps them bit-exact.

Joint audio + video (a DiT with an audio stream, `vidgen.models.joint_audio`): one noise level per modality.

    loss = denoiser.loss(z0, cond, audio0=a0, clean_mask=video_clean, audio_clean_mask=audio_clean)
    v = denoiser(x, t, cond, layout=JointLayout.of(z.shape, a.shape), audio_clean=a_clean, ...)   # x packed [B, N]

The audio obeys the same rule as frames (`apply_clean_audio`): a clean modality enters at t = 0, is left out of its
loss term and gets zero velocity. Video clean + audio noisy is video-to-audio, audio clean is audio-to-video, both
noisy is text-to-audio+video. For the samplers (elementwise functions of one tensor) video and audio latents travel
packed in one flat `[B, N]` tensor (`JointLayout`), unpacked around the network call; CFG then guides both outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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


def apply_clean_audio(a: torch.Tensor, t_audio: torch.Tensor, clean: torch.Tensor | None,
                      clean_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Audio network inputs with clean latents pinned: a `[B,Ca,Ta]`, t_audio `[B]`/`[B,Ta]`, clean `[B|1,Ca,Ta]`,
    clean_mask bool `[B|1]` (per sample) or `[B|1,Ta]` (True = clean) -> (a, t_audio `[B,Ta]` with 0 there).

    The audio twin of `apply_clean_frames`; without a mask the inputs pass through unchanged.
    """
    if clean_mask is None:
        return a, t_audio
    b, n = a.shape[0], a.shape[2]
    mask = _audio_mask(clean_mask, b, n, a.device)
    t_audio = torch.as_tensor(t_audio, device=a.device, dtype=torch.float32)
    t_audio = t_audio[:, None].expand(b, n) if t_audio.ndim == 1 else t_audio.expand(b, n)
    a = torch.where(mask[:, None, :], clean.to(a).expand_as(a), a)
    return a, t_audio.masked_fill(mask, 0.0)


def _audio_mask(clean_mask: torch.Tensor, batch: int, num_audio: int, device: torch.device) -> torch.Tensor:
    """Bool `[B|1]` or `[B|1, Ta]` -> `[B, Ta]` on `device`."""
    mask = clean_mask.to(device=device, dtype=torch.bool)
    return (mask[:, None] if mask.ndim == 1 else mask).expand(batch, num_audio)


@dataclass(frozen=True)
class JointLayout:
    """Video latents `[B, C, T, H, W]` + audio latents `[B, Ca, Ta]` as one flat `[B, C*T*H*W + Ca*Ta]` tensor (what
    the samplers integrate), and their times t `[B, T]` + t_audio `[B, Ta]` as one `[B, T + Ta]` (what CFG batches)."""

    video: tuple[int, ...]  # (C, T, H, W)
    audio: tuple[int, ...]  # (Ca, Ta)

    @classmethod
    def of(cls, video_shape: tuple[int, ...], audio_shape: tuple[int, ...]) -> JointLayout:
        """From the full shapes `[B, C, T, H, W]` and `[B, Ca, Ta]`."""
        if len(video_shape) != 5 or len(audio_shape) != 3 or video_shape[0] != audio_shape[0]:
            raise ValueError(f"joint shapes must be [B, C, T, H, W] and [B, Ca, Ta] with one B, got "
                             f"{list(video_shape)} and {list(audio_shape)}")
        return cls(tuple(int(v) for v in video_shape[1:]), tuple(int(v) for v in audio_shape[1:]))

    @property
    def num_video(self) -> int:
        return self.video[0] * self.video[1] * self.video[2] * self.video[3]

    def pack(self, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """z `[B, C, T, H, W]`, a `[B, Ca, Ta]` -> `[B, N]`."""
        return torch.cat([z.flatten(1), a.flatten(1).to(z.dtype)], dim=1)

    def unpack(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`[B, N]` -> (z `[B, C, T, H, W]`, a `[B, Ca, Ta]`)."""
        n = self.num_video
        return x[:, :n].reshape(-1, *self.video), x[:, n:].reshape(-1, *self.audio)

    def pack_t(self, t: torch.Tensor, t_audio: torch.Tensor) -> torch.Tensor:
        """t `[B]`/`[B, T]`, t_audio `[B]`/`[B, Ta]` -> `[B, T + Ta]`."""
        t, t_audio = torch.as_tensor(t, dtype=torch.float32), torch.as_tensor(t_audio, dtype=torch.float32)
        b = t.shape[0]
        t = t[:, None].expand(b, self.video[1]) if t.ndim == 1 else t
        t_audio = t_audio[:, None].expand(b, self.audio[1]) if t_audio.ndim == 1 else t_audio
        return torch.cat([t, t_audio.to(t.device)], dim=1)

    def unpack_t(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`[B, T + Ta]` -> (t `[B, T]`, t_audio `[B, Ta]`)."""
        return t[:, :self.video[1]], t[:, self.video[1]:]


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

    def joint_velocity(self, layout: JointLayout) -> Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]:
        """`fn(x [B, N], t [B, T + Ta], cond) -> v [B, N]`: the network call over packed video + audio (`layout`)."""
        def fn(x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
            (z, a), (t_video, t_audio) = layout.unpack(x), layout.unpack_t(t)
            v, v_audio = self.net(z, t_video, **(cond or {}), audio=a, t_audio=t_audio)
            return layout.pack(v, v_audio)
        return fn

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond, clean: torch.Tensor | None = None,
                 clean_mask: torch.Tensor | None = None, uncond: Cond | None = None,
                 guider: Callable[..., torch.Tensor] | None = None, layout: JointLayout | None = None,
                 audio_clean: torch.Tensor | None = None) -> torch.Tensor:
        """Sampling: velocity `[B,C,T,H,W]` at x, t `[B]`/`[B,T]`; clean frames pinned and given zero velocity.

        guider: e.g. `ClassifierFreeGuidance(scale)`, called as `guider(fn, x, t, cond, uncond)` (None: no CFG).
        layout (joint audio + video): x is `layout.pack(z, a)` `[B, N]`, the result the packed (v, v_audio);
        audio_clean `[B|1, Ca, Ta]`: the audio held clean in every sample (audio-to-video; video-to-audio holds the
        video with clean + an all-True clean_mask).
        """
        if layout is not None:
            return self._joint_call(x, t, cond, clean, clean_mask, uncond, guider, layout, audio_clean)
        x_in, t_in = apply_clean_frames(x, t, clean, clean_mask)
        if guider is not None:
            v = guider(self.velocity, x_in, t_in, cond, uncond)
        else:
            v = self.velocity(x_in, t_in, cond)
        if clean_mask is not None:
            keep = ~clean_mask.to(device=v.device, dtype=torch.bool).expand(x.shape[0], x.shape[2])
            v = v * keep[:, None, :, None, None].to(v.dtype)
        return v

    def _joint_call(self, x: torch.Tensor, t: torch.Tensor, cond: Cond, clean: torch.Tensor | None,
                    clean_mask: torch.Tensor | None, uncond: Cond | None, guider: Callable[..., torch.Tensor] | None,
                    layout: JointLayout, audio_clean: torch.Tensor | None) -> torch.Tensor:
        """`__call__` over packed video + audio: both clean rules, one (CFG-batched) network call, zero velocity on
        the clean parts."""
        z, a = layout.unpack(x)
        audio_mask = None if audio_clean is None else torch.ones(1, dtype=torch.bool, device=x.device)
        z_in, t_video = apply_clean_frames(z, t, clean, clean_mask)
        a_in, t_audio = apply_clean_audio(a, t, audio_clean, audio_mask)
        x_in, t_in = layout.pack(z_in, a_in), layout.pack_t(t_video, t_audio).to(x.device)
        fn = self.joint_velocity(layout)
        v = guider(fn, x_in, t_in, cond, uncond) if guider is not None else fn(x_in, t_in, cond)
        if clean_mask is None and audio_clean is None:
            return v
        v_video, v_audio = layout.unpack(v)
        if clean_mask is not None:
            keep = ~clean_mask.to(device=v.device, dtype=torch.bool).expand(x.shape[0], layout.video[1])
            v_video = v_video * keep[:, None, :, None, None].to(v.dtype)
        if audio_clean is not None:
            v_audio = torch.zeros_like(v_audio)
        return layout.pack(v_video, v_audio)

    def loss(self, x0: torch.Tensor, cond: Cond | None = None, t: torch.Tensor | None = None,
             noise: torch.Tensor | None = None, clean_mask: torch.Tensor | None = None,
             num_tokens: int | None = None, generator: torch.Generator | None = None,
             audio0: torch.Tensor | None = None, t_audio: torch.Tensor | None = None,
             audio_noise: torch.Tensor | None = None, audio_clean_mask: torch.Tensor | None = None,
             audio_valid: torch.Tensor | None = None, audio_weight: float = 1.0) -> torch.Tensor:
        """Flow-matching MSE `||v(x_t, t) - (eps - x0)||^2` over the noisy frames; scalar.

        x0 `[B,C,T,H,W]`; t `[B]`/`[B,T]` (None: `flow.sample_t` with the resolution shift for `num_tokens`,
        by default the net's token count); noise (None: N(0, I) from `generator`); clean_mask bool `[B,T]`.
        Joint audio + video: audio0 `[B,Ca,Ta]` adds `audio_weight` x the MSE of v_audio over the noisy audio
        latents; t_audio `[B]`/`[B,Ta]` (None: drawn like t, independently), audio_noise (None: from `generator`,
        after the video's); audio_clean_mask bool `[B]`/`[B,Ta]` (True = clean: t_audio = 0, out of the loss);
        audio_valid bool `[B]` (False: a clip without sound; its audio enters as pure noise, t_audio = 1, and is out
        of the loss). Without audio0 the result is the video loss alone, computed exactly as it always was.
        """
        if audio0 is None:
            return self._video_loss(x0, cond, t, noise, clean_mask, num_tokens, generator)
        return self._joint_loss(x0, cond, t, noise, clean_mask, num_tokens, generator, audio0, t_audio, audio_noise,
                                audio_clean_mask, audio_valid, audio_weight)

    def _video_loss(self, x0: torch.Tensor, cond: Cond | None, t: torch.Tensor | None, noise: torch.Tensor | None,
                    clean_mask: torch.Tensor | None, num_tokens: int | None,
                    generator: torch.Generator | None) -> torch.Tensor:
        """`loss` without audio."""
        b, c, frames, h, w = x0.shape
        if noise is None:
            noise = _randn(x0, generator)
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

    def _joint_loss(self, x0: torch.Tensor, cond: Cond | None, t: torch.Tensor | None, noise: torch.Tensor | None,
                    clean_mask: torch.Tensor | None, num_tokens: int | None, generator: torch.Generator | None,
                    audio0: torch.Tensor, t_audio: torch.Tensor | None, audio_noise: torch.Tensor | None,
                    audio_clean_mask: torch.Tensor | None, audio_valid: torch.Tensor | None,
                    audio_weight: float) -> torch.Tensor:
        """`loss` with audio: video term + audio_weight x audio term, each over its own noisy, valid latents."""
        b, c, frames, h, w = x0.shape
        num_audio = audio0.shape[2]
        tokens = num_tokens if num_tokens is not None else num_latent_tokens(x0.shape, self.patch_size)
        if noise is None:
            noise = _randn(x0, generator)
        if t is None:
            t = self.flow.sample_t(b, frames, tokens, generator=generator, device=x0.device)
        if audio_noise is None:
            audio_noise = _randn(audio0, generator)
        if t_audio is None:  # one level per sample, drawn like the video's and independently of it
            t_audio = self.flow.sample_t(b, 1, tokens, generator=generator, device=x0.device).reshape(b, -1)[:, 0]
        t = torch.as_tensor(t, device=x0.device, dtype=torch.float32)
        t_audio = torch.as_tensor(t_audio, device=x0.device, dtype=torch.float32)
        if audio_valid is not None:  # no sound: the audio tokens carry pure noise, t_audio = 1
            silent = ~audio_valid.to(device=x0.device, dtype=torch.bool)
            t_audio = t_audio.masked_fill(silent if t_audio.ndim == 1 else silent[:, None], 1.0)
        x_t = self.flow.add_noise(x0, noise, t)
        a_t = self.flow.add_noise(audio0, audio_noise, t_audio)
        x_in, t_in = apply_clean_frames(x_t, t, x0, clean_mask)
        a_in, t_audio_in = apply_clean_audio(a_t, t_audio, audio0, audio_clean_mask)
        v, v_audio = self.net(x_in, t_in, **(cond or {}), audio=a_in, t_audio=t_audio_in)
        err = (v.float() - self.flow.target(x0, noise).float()).pow(2)  # [B,C,T,H,W]
        keep = torch.ones(b, frames, device=x0.device)
        if clean_mask is not None:
            keep = (~clean_mask.to(x0.device).bool().expand(b, frames)).float()
        keep = keep[:, None, :, None, None]  # [B,1,T,1,1]
        video = (err * keep).sum() / (keep.sum() * c * h * w).clamp_min(1.0)
        err_audio = (v_audio.float() - self.flow.target(audio0, audio_noise).float()).pow(2)  # [B,Ca,Ta]
        keep_audio = torch.ones(b, num_audio, device=x0.device)
        if audio_clean_mask is not None:
            keep_audio = (~_audio_mask(audio_clean_mask, b, num_audio, x0.device)).float()
        if audio_valid is not None:
            keep_audio = keep_audio * audio_valid.to(x0.device).float()[:, None]
        keep_audio = keep_audio[:, None, :]  # [B,1,Ta]
        audio = (err_audio * keep_audio).sum() / (keep_audio.sum() * audio0.shape[1]).clamp_min(1.0)
        return video + audio_weight * audio


def _randn(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """N(0, I) shaped like `like`, drawn on the generator's device, then moved to `like`'s."""
    gen_device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, device=gen_device, dtype=like.dtype).to(like.device)
