"""Lightning module that trains the causal spectrogram audio VAE by the video VAE's recipe.

Loss = l1_weight * L1 on the log-magnitude features + stft_weight * spectral convergence of the linear magnitudes
(Yamamoto et al. 2020, Eq. 4: the loud bins, where the L1 on logs weighs every bin alike) + kl_weight * KL (+ the
adaptive hinge GAN of a multi-scale discriminator over the feature frames after `disc_start`, MelGAN's layout,
Kumar et al. 2019; weighted as taming's, Esser et al. 2021, Eq. 7). The Griffin-Lim vocoder has no weights: the
loss never passes through it; validation does (its metrics are on the decoded samples). As in `VAEModule`: manual
optimisation with two optimizers where only the VAE step advances `global_step`, gradient clipping here,
posterior noise from the per-step generator (exact resume), EMA by the shared callback.

Batches are {"audio": [B, C, S] float in [-1, 1], "audio_valid": [B] bool, ...}: a clip whose `audio_valid` is
False gets weight 0 in every loss and metric (its input is zeroed first so it cannot bring NaNs). A batch with
no valid clip on any rank is skipped (no step). S need not be a multiple of the VAE's hop: the last S % hop
samples are left out.
"""

from __future__ import annotations

import logging
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Iterable

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from vidgen.eval.audio import log_mel_l1, snr_db, spectral_convergence, stft_magnitude
from vidgen.io.checkpoint import describe, part_spec
from vidgen.io.pretrained import load_pretrained, read_config, save_pretrained
from vidgen.models.audio_vae import AudioVAE
from vidgen.training.losses import adaptive_gan_weight
from vidgen.training.rng import step_generator
from vidgen.training.vae_module import AutoencoderOptimisation

log = logging.getLogger(__name__)
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")  # see vae_module.py
KIND = "audio_vae"  # checkpoint kind and part name (vidgen.io.checkpoint)


def _no_step_count() -> None:
    """Replaces Lightning's step-progress hook on the discriminator optimizer (one global step per batch)."""


def weighted_mean(per_clip: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum(per_clip * weight) / max(sum(weight), 1): the mean over valid clips (weight 1) ignoring the rest (0)."""
    return (per_clip * weight).sum() / weight.sum().clamp_min(1.0)


class WaveDiscriminator(nn.Module):
    """MelGAN's discriminator at one scale, over a sequence: x [B, C, T] -> logits [B, 1, T / 4^num_layers]
    (here C = the audio VAE's feature channels, T = spectrogram frames).

    Grouped strided convs (kernel 41, stride 4) keep it cheap; LeakyReLU 0.2; no normalisation over the batch.
    """

    def __init__(self, in_channels: int = 1, channels: int = 16, num_layers: int = 3, max_channels: int = 256) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv1d(in_channels, channels, 15, padding=7), nn.LeakyReLU(0.2)]
        c = channels
        for _ in range(num_layers):
            c_out = min(c * 4, max_channels)
            layers += [nn.Conv1d(c, c_out, 41, stride=4, padding=20, groups=max(1, c // 4)), nn.LeakyReLU(0.2)]
            c = c_out
        layers += [nn.Conv1d(c, c, 5, padding=2), nn.LeakyReLU(0.2), nn.Conv1d(c, 1, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MultiScaleDiscriminator(nn.Module):
    """`num_scales` WaveDiscriminators on x, x average-pooled 2x, 4x, ... (MelGAN): x [B, C, T] -> list of logits."""

    def __init__(self, in_channels: int = 1, channels: int = 16, num_layers: int = 3, num_scales: int = 3) -> None:
        super().__init__()
        self.scales = nn.ModuleList([WaveDiscriminator(in_channels, channels, num_layers) for _ in range(num_scales)])
        self.pool = nn.AvgPool1d(4, stride=2, padding=1, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        logits = []
        for i, disc in enumerate(self.scales):
            if i:
                x = self.pool(x)
            logits.append(disc(x))
        return logits


def hinge_d_per_clip(real: list[torch.Tensor], fake: list[torch.Tensor]) -> torch.Tensor:
    """Discriminator hinge loss per clip [B], averaged over scales (as `losses.hinge_d_loss`, per clip)."""
    terms = [0.5 * (F.relu(1.0 - r).flatten(1).mean(1) + F.relu(1.0 + f).flatten(1).mean(1)) for r, f in zip(real, fake)]
    return torch.stack(terms).mean(0)


def hinge_g_per_clip(fake: list[torch.Tensor]) -> torch.Tensor:
    """Generator hinge loss -D(G(z)) per clip [B], averaged over scales."""
    return torch.stack([-f.flatten(1).mean(1) for f in fake]).mean(0)


class AudioVAEModule(AutoencoderOptimisation, pl.LightningModule):
    """Trains `vae` (an `AudioVAE`) on batches {"audio": [B, C, S] in [-1, 1], "audio_valid": [B] bool, ...}.

    optimizer / disc_optimizer / scheduler are `functools.partial`s (Hydra `_partial_: true`), completed in
    `configure_optimizers`. `disc_start=None` disables the discriminator. Validation logs `val/snr_db`,
    `val/mel_l1` (log10-mel L1), `val/stft_sc` (spectral convergence at n_fft 1024) and `val/l1`.
    """

    def __init__(self, vae: AudioVAE, optimizer: partial, disc_optimizer: partial | None = None,
                 scheduler: partial | None = None, l1_weight: float = 1.0, stft_weight: float = 1.0,
                 kl_weight: float = 1e-4, disc_start: int | None = None, disc_weight: float = 0.5,
                 disc_channels: int = 32, disc_layers: int = 2, disc_scales: int = 2, grad_clip: float | None = 1.0,
                 sample_posterior: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["vae", "optimizer", "disc_optimizer", "scheduler"])
        self.automatic_optimization = False
        self.vae = vae
        self.optimizer_factory, self.disc_optimizer_factory, self.scheduler_factory = optimizer, disc_optimizer, scheduler
        features = vae.in_channels * vae.bins
        self.discriminator = (MultiScaleDiscriminator(features, disc_channels, disc_layers, disc_scales)
                              if disc_start is not None else None)
        self.skipped_batches = 0

    def prepare_batch(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """batch -> (audio [B, C, S // hop * hop] with invalid clips zeroed, weight [B]: 1 valid, 0 not)."""
        x = batch["audio"]
        if x.ndim != 3 or x.shape[1] != self.vae.in_channels:
            raise ValueError(f"batch['audio'] must be [B, {self.vae.in_channels}, S], got {tuple(x.shape)}")
        hop = self.vae.hop
        if x.shape[-1] < hop:
            raise ValueError(f"batch['audio'] holds {x.shape[-1]} samples, fewer than the VAE's hop ({hop})")
        x = x[..., : x.shape[-1] // hop * hop].float()
        valid = batch.get("audio_valid")
        valid = torch.ones(x.shape[0], dtype=torch.bool, device=x.device) if valid is None else valid.to(x.device).bool()
        x = torch.where(valid[:, None, None], x, torch.zeros((), device=x.device))
        return x, valid.float()

    def reconstruction_losses(self, x: torch.Tensor, w: torch.Tensor,
                              generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The VAE's losses on audio x [B, C, S] with clip weights w [B] -> {"loss", "rec", "recon", terms...}.

        "recon" = the reconstructed features; "rec" = l1_weight * L1 + stft_weight * SC, "loss" = rec + kl_weight *
        KL; each a mean over valid clips.
        """
        hp = self.hparams
        recon, target, posterior = self.vae(x, sample_posterior=hp.sample_posterior, generator=generator)
        l1 = weighted_mean((recon - target).abs().flatten(1).mean(1), w)
        mag, mag_hat = self.vae.features_to_magnitude(target), self.vae.features_to_magnitude(recon)
        sc = weighted_mean(spectral_convergence(mag, mag_hat), w)
        kl = weighted_mean(posterior.kl(), w)
        rec = hp.l1_weight * l1 + hp.stft_weight * sc
        return {"loss": rec + hp.kl_weight * kl, "rec": rec, "recon": recon, "target": target, "l1": l1,
                "stft_sc": sc, "kl": kl}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        x, w = self.prepare_batch(batch)
        if not self.trainer.strategy.reduce_boolean_decision(bool(w.any()), all=False):
            self.skipped_batches += 1  # no rank has audio: no step (ranks with none below step with weight 0)
            self.log("train/skipped_no_audio", float(self.skipped_batches))
            return None
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        hp = self.hparams
        disc_on = self.discriminator is not None and self.global_step >= hp.disc_start

        # Posterior noise from a generator seeded by (seed, step, rank): a resumed run repeats it exactly.
        out = self.reconstruction_losses(x, w, step_generator(self.global_step, self.global_rank))
        loss, recon = out["loss"], out["recon"]
        logs = {f"train/{k}": out[k] for k in ("l1", "stft_sc", "kl")}
        if disc_on:
            self.discriminator.requires_grad_(False)  # generator step: no D gradients
            g_loss = weighted_mean(hinge_g_per_clip(self.discriminator(recon)), w)
            d_weight = hp.disc_weight * adaptive_gan_weight(out["rec"], g_loss, self.vae.decoder.conv_out.weight)
            loss = loss + d_weight * g_loss
            logs.update({"train/g_loss": g_loss, "train/d_weight": d_weight})
        self._step(opts[0], loss)
        if disc_on:
            self.discriminator.requires_grad_(True)
            d_loss = weighted_mean(hinge_d_per_clip(self.discriminator(out["target"]), self.discriminator(recon.detach())),
                                   w)
            opts[1]._on_before_step = opts[1]._on_after_step = _no_step_count  # one global step per batch
            self._step(opts[1], d_loss)
            logs["train/d_loss"] = d_loss
        for sch in self._schedulers():
            sch.step()
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict(logs)
        return loss.detach()

    def _schedulers(self) -> list[Any]:
        schs = self.lr_schedulers()
        return [] if schs is None else schs if isinstance(schs, list) else [schs]

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x, w = self.prepare_batch(batch)
        heard = w * (x.pow(2).flatten(1).sum(1) > 0)  # a silent clip has no finite SNR: left out of the means
        if not heard.any():
            return
        recon = self.vae.decode(self.vae.encode(x).mode())  # deterministic, clamped
        keep = heard.bool()
        x, recon = x[keep], recon[keep]
        metrics = {"val/snr_db": snr_db(x, recon).mean(), "val/mel_l1": log_mel_l1(x, recon, self.vae.sample_rate).mean(),
                   "val/stft_sc": spectral_convergence(stft_magnitude(x), stft_magnitude(recon)).mean(),
                   "val/l1": (recon - x).abs().mean()}
        self.log_dict(metrics, sync_dist=True, batch_size=int(keep.sum()))

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The one checkpoint format (vidgen.io.checkpoint): `python -m vidgen.io.checkpoint` rebuilds the AudioVAE.
        checkpoint.setdefault("vidgen", {}).update(describe(KIND, {KIND: part_spec("vae.", self.vae)}))


# ---------------------------------------------------------------------------------------------- latent statistics
@torch.no_grad()
def measure_latent_stats(vae: AudioVAE, batches: Iterable[dict[str, Any] | torch.Tensor],
                         max_clips: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std [Cz] of the posterior-mean latents over up to `max_clips` valid clips.

    batches: dicts with "audio" [B, C, S] (+ "audio_valid") or such tensors; S is trimmed to a multiple of hop.
    """
    device = next(vae.parameters()).device
    c, hop = vae.latent_channels, vae.hop
    total, total_sq = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
    count = clips = 0
    for batch in batches:
        x = batch["audio"] if isinstance(batch, dict) else batch
        if isinstance(batch, dict) and batch.get("audio_valid") is not None:
            x = x[batch["audio_valid"].bool()]
        x = x[: max_clips - clips, ..., : x.shape[-1] // hop * hop].to(device, torch.float32)
        if x.shape[0] == 0 or x.shape[-1] == 0:
            continue
        z = vae.encode(x).mode().double().cpu().transpose(0, 1).reshape(c, -1)  # [Cz, B * L]
        total += z.sum(dim=1)
        total_sq += z.pow(2).sum(dim=1)
        count, clips = count + z.shape[1], clips + x.shape[0]
        if clips >= max_clips:
            break
    if clips == 0:
        raise ValueError("measure_latent_stats got no valid audio clips")
    mean = total / count
    std = (total_sq / count - mean.pow(2)).clamp_min(1e-12).sqrt()
    log.info("audio latent statistics from %d clips (%d latents)", clips, count)
    return mean.float(), std.float()


def store_latent_stats(folder: str | Path, batches: Iterable[dict[str, Any]], clips: int,
                       device: str = "cpu") -> AudioVAE:
    """Measure the latent mean/std of the AudioVAE model folder `folder` (config.json + model.safetensors; in an
    export of a training checkpoint, its `audio_vae/` subfolder) over `clips` clips and write them into it."""
    meta = read_config(folder, AudioVAE)
    vae = load_pretrained(folder, AudioVAE).to(device).eval()
    vae.set_latent_stats(*measure_latent_stats(vae, batches, clips))
    extra = {k: v for k, v in meta.items() if k not in ("class", "config", *vae.export_extra())}
    save_pretrained(vae, folder, extra={**extra, "latent_stats_clips": clips})
    return vae
