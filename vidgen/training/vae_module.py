"""Lightning module that trains the causal video VAE on joint image + video batches.

Loss = l1 + lpips_weight * LPIPS + kl_weight * KL (+ d_weight * hinge GAN after `disc_start`),
with the GAN term scaled adaptively (taming-transformers, Esser et al. 2021). Two optimizers
(VAE, discriminator) -> manual optimisation; only the VAE step advances `global_step`, so
`trainer.max_steps`, `disc_start` and the EMA count batches. Gradient clipping is done here
(`grad_clip`): Lightning's `trainer.gradient_clip_val` does not apply to manual optimisation.
"""

from __future__ import annotations

import logging
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from vidgen.eval.metrics import psnr, ssim
from vidgen.eval.vae import recon_strip
from vidgen.io.checkpoint import describe, part_spec
from vidgen.io.video import to_uint8_video, write_video
from vidgen.models.vae import VideoVAE
from vidgen.training.rng import step_generator
from vidgen.training.losses import (PatchDiscriminator3D, ReconstructionLoss, adaptive_gan_weight, hinge_d_loss,
                                    hinge_g_loss)

log = logging.getLogger(__name__)
# Our checkpoints hold the post-step weights together with the advanced step counter, which is what a
# resume needs; Lightning's note about pre-optimisation states does not apply here.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


def _no_step_count() -> None:
    """Replaces Lightning's step-progress hook on the discriminator optimizer (see module docstring)."""


class AutoencoderOptimisation:
    """The optimisation both VAE tasks share (`VAEModule`, `AudioVAEModule`): the autoencoder's optimizer, the
    discriminator's when there is one (its own factory or the same), per-step schedulers, and one manual step with
    optional gradient clipping. Expects `vae`, `discriminator` (or None), `optimizer_factory`,
    `disc_optimizer_factory`, `scheduler_factory` and `hparams.grad_clip` on the LightningModule it is mixed into.
    """

    def configure_optimizers(self) -> Any:
        opts = [self.optimizer_factory(params=self.vae.parameters())]
        if self.discriminator is not None:
            make = self.disc_optimizer_factory or self.optimizer_factory
            opts.append(make(params=self.discriminator.parameters()))
        if self.scheduler_factory is None:
            return opts
        return opts, [{"scheduler": self.scheduler_factory(optimizer=o), "interval": "step"} for o in opts]

    def _step(self, opt: Any, loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.hparams.grad_clip:
            self.clip_gradients(opt, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")
        opt.step()


class VAEModule(AutoencoderOptimisation, pl.LightningModule):
    """Trains `vae` on batches {"video": [B, 3, T, H, W] in [-1, 1], ...}; T = 1 is an image batch.

    optimizer / disc_optimizer / scheduler are `functools.partial`s (Hydra `_partial_: true`),
    completed in `configure_optimizers`. `disc_start=None` disables the discriminator.
    """

    def __init__(self, vae: VideoVAE, optimizer: partial, disc_optimizer: partial | None = None,
                 scheduler: partial | None = None, l1_weight: float = 1.0, lpips_weight: float = 1.0,
                 lpips_weights: str | None = None, kl_weight: float = 1e-6, disc_start: int | None = None,
                 disc_weight: float = 0.5, disc_channels: int = 64, disc_layers: int = 3,
                 grad_clip: float | None = 1.0, sample_posterior: bool = True, log_video_every: int = 500,
                 log_video_fps: float = 8.0) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["vae", "optimizer", "disc_optimizer", "scheduler"])
        self.automatic_optimization = False
        self.vae = vae
        self.optimizer_factory, self.disc_optimizer_factory, self.scheduler_factory = optimizer, disc_optimizer, scheduler
        self.rec_loss = ReconstructionLoss(l1_weight, lpips_weight, lpips_weights)
        self.discriminator = (PatchDiscriminator3D(vae.config["in_channels"], disc_channels, disc_layers)
                              if disc_start is not None else None)


    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x = batch["video"]
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        hp = self.hparams
        disc_on = self.discriminator is not None and self.global_step >= hp.disc_start

        # Posterior noise from a generator seeded by (seed, step, rank): a resumed run repeats it exactly.
        recon, posterior = self.vae(x, sample_posterior=hp.sample_posterior,
                                    generator=step_generator(self.global_step, self.global_rank))
        rec = self.rec_loss(x, recon)
        kl = posterior.kl().mean()
        loss = rec["rec"] + hp.kl_weight * kl
        logs = {"train/l1": rec["l1"], "train/kl": kl}
        if self.rec_loss.lpips is not None:
            logs["train/lpips"] = rec["lpips"]
        if disc_on:
            self.discriminator.requires_grad_(False)  # generator step: no D gradients
            g_loss = hinge_g_loss(self.discriminator(recon))
            d_weight = hp.disc_weight * adaptive_gan_weight(rec["rec"], g_loss, self.vae.decoder.conv_out.weight)
            loss = loss + d_weight * g_loss
            logs.update({"train/g_loss": g_loss, "train/d_weight": d_weight})
        self._step(opts[0], loss)
        if disc_on:
            self.discriminator.requires_grad_(True)
            d_loss = hinge_d_loss(self.discriminator(x.detach()), self.discriminator(recon.detach()))
            opts[1]._on_before_step = opts[1]._on_after_step = _no_step_count  # one global step per batch
            self._step(opts[1], d_loss)
            logs["train/d_loss"] = d_loss
        for sch in self._schedulers():
            sch.step()
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict(logs)
        if hp.log_video_every and self.global_step % hp.log_video_every == 0:
            self._log_reconstruction(x[0], recon[0].detach())
        return loss.detach()

    def _schedulers(self) -> list[Any]:
        schs = self.lr_schedulers()
        return [] if schs is None else schs if isinstance(schs, list) else [schs]

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x = batch["video"]
        recon = self.vae.decode(self.vae.encode(x).mode())  # deterministic, clamped
        metrics = {"val/psnr": psnr(recon, x).mean(), "val/ssim": ssim(recon, x).mean(),
                   "val/l1": (recon - x).abs().mean()}
        if self.rec_loss.lpips is not None:
            metrics["val/lpips"] = self.rec_loss.lpips.to(x.device)(recon, x).mean()
        self.log_dict(metrics, sync_dist=True, batch_size=x.shape[0])

    # ------------------------------------------------------------------ checkpoints and media
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The one checkpoint format (vidgen.io.checkpoint): the export command rebuilds the VideoVAE from this.
        checkpoint.setdefault("vidgen", {}).update(describe("vae", {"vae": part_spec("vae.", self.vae)}))

    @torch.no_grad()
    def _log_reconstruction(self, x: torch.Tensor, recon: torch.Tensor) -> None:
        """Side-by-side original | reconstruction of one clip [3, T, H, W]: wandb if used, else mp4 + PNG files."""
        if not self.trainer.is_global_zero:
            return

        pair = torch.cat([x, recon.clamp(-1, 1)], dim=-1)  # [3, T, H, 2W]
        frames = to_uint8_video(pair)  # [T, H, 2W, 3]
        folder = Path(self.trainer.default_root_dir) / "recon"
        folder.mkdir(parents=True, exist_ok=True)
        stem = folder / f"step{self.global_step:07d}"
        strip = recon_strip(x, recon)
        from PIL import Image

        Image.fromarray(strip).save(f"{stem}.png")
        if frames.shape[0] > 1:
            write_video(f"{stem}.mp4", frames, fps=self.hparams.log_video_fps)
        for logger in self.loggers:
            if type(logger).__name__ == "WandbLogger":
                import wandb

                media = {"train/recon_strip": wandb.Image(f"{stem}.png")}
                if frames.shape[0] > 1:
                    media["train/recon_video"] = wandb.Video(f"{stem}.mp4", format="mp4")
                logger.experiment.log(media, step=self.global_step)

