"""Causal 1D audio VAE on the waveform: `[B, C, S]` samples in [-1, 1] <-> latents `[B, Cz, S / hop]`.

It models the waveform itself, not a mel spectrogram: a mel VAE would need a vocoder to turn decoded mels back
into sound, a second model to train or download; here the decoder outputs samples. The layout follows the
SEANet / DAC family (Tagliasacchi et al. 2020; Kumar et al. 2023, "High-Fidelity Audio Compression with
Improved RVQGAN"): strided convolutions with residual units of dilated convs and Snake activations, without
the quantiser (a diagonal Gaussian posterior, as the video VAE's). Every conv is causal (padded on the past
side only), so latent `j` depends only on samples `< (j + 1) * hop` and output sample `n` only on latents
`<= n // hop`; audio therefore encodes and decodes chunk by chunk through one `CausalCache` (the video VAE's)
with exactly the whole-clip result. Latent normalisation (`latent_mean` / `latent_std`) lives here, as in
`VideoVAE`, so a DiT sees ~unit-variance latents.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vidgen.models.base import LatentStatistics, capture_config
from vidgen.models.causal_conv import CausalCache
from vidgen.models.vae import DiagonalGaussian


def audio_latents_per_video_latent(audio_rate: int, hop: int, fps: float, video_time_stride: int) -> int:
    """Audio latents spanning one video latent frame: (audio_rate / hop) / (fps / video_time_stride).

    E.g. 24000 Hz, hop 400 (60 latents/s), 15 fps, 2x temporal video compression (7.5 latent frames/s) -> 8.
    The joint DiT needs an integer; anything else is one ValueError naming the numbers. (The causal video VAE's
    first latent frame covers one frame, not `video_time_stride`; this is the rate of every later one.)
    """
    values = {"audio_rate": audio_rate, "hop": hop, "fps": fps, "video_time_stride": video_time_stride}
    if any(not v > 0 for v in values.values()):
        raise ValueError(f"audio_latents_per_video_latent needs positive numbers, got {values}")
    fps_exact = Fraction(fps).limit_denominator(1_000_000)  # 29.97 -> 2997/100, 15.0 -> 15
    ratio = Fraction(int(audio_rate), int(hop)) * int(video_time_stride) / fps_exact
    if ratio.denominator != 1:
        raise ValueError(f"{audio_rate} Hz / hop {hop} = {float(Fraction(audio_rate, hop)):g} audio latents/s against "
                         f"{fps:g} fps / {video_time_stride} = {float(fps_exact / video_time_stride):g} video latents/s "
                         f"gives {float(ratio):g} audio latents per video latent, not an integer")
    return int(ratio)


# ---------------------------------------------------------------------------------------------- causal layers
class CausalConv1d(nn.Conv1d):
    """1D conv padded on the past side only: x [B, C_in, S] -> [B, C_out, S / stride].

    Pad `(k - 1) * dilation + 1 - stride` samples before sample 0, so output `j` sees inputs `< (j + 1) * stride`.
    With a `cache`, the padding is the previous chunk's last input samples instead of zeros (chunks must be
    multiples of `stride`), so `conv(cat(a, b)) == cat(conv(a, cache), conv(b, cache))`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, dilation=dilation)
        self.causal_pad = (kernel_size - 1) * dilation + 1 - stride
        if self.causal_pad < 0:
            raise ValueError(f"CausalConv1d: kernel {kernel_size} (dilation {dilation}) is shorter than stride {stride}")

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        s = self.stride[0]
        if x.shape[-1] % s:
            raise ValueError(f"CausalConv1d with stride {s} got {x.shape[-1]} samples; chunks must be multiples of {s}")
        if self.causal_pad == 0:
            return super().forward(x)
        past = cache.get(self) if cache is not None else None
        x = F.pad(x, (self.causal_pad, 0)) if past is None else torch.cat([past.to(x.dtype), x], dim=-1)
        if cache is not None:
            # From the padded input, so chunks shorter than the pad stay exact; a clone frees the chunk.
            cache.put(self, x[..., -self.causal_pad:].clone())
        return super().forward(x)


class CausalConvTranspose1d(nn.ConvTranspose1d):
    """Upsampling transposed conv, kernel 2 * stride: z [B, C_in, L] -> [B, C_out, L * stride].

    Input j writes outputs [j*s, j*s + 2s); output n thus depends on inputs n // s and n // s - 1 (causal). The
    last s outputs of a chunk overlap the next chunk: a `cache` carries them (without bias) and adds them to the
    next chunk's first s outputs (overlap-add), which equals the whole-clip result.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__(in_channels, out_channels, 2 * stride, stride=stride)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        s = self.stride[0]
        y = F.conv_transpose1d(x, self.weight, None, stride=s)  # [B, C_out, (L + 1) * s]
        tail = cache.get(self) if cache is not None else None
        if tail is not None:
            y = torch.cat([y[..., :s] + tail.to(y.dtype), y[..., s:]], dim=-1)
        if cache is not None:
            cache.put(self, y[..., -s:].clone())
        return y[..., :-s] + self.bias[:, None]


class Snake(nn.Module):
    """Snake activation x + sin^2(a x) / a with a learned a per channel (Ziyin et al. 2020; used by BigVGAN and
    DAC for its periodic inductive bias on audio). Pointwise, so causal. x [B, C, S] -> same shape."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.sin(self.alpha * x).pow(2) / (self.alpha + 1e-9)


class ResidualUnit(nn.Module):
    """x + conv1x1(snake(conv7_dilated(snake(x)))), all causal; x [B, C, S] -> same shape (DAC's residual unit)."""

    def __init__(self, dim: int, dilation: int) -> None:
        super().__init__()
        self.act1, self.conv1 = Snake(dim), CausalConv1d(dim, dim, 7, dilation=dilation)
        self.act2, self.conv2 = Snake(dim), CausalConv1d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        return x + self.conv2(self.act2(self.conv1(self.act1(x), cache)))


class EncoderBlock(nn.Module):
    """Residual units at `in_dim`, then a strided causal conv: [B, in_dim, S] -> [B, out_dim, S / stride]."""

    def __init__(self, in_dim: int, out_dim: int, stride: int, dilations: Sequence[int]) -> None:
        super().__init__()
        self.units = nn.ModuleList([ResidualUnit(in_dim, d) for d in dilations])
        self.act = Snake(in_dim)
        self.down = CausalConv1d(in_dim, out_dim, 2 * stride, stride=stride)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        for unit in self.units:
            x = unit(x, cache)
        return self.down(self.act(x), cache)


class DecoderBlock(nn.Module):
    """A causal transposed conv, then residual units at `out_dim`: [B, in_dim, L] -> [B, out_dim, L * stride]."""

    def __init__(self, in_dim: int, out_dim: int, stride: int, dilations: Sequence[int]) -> None:
        super().__init__()
        self.act = Snake(in_dim)
        self.up = CausalConvTranspose1d(in_dim, out_dim, stride)
        self.units = nn.ModuleList([ResidualUnit(out_dim, d) for d in dilations])

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        x = self.up(self.act(x), cache)
        for unit in self.units:
            x = unit(x, cache)
        return x


class AudioEncoder(nn.Module):
    """Waveform [B, C, S] -> moments [B, 2 * Cz, S / hop] (mean channels, then logvar)."""

    def __init__(self, in_channels: int, widths: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
                 out_channels: int) -> None:
        super().__init__()
        self.conv_in = CausalConv1d(in_channels, widths[0], 7)
        self.blocks = nn.ModuleList([EncoderBlock(widths[i], widths[i + 1], s, dilations) for i, s in enumerate(strides)])
        self.act = Snake(widths[-1])
        self.conv_out = CausalConv1d(widths[-1], out_channels, 3)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        x = self.conv_in(x, cache)
        for block in self.blocks:
            x = block(x, cache)
        return self.conv_out(self.act(x), cache)


class AudioDecoder(nn.Module):
    """Latents [B, Cz, L] -> waveform [B, C, L * hop] (unclamped); the encoder's mirror."""

    def __init__(self, latent_channels: int, widths: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
                 out_channels: int) -> None:
        super().__init__()
        self.conv_in = CausalConv1d(latent_channels, widths[-1], 7)
        levels = range(len(strides) - 1, -1, -1)
        self.blocks = nn.ModuleList([DecoderBlock(widths[i + 1], widths[i], strides[i], dilations) for i in levels])
        self.act = Snake(widths[0])
        self.conv_out = CausalConv1d(widths[0], out_channels, 7)

    def forward(self, z: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        x = self.conv_in(z, cache)
        for block in self.blocks:
            x = block(x, cache)
        return self.conv_out(self.act(x), cache)


# ---------------------------------------------------------------------------------------------- the VAE
class AudioVAE(nn.Module, LatentStatistics):
    """Causal waveform VAE. x [B, in_channels, S] in [-1, 1], S a multiple of hop <-> z [B, latent_channels, S / hop].

    hop = prod(strides); latents per second = sample_rate / hop (24000 / 400 = 60 with the defaults).
    `base_channels` is the width at the sample rate, `channel_mult[i]` the width multiplier after the i-th
    downsampling, `dilations` those of the residual units at every level. `sample_rate` is recorded (the rate
    the model was trained at; it changes no computation).
    """

    latent_stats_hint = "vidgen.training.audio_vae_module.store_latent_stats"

    def __init__(self, in_channels: int = 1, latent_channels: int = 16, base_channels: int = 16,
                 channel_mult: Sequence[int] = (2, 4, 8, 16), strides: Sequence[int] = (2, 4, 5, 10),
                 dilations: Sequence[int] = (1, 3, 9), sample_rate: int = 24000) -> None:
        super().__init__()
        self.config = capture_config(AudioVAE, locals())
        # Hydra hands over ListConfig; keep the config JSON-plain (it goes into checkpoints and config.json).
        channel_mult, strides, dilations = ([int(v) for v in seq] for seq in (channel_mult, strides, dilations))
        self.config.update(channel_mult=channel_mult, strides=strides, dilations=dilations)
        if len(channel_mult) != len(strides):
            raise ValueError(f"channel_mult needs one entry per stride ({len(strides)}), got {len(channel_mult)}")
        if not strides or min(strides) < 1:
            raise ValueError(f"strides must be positive integers, got {strides}")
        self.in_channels, self.latent_channels = int(in_channels), int(latent_channels)
        self.sample_rate, self.hop = int(sample_rate), math.prod(strides)
        widths = [base_channels] + [base_channels * m for m in channel_mult]
        self.encoder = AudioEncoder(in_channels, widths, strides, dilations, 2 * latent_channels)
        self.decoder = AudioDecoder(latent_channels, widths, strides, dilations, in_channels)
        self.register_buffer("latent_mean", torch.zeros(latent_channels))
        self.register_buffer("latent_std", torch.ones(latent_channels))

    @property
    def latent_rate(self) -> float:
        """Latents per second: sample_rate / hop."""
        return self.sample_rate / self.hop

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 3 or x.shape[1] != self.in_channels:
            raise ValueError(f"AudioVAE.encode expects x [B, {self.in_channels}, S], got {tuple(x.shape)}")
        s, h = x.shape[-1], self.hop
        if s == 0 or s % h:
            lo = s // h * h
            raise ValueError(f"AudioVAE got {s} samples; the encoder's hop is {h} (strides {self.config['strides']}): "
                             f"use a multiple of {h} (e.g. {lo or h} or {lo + h}; trim or pad the audio)")

    # ----------------------------------------------------------------- encode / decode
    def encode(self, x: torch.Tensor, normalize: bool = False, chunk_size: int | None = None,
               cache: CausalCache | None = None) -> DiagonalGaussian:
        """x [B, C, S] in [-1, 1] -> posterior over z [B, Cz, S / hop].

        normalize: the posterior of (z - latent_mean) / latent_std (what a DiT sees).
        chunk_size: encode `chunk_size` latents (chunk_size * hop samples) at a time through one `CausalCache`.
        cache: `x` continues the stream this cache holds (create one `CausalCache()` per stream and pass it with
            every piece in order; pieces may differ in length, each a multiple of hop): the latents equal those
            of encoding the concatenated pieces whole.
        """
        self._check_input(x)
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 latent, got {chunk_size}")
        if chunk_size is None:
            moments = self.encoder(x, cache)
        else:
            cache = cache if cache is not None else CausalCache()
            moments = torch.cat([self.encoder(piece, cache) for piece in x.split(chunk_size * self.hop, dim=-1)], dim=-1)
        posterior = DiagonalGaussian.from_moments(moments)
        if normalize:
            mean, std = self._stats(posterior.mean)
            posterior = DiagonalGaussian((posterior.mean - mean) / std, posterior.logvar - 2.0 * std.log())
        return posterior

    def decode(self, z: torch.Tensor, normalized: bool = False, chunk_size: int | None = None,
               cache: CausalCache | None = None, clamp: bool = True) -> torch.Tensor:
        """z [B, Cz, L] -> x [B, C, L * hop], clamped to [-1, 1] unless `clamp=False`.

        normalized: z is (z - latent_mean) / latent_std (DiT space) and is un-normalised first.
        chunk_size / cache: as in `encode` (chunks of latents; one cache per decoded stream, not the encoder's).
        """
        if z.ndim != 3 or z.shape[1] != self.latent_channels or z.shape[-1] == 0:
            raise ValueError(f"AudioVAE.decode expects z [B, {self.latent_channels}, L >= 1], got {tuple(z.shape)}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 latent, got {chunk_size}")
        if normalized:
            mean, std = self._stats(z)
            z = z * std + mean
        if chunk_size is None:
            x = self.decoder(z, cache)
        else:
            cache = cache if cache is not None else CausalCache()
            x = torch.cat([self.decoder(piece, cache) for piece in z.split(chunk_size, dim=-1)], dim=-1)
        return x.clamp(-1.0, 1.0) if clamp else x

    def decode_stream(self, chunks: Iterable[torch.Tensor], normalized: bool = False,
                      clamp: bool = True) -> Iterator[torch.Tensor]:
        """Latent chunks [B, Cz, L_i] in order -> their samples [B, C, L_i * hop], one chunk at a time, through
        one `CausalCache`: equal to decoding the concatenated chunks whole; memory does not grow with their number."""
        cache = CausalCache()
        for z in chunks:
            yield self.decode(z, normalized=normalized, cache=cache, clamp=clamp)

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Training pass: x [B, C, S] -> (unclamped reconstruction [B, C, S], posterior)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z, clamp=False), posterior

    # ----------------------------------------------------------------- latent statistics (LatentStatistics)
    def export_extra(self) -> dict[str, Any]:
        """config.json keys of an export: the latent statistics and the latent rate (readable without the weights)."""
        return {**super().export_extra(), "hop": self.hop, "latent_rate": self.latent_rate}
