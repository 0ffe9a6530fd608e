"""Causal 3D video VAE (Wan 2.1 layout): `1 + 4k` frames at H x W <-> `1 + k` latent frames at H/8 x W/8.

Frame 0 is encoded alone (an image is a 1-frame video; MAGVIT-v2, Yu et al. 2023), later frames
in groups of 4 through causal convolutions. `encode`/`decode` run the whole clip at once, or in
temporal chunks through one `CausalCache` (bit-for-bit the same result up to fp32 rounding,
memory bounded by the chunk), optionally on blended spatial tiles (bounded memory for any
frame size). The VAE owns its latent normalisation: per-channel `latent_mean` / `latent_std`
buffers, measured after training (`vidgen.training.export_vae`) and saved with the weights.

With the `wan21` config the module tree and state-dict keys equal diffusers' `AutoencoderKLWan`
(126,892,531 parameters), so Wan 2.1 weights import by `vidgen.io.convert_wan_vae`.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import torch
from einops import rearrange
from torch import nn

from vidgen.models.causal_conv import CausalCache, CausalConv3d
from vidgen.models.base import LatentStatistics, capture_config
from vidgen.models.tiling import tiled_map
from vidgen.models.vae_blocks import Decoder3d, Encoder3d


def compression(channel_mult: Sequence[int], temporal_downsample: Sequence[bool], patch_size: int = 1,
                ) -> tuple[int, int]:
    """(temporal, spatial) compression of a VAE config: 2 ** (temporal downsamplings), patch * 2 ** (levels - 1)."""
    return 2 ** sum(bool(t) for t in temporal_downsample), int(patch_size) * 2 ** (len(channel_mult) - 1)


def check_frames(num_frames: int, temporal_factor: int) -> int:
    """The 1 + f*k frame rule of the causal VAE: `num_frames` -> latent frames 1 + k, or one clear ValueError."""
    f = temporal_factor
    if num_frames < 1 or (num_frames - 1) % f:
        lo = 1 + f * max(0, (num_frames - 1) // f)
        raise ValueError(f"{num_frames} frames, but the causal VAE maps 1 + {f}k frames to 1 + k latent frames: "
                         f"use {lo} or {lo + f} frames (trim the clip or pad it with its last frame)")
    return 1 + (num_frames - 1) // f


class DiagonalGaussian:
    """Posterior q(z|x) = N(mean, diag(exp(logvar))); mean and logvar are [B, C, t, h, w]."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor) -> None:
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)  # as in LDM / diffusers: keeps exp() finite
        self.std = torch.exp(0.5 * self.logvar)

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> "DiagonalGaussian":
        """moments [B, 2C, t, h, w] (mean channels first, then logvar) -> distribution."""
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised sample z = mean + std * eps, [B, C, t, h, w]; eps drawn from `generator`."""
        gen_device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=gen_device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        """The posterior mean, [B, C, t, h, w] (deterministic latents)."""
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) averaged over latent elements, [B] (Kingma & Welling 2014, App. B)."""
        kl = 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar)
        return kl.flatten(1).mean(dim=1)


class VideoVAE(nn.Module, LatentStatistics):
    """Causal video VAE. x [B, in_channels, 1+f*k, H, W] in [-1, 1] <-> z [B, latent_channels, 1+k, H/s, W/s].

    f = 2 ** sum(temporal_downsample) (4 by default), s = patch_size * 2 ** (len(channel_mult) - 1) (8).
    Args: `base_channels` is the width of level 0, `channel_mult[i]` the width multiplier of level
    i, `num_res_blocks` an int or one count per level, `temporal_downsample[i]` whether the
    downsampling after level i also halves time (the decoder mirrors it), `patch_size` p folds each
    p x p pixel patch into channels before the encoder and unfolds it after the decoder (as Wan 2.2's
    VAE does): level 0 then runs at 1/p of the resolution, p^2 times cheaper (1: Wan 2.1's layout).
    """

    latent_stats_hint = "run python -m vidgen.data.latent_stats on the export"

    def __init__(self, in_channels: int = 3, latent_channels: int = 16, base_channels: int = 96,
                 channel_mult: Sequence[int] = (1, 2, 4, 4), num_res_blocks: int | Sequence[int] = 2,
                 temporal_downsample: Sequence[bool] = (False, True, True), dropout: float = 0.0,
                 patch_size: int = 1) -> None:
        super().__init__()
        self.config = capture_config(VideoVAE, locals())
        # Hydra hands over ListConfig; keep the config JSON-plain (it goes into checkpoints and config.json).
        channel_mult = [int(m) for m in channel_mult]
        temporal_downsample = [bool(t) for t in temporal_downsample]
        if not isinstance(num_res_blocks, int):
            num_res_blocks = [int(n) for n in num_res_blocks]
        self.config.update(channel_mult=channel_mult, temporal_downsample=temporal_downsample,
                           num_res_blocks=num_res_blocks)
        if len(temporal_downsample) != len(channel_mult) - 1:
            raise ValueError(f"temporal_downsample needs {len(channel_mult) - 1} entries (one per downsampling), "
                             f"got {len(temporal_downsample)}")
        if int(patch_size) < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        self.latent_channels, self.patch_size = latent_channels, int(patch_size)
        self.temporal_factor, self.spatial_factor = compression(channel_mult, temporal_downsample, patch_size)
        folded = in_channels * self.patch_size ** 2
        self.encoder = Encoder3d(folded, base_channels, 2 * latent_channels, channel_mult, num_res_blocks,
                                 temporal_downsample, dropout)
        self.quant_conv = CausalConv3d(2 * latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = CausalConv3d(latent_channels, latent_channels, 1)
        self.decoder = Decoder3d(base_channels, latent_channels, channel_mult, num_res_blocks,
                                 temporal_downsample[::-1], dropout, folded)
        self.register_buffer("latent_mean", torch.zeros(latent_channels))
        self.register_buffer("latent_std", torch.ones(latent_channels))

    # ----------------------------------------------------------------- frame / size rules
    def latent_frames(self, num_frames: int) -> int:
        """Latent frames for `num_frames` pixel frames (checks the 1 + f*k rule)."""
        return check_frames(num_frames, self.temporal_factor)

    def pixel_frames(self, latent_frames: int) -> int:
        """Pixel frames decoded from `latent_frames` latent frames: 1 + f*(t-1)."""
        return 1 + self.temporal_factor * (latent_frames - 1)

    def _check_frames(self, t: int) -> None:
        try:
            check_frames(t, self.temporal_factor)
        except ValueError as e:
            raise ValueError(f"VideoVAE got {e}") from None

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.config["in_channels"]:
            raise ValueError(f"VideoVAE.encode expects x [B, {self.config['in_channels']}, T, H, W], got {tuple(x.shape)}")
        self._check_frames(x.shape[2])
        s = self.spatial_factor
        if x.shape[3] % s or x.shape[4] % s:
            raise ValueError(f"VideoVAE got frames of {x.shape[3]}x{x.shape[4]} (HxW); both sides must be "
                             f"multiples of {s} (crop or resize, e.g. to {x.shape[3] // s * s}x{x.shape[4] // s * s})")

    # ----------------------------------------------------------------- encode / decode
    def encode(self, x: torch.Tensor, normalize: bool = False, chunk_size: int | None = None,
               tile_size: int | None = None, tile_overlap: int | None = None) -> DiagonalGaussian:
        """x [B, 3, 1+f*k, H, W] in [-1, 1] -> posterior over z [B, C, 1+k, H/s, W/s].

        normalize: return the posterior of (z - latent_mean) / latent_std (what the DiT sees).
        chunk_size: encode `chunk_size` latent frames at a time through one `CausalCache`
            (equals the whole pass to ~1e-6 in fp32; memory bounded by the chunk).
        tile_size / tile_overlap: spatial tiles in pixels (multiples of s; overlap defaults to
            tile_size // 4), blended with linear ramps. Tiles lack context across seams (and the
            mid-block attention sees one tile): measured on the quickstart `small` VAE, 9x128x128,
            64 px tiles / 16 px overlap, latents differ from the untiled pass by 0.04 std on
            average (max 0.56 std, at seams); 96 px / 32 px: 0.015 (max 0.27). Larger tiles and
            overlaps shrink it; use tiles of >= 256 px for real models.
        """
        self._check_input(x)
        if tile_size is not None and (x.shape[-2] > tile_size or x.shape[-1] > tile_size):
            overlap = self._tile_overlap(tile_size, tile_overlap)
            moments = tiled_map(lambda xt: self._encode_moments(xt, chunk_size), x, tile_size, overlap,
                                1.0 / self.spatial_factor)
        else:
            moments = self._encode_moments(x, chunk_size)
        posterior = DiagonalGaussian.from_moments(moments)
        if normalize:
            mean, std = self._stats(posterior.mean)
            posterior = DiagonalGaussian((posterior.mean - mean) / std, posterior.logvar - 2.0 * std.log())
        return posterior

    def decode(self, z: torch.Tensor, normalized: bool = False, chunk_size: int | None = None,
               tile_size: int | None = None, tile_overlap: int | None = None, clamp: bool = True) -> torch.Tensor:
        """z [B, C, 1+k, h, w] -> x [B, 3, 1+f*k, h*s, w*s], clamped to [-1, 1] unless `clamp=False`.

        normalized: z is (z - latent_mean) / latent_std (DiT space) and is un-normalised first.
        chunk_size: decode `chunk_size` latent frames at a time (same result as whole, bounded memory).
        tile_size / tile_overlap: spatial tiles in output pixels (multiples of s), blended with
            linear ramps. Measured on the quickstart `small` VAE, 9x128x128 (pixels in [-1, 1]):
            64 px tiles / 16 px overlap differ from the untiled decode by 0.0125 mean abs (max
            0.23); tiled encode + decode vs untiled: 36.6 dB PSNR, reconstruction PSNR unchanged
            (18.83 vs 18.75 dB); 64 / 32: 41.3 dB; 96 / 32: 46.5 dB. tests/test_vae_training.py
            bounds it on a trained tiny VAE (measured 36 dB, asserted >= 28 dB at 32 px tiles / 16 px).
        """
        if z.ndim != 5 or z.shape[1] != self.latent_channels:
            raise ValueError(f"VideoVAE.decode expects z [B, {self.latent_channels}, t, h, w], got {tuple(z.shape)}")
        if normalized:
            mean, std = self._stats(z)
            z = z * std + mean
        s = self.spatial_factor
        if tile_size is not None and (z.shape[-2] * s > tile_size or z.shape[-1] * s > tile_size):
            overlap = self._tile_overlap(tile_size, tile_overlap)
            x = tiled_map(lambda zt: self._decode_pixels(zt, chunk_size), z, tile_size // s, overlap // s, float(s))
        else:
            x = self._decode_pixels(z, chunk_size)
        return x.clamp(-1.0, 1.0) if clamp else x

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Training pass: x [B, 3, T, H, W] -> (unclamped reconstruction [B, 3, T, H, W], posterior)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z, clamp=False), posterior

    def _encode_moments(self, x: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
        """x [B, 3, 1+f*k, H, W] -> moments [B, 2C, 1+k, H/s, W/s], whole or chunk by chunk."""
        x = self._fold(x)
        if chunk_size is None:
            return self.quant_conv(self.encoder(x))
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 latent frame, got {chunk_size}")
        f, cache, outs = self.temporal_factor, CausalCache(), []
        start, end = 0, 1 + f * (chunk_size - 1)  # chunk i -> latent frames [i*c, (i+1)*c)
        while start < x.shape[2]:
            outs.append(self.quant_conv(self.encoder(x[:, :, start:end], cache)))
            start, end = end, end + f * chunk_size
        return torch.cat(outs, dim=2)

    def _decode_pixels(self, z: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
        """z [B, C, t, h, w] -> unclamped x [B, 3, 1+f*(t-1), h*s, w*s], whole or chunk by chunk."""
        if chunk_size is None:
            return self._unfold(self.decoder(self.post_quant_conv(z)))
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 latent frame, got {chunk_size}")
        return torch.cat(list(self.decode_stream(z.split(chunk_size, dim=2), clamp=False)), dim=2)

    def decode_stream(self, chunks: Iterable[torch.Tensor], normalized: bool = False,
                      clamp: bool = True) -> Iterator[torch.Tensor]:
        """Latent chunks `[B, C, k_i, h, w]` in order -> their pixel frames, one chunk at a time, through one
        `CausalCache` (the first chunk's first latent frame gives 1 frame, every other latent frame 4): the
        frames equal those of decoding the concatenated chunks whole, and memory does not grow with their number.
        """
        cache = CausalCache()
        for z in chunks:
            if normalized:
                mean, std = self._stats(z)
                z = z * std + mean
            x = self._unfold(self.decoder(self.post_quant_conv(z), cache))
            yield x.clamp(-1.0, 1.0) if clamp else x

    def _fold(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels [B, c, T, H, W] -> patches [B, c*p*p, T, H/p, W/p] (identity for p = 1)."""
        p = self.patch_size
        return x if p == 1 else rearrange(x, "b c t (h p) (w q) -> b (c p q) t h w", p=p, q=p)

    def _unfold(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of `_fold`."""
        p = self.patch_size
        return x if p == 1 else rearrange(x, "b (c p q) t h w -> b c t (h p) (w q)", p=p, q=p)

    def _tile_overlap(self, tile_size: int, tile_overlap: int | None) -> int:
        overlap = tile_size // 4 if tile_overlap is None else tile_overlap
        s = self.spatial_factor
        if tile_size % s or overlap % s:
            raise ValueError(f"tile_size ({tile_size}) and tile_overlap ({overlap}) must be multiples of {s} px")
        return overlap
