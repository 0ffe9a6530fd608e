"""Lightning module that trains the video DiT with the rectified-flow objective in a frozen VAE's latent space.

A batch is either pixels `{"video" [B, 3, T, H, W] in [-1, 1], "caption": list[str]}` (encoded here by the frozen
VAE, normalised latents, and by the text encoder) or precomputed `{"latent" [B, C, t, h, w] (normalised),
"text_emb" [B, L, D] (+ "text_mask" [B, L]) or "caption"}` from latent shards, which skip the VAE / text encoder.

The VAE (and a frozen Hugging Face text encoder) are held outside the registered modules: they are not in
`state_dict`, the optimizer or EMA, and the checkpoint records the VAE folder and a fingerprint of its files
instead (`checkpoint["vae"]`). Every checkpoint also carries the plain DiT / text encoder / flow configs, so
`vidgen.training.export_dit` and `sample.py` rebuild everything from the checkpoint alone.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from torch import nn

from vidgen.diffusion.flow import RectifiedFlow, num_latent_tokens
from vidgen.models.dit import DiT
from vidgen.models.vae import VideoVAE
from vidgen.training.rng import step_generator

log = logging.getLogger(__name__)


def plain(value: Any) -> Any:
    """OmegaConf containers / tuples -> plain dicts and lists (JSON-serialisable, `weights_only`-loadable)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


_FINGERPRINTS: dict[tuple, str] = {}


def vae_fingerprint(folder: str | os.PathLike) -> str:
    """SHA-256 (16 hex digits) over a VAE export's config.json + model.safetensors (weights and latent stats)."""
    folder = Path(folder)
    files = [folder / "config.json", folder / "model.safetensors"]
    key = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key not in _FINGERPRINTS:  # hashing a 0.5 GB VAE takes a second: once per process and file version
        h = hashlib.sha256()
        for f in files:
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
        _FINGERPRINTS[key] = h.hexdigest()[:16]
    return _FINGERPRINTS[key]


def warmup_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int = 1000, decay: str = "constant",
                    total_steps: int | None = None, min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup_steps`, then constant or cosine decay to `min_lr_ratio` at `total_steps`."""
    if decay not in ("constant", "cosine"):
        raise ValueError(f"scheduler.decay={decay!r}; expected 'constant' or 'cosine'")
    if decay == "cosine" and not total_steps:
        raise ValueError("scheduler.decay=cosine needs scheduler.total_steps (e.g. ${trainer.max_steps})")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if decay == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class DiTModule(pl.LightningModule):
    """Trains `dit` (+ a trainable `text_encoder`) on video or latent batches; the VAE at `vae_path` stays frozen.

    dit: the network (`in_channels` = VAE latent channels, `text_dim` = `text_encoder.dim`); text_encoder:
    `ByteTextEncoder` (trained jointly) or `HFTextEncoder` (frozen, kept out of the checkpoint); vae_path: a
    VideoVAE export folder (None: batches must carry latents); flow: `RectifiedFlow` keyword arguments;
    optimizer / scheduler: `functools.partial`s (Hydra `_partial_: true`) completed in `configure_optimizers`.
    cond_prob / max_cond_frames: with probability `cond_prob` a sample is conditioned on its first k clean latent
    frames, k uniform in [1, max_cond_frames] (image-to-video and extension with the same model).
    val_t / val_seed: validation losses at these fixed flow times with noise seeded per batch index.
    sample_posterior: train on posterior samples of the VAE (LDM practice) or on its mean (Wan 2.1 practice; better
    for a briefly trained VAE whose posterior std is still large); validation always uses the mean.
    vae_chunk_size: encode videos this many latent frames at a time (bounded memory for long clips).
    """

    def __init__(self, dit: DiT, text_encoder: nn.Module, vae_path: str | None, optimizer: partial,
                 scheduler: partial | None = None, flow: dict | None = None, cond_prob: float = 0.0,
                 max_cond_frames: int = 1, val_t: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9), val_seed: int = 0,
                 sample_posterior: bool = True, vae_chunk_size: int | None = None) -> None:
        super().__init__()
        # Hydra passes DictConfig / ListConfig: store plain values so checkpoints load with weights_only=True.
        flow, val_t = plain(flow or {}), [float(t) for t in val_t]
        vae_path = str(vae_path) if vae_path is not None else None
        self.save_hyperparameters(ignore=["dit", "text_encoder", "optimizer", "scheduler"])
        self.dit = dit
        self.flow = RectifiedFlow(**flow)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        # Frozen helpers live in a plain dict: not registered, so not in state_dict / optimizer / EMA / FSDP units.
        self._frozen: dict[str, nn.Module] = {}
        if getattr(text_encoder, "trainable", True):
            self.text_encoder = text_encoder
        else:
            self.text_encoder = None
            self._frozen["text_encoder"] = text_encoder.requires_grad_(False).eval()
        self._check_wiring(text_encoder)

    def _check_wiring(self, text_encoder: nn.Module) -> None:
        """One clear line when the DiT's input widths do not match the text encoder / VAE it is trained with."""
        text_dim = self.dit.config["text_dim"]
        if getattr(text_encoder, "dim", text_dim) != text_dim:
            raise ValueError(f"model.dit.text_dim={text_dim} but the text encoder outputs dim={text_encoder.dim}; "
                             f"set model.dit.text_dim=${{model.text.dim}}")
        path = self.hparams.vae_path
        if path is not None and (Path(path) / "config.json").is_file():
            latent_channels = VideoVAE.read_config(path)["config"].get("latent_channels", 16)
            if latent_channels != self.dit.in_channels:
                raise ValueError(f"model.dit.in_channels={self.dit.in_channels} but the VAE at task.module.vae_path="
                                 f"{path} has {latent_channels} latent channels; set model.dit.in_channels="
                                 f"{latent_channels}")

    # ------------------------------------------------------------------ frozen parts
    @property
    def vae(self) -> VideoVAE:
        """The frozen VAE (loaded on first use, then kept on this module's device)."""
        if "vae" not in self._frozen:
            path = self.hparams.vae_path
            if path is None:
                raise ValueError("task.module.vae_path is not set: a batch without 'latent' needs the VAE to encode")
            if not (Path(path) / "config.json").is_file():
                raise FileNotFoundError(f"task.module.vae_path={path}: no VAE export folder there (expected "
                                        f"config.json + model.safetensors from vidgen.training.export_vae)")
            vae = VideoVAE.from_pretrained(path).requires_grad_(False).eval()
            if not vae.has_latent_stats:
                log.warning("VAE at %s has no measured latent statistics: the DiT sees unnormalised latents", path)
            self._frozen["vae"] = vae
        return self._on_device(self._frozen["vae"])

    @property
    def text(self) -> nn.Module:
        """The text encoder, trainable (registered) or frozen (held aside): `emb, mask = text(captions)`."""
        return self.text_encoder if self.text_encoder is not None else self._on_device(self._frozen["text_encoder"])

    def _on_device(self, module: nn.Module) -> nn.Module:
        device = self.device
        if next(module.parameters()).device != device:
            module.to(device)
        return module

    def setup(self, stage: str) -> None:
        if self.hparams.vae_path is not None:
            _ = self.vae  # fail at start-up, not at the first batch

    # ------------------------------------------------------------------ batch -> latents, conditioning
    def encode_text(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Captions -> {"context" [B, L, D], "context_mask" [B, L]}; gradients only into a trainable encoder."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.text_encoder is not None):
            context, mask = self.text(list(captions))
        return {"context": context, "context_mask": mask}

    def latents(self, batch: dict[str, Any], sample: bool = True,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Normalised latents `[B, C, t, h, w]`: `batch["latent"]`, or the VAE posterior of `batch["video"]`."""
        if "latent" in batch:
            return batch["latent"].float()
        with torch.no_grad():
            posterior = self.vae.encode(batch["video"], normalize=True, chunk_size=self.hparams.vae_chunk_size)
            return (posterior.sample(generator) if sample else posterior.mode()).float()

    def condition(self, batch: dict[str, Any], drop: bool,
                  generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Text conditioning of a batch; `drop`: classifier-free-guidance dropout (`flow.cfg_dropout`)."""
        if "text_emb" not in batch:
            captions = list(batch["caption"])
            return self.encode_text(self.flow.drop_captions(captions, generator) if drop else captions)
        context, mask = batch["text_emb"], batch.get("text_mask")
        if drop and self.flow.cfg_dropout > 0:
            null = self.encode_text([""])  # the encoder that wrote the latent shards must be this one
            context, mask = self.flow.drop_embeddings(context, mask, null["context"], null["context_mask"],
                                                      generator=generator)
        return {"context": context, "context_mask": mask}

    def clean_frame_mask(self, batch: int, frames: int, device: torch.device,
                         generator: torch.Generator | None = None) -> torch.Tensor | None:
        """Bool `[B, T]` of latent frames held clean (first k of a `cond_prob` share of samples), or None."""
        p, max_k = self.hparams.cond_prob, min(self.hparams.max_cond_frames, frames - 1)
        if p <= 0 or max_k < 1:
            return None
        chosen = torch.rand(batch, generator=generator) < p
        if not chosen.any():
            return None
        k = torch.randint(1, max_k + 1, (batch,), generator=generator) * chosen  # 0 = a plain text-to-video sample
        return (torch.arange(frames)[None] < k[:, None]).to(device)

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        # All randomness of the step from one generator seeded by (seed, step, rank): exact resume. Outside a
        # Trainer there is no step count to seed from: use the global RNG.
        gen = step_generator(self.global_step, self.global_rank) if self._trainer is not None else None
        z = self.latents(batch, sample=self.hparams.sample_posterior, generator=gen)
        cond = self.condition(batch, drop=True, generator=gen)
        clean = self.clean_frame_mask(z.shape[0], z.shape[2], z.device, generator=gen)
        loss = self.flow.loss(self.dit, z, cond, clean_frames=clean,
                              num_tokens=num_latent_tokens(z.shape, self.dit.patch_size), generator=gen)
        if self._trainer is not None:
            self.log("train/loss", loss, prog_bar=True, batch_size=z.shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        """Loss at each fixed t in `val_t` with noise seeded by batch index: comparable across runs and steps."""
        z = self.latents(batch, sample=False)
        cond = self.condition(batch, drop=False)
        gen = torch.Generator().manual_seed(self.hparams.val_seed + batch_idx)
        noise = torch.randn(z.shape, generator=gen).to(z)
        losses = {f"val/loss_t{t:g}": self.flow.loss(self.dit, z, cond, t=torch.full((z.shape[0],), t, device=z.device),
                                                     noise=noise) for t in self.hparams.val_t}
        losses["val/loss"] = torch.stack(list(losses.values())).mean()
        if self._trainer is not None:
            self.log_dict(losses, sync_dist=True, batch_size=z.shape[0])
        return losses

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        # Weight decay on the weights of linear / conv layers only (not on norms, biases, embeddings, adaLN tables).
        decayed = {id(m.weight) for m in self.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))}
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if id(p) in decayed]},
                  {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0}]
        opt = self.optimizer_factory(params=[g for g in groups if g["params"]])
        if self.scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer=opt),
                                                   "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints
    def model_configs(self) -> dict[str, Any]:
        """What an export / sample.py needs besides the weights: DiT, text encoder, flow and VAE references."""
        enc = self.text
        vae_path = self.hparams.vae_path
        vae = None
        if vae_path is not None:
            vae = {"path": str(Path(vae_path).resolve()),
                   "fingerprint": vae_fingerprint(vae_path) if Path(vae_path, "model.safetensors").is_file() else None}
        return {"dit_config": plain(self.dit.config),
                "text_encoder": {"class": f"{type(enc).__module__}.{type(enc).__qualname__}",
                                 "config": plain(enc.config), "trainable": self.text_encoder is not None},
                "flow": plain(self.hparams.flow), "vae": vae}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint.update(self.model_configs())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Resuming against a different VAE would train the DiT on a shifted latent space: refuse.
        saved = (checkpoint.get("vae") or {}).get("fingerprint")
        path = self.hparams.vae_path
        if saved and path and Path(path, "model.safetensors").is_file() and vae_fingerprint(path) != saved:
            raise ValueError(f"task.module.vae_path={path}: this VAE (fingerprint {vae_fingerprint(path)}) is not the "
                             f"one the checkpoint was trained with ({checkpoint['vae']['path']}, fingerprint {saved})")
