"""Lightning module that trains the video DiT with the rectified-flow objective in a frozen VAE's latent space.

A batch is either pixels `{"video" [B, 3, T, H, W] in [-1, 1], "caption": list[str]}` (encoded here by the frozen
VAE into normalised latents) or precomputed `{"latent" [B, C, t, h, w] (normalised), "text_emb" [B, L, D],
"text_mask" [B, L], "text_null_emb" [L0, D], ...}` from latent shards, which skip the VAE and the text encoder.
The conditioner (`vidgen.conditioning`) turns either into the DiT's keyword tensors, with CFG dropout; the
`Denoiser` (`vidgen.diffusion.denoiser`) computes the loss through the same clean-frame rule sampling uses.

The VAE is held outside the registered modules (not in state_dict, optimizer, EMA or FSDP units); the checkpoint
records its folder and content fingerprint instead. Every checkpoint describes its parts in the one format of
`vidgen.io.checkpoint`, so the export command and `sample.py` rebuild everything from the checkpoint alone.

Joint audio + video (`audio_vae_path`, a DiT with `audio_channels`): clip batches with "audio" `[B, C, S]` are
encoded by a frozen `AudioVAE` (held like the video VAE) into audio latents `[B, Ca, T * a]` on the common clock of
`vidgen.models.joint_audio` (the waveform padded at the start with (s - 1) frames of silence, s the video VAE's time
stride); each sample draws its task from `audio_tasks` (text-to-audio+video, video-to-audio: video clean,
audio-to-video: audio clean) and the `Denoiser` adds `audio_weight` x the audio term; clips without sound
(`audio_valid` False) train the video only.

Fine-tuning (`vidgen.training.adapters`): `init_from` starts the DiT (and a trained text encoder) from any
checkpoint or export; `lora` then adds peft adapters and trains only them. A LoRA checkpoint's `state_dict` holds
only the adapter tensors: its `vidgen` entry records the base (`meta.init_from`: path + fingerprints, its parts
marked `"base": true`) and `meta.adapters.lora` (rank, alpha, modules), and resuming puts the base weights back.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from torch import nn

from vidgen.conditioning import Conditioner
from vidgen.diffusion.denoiser import Denoiser
from vidgen.diffusion.flow import RectifiedFlow
from vidgen.errors import UserError
from vidgen.io.checkpoint import describe, part_spec
from vidgen.io.fingerprint import fingerprint_folder, short
from vidgen.io.pretrained import CONFIG_NAME, WEIGHTS_NAME, load_pretrained, read_config
from vidgen.models.audio_vae import AudioVAE
from vidgen.pipeline import sound_on_clock
from vidgen.models.vae import VideoVAE
from vidgen.training.adapters import (ADAPTER, apply_lora, check_same_base, freeze_all_but_adapters, is_adapter,
                                      load_base)
from vidgen.training.parallelize import apply_fsdp, build_sequence_parallel
from vidgen.training.rng import MicroBatchCounter

log = logging.getLogger(__name__)


class DiTModule(pl.LightningModule):
    """Trains `dit` (+ trainable conditioner encoders) on video or latent batches; the VAE at `vae_path` stays frozen.

    dit: the network (`in_channels` = VAE latent channels, `text_dim` = the text entry's width); conditioner: a
    `Conditioner` of named entries (text today) with their CFG dropout; vae_path: a VideoVAE export folder
    (None: batches must carry latents); flow: `RectifiedFlow` keyword arguments; optimizer / scheduler:
    `functools.partial`s (Hydra `_partial_: true`) completed in `configure_optimizers`.
    cond_prob / max_cond_frames: with probability `cond_prob` a sample is conditioned on its first k clean latent
    frames, k uniform in [1, max_cond_frames] (image-to-video and extension with the same model).
    val_t / val_seed: validation losses at these fixed flow times with noise seeded per batch index.
    init_from: a checkpoint or export folder whose DiT (and trained text encoder) weights the run starts from
    (`init_ema`: its EMA weights when it has them); require_init_from: a fine-tune experiment stops at set-up
    without one; lora: {rank, alpha, dropout, targets} adds LoRA adapters to the DiT after that (needs
    `init_from`) and trains only them.
    sample_posterior: train on posterior samples of the VAE (LDM practice) or on its mean (Wan 2.1 practice; better
    for a briefly trained VAE whose posterior std is still large); validation always uses the mean.
    vae_chunk_size: encode videos this many latent frames at a time (bounded memory for long clips).
    audio_vae_path: an AudioVAE export folder (None: no audio); the DiT needs `audio_channels` = its latent channels.
    audio_tasks: {joint, video_to_audio, audio_to_video}: weights of each sample's task (`audio_task_masks`);
    audio_weight: weight of the audio term of the loss.
    """

    sequence_parallel = 1  # ranks per sequence-parallel group (set by vidgen.training.parallelize.parallelize)

    def __init__(self, dit: nn.Module, conditioner: Conditioner, vae_path: str | None, optimizer: partial,
                 scheduler: partial | None = None, flow: dict | None = None, cond_prob: float = 0.0,
                 max_cond_frames: int = 1, val_t: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9), val_seed: int = 0,
                 sample_posterior: bool = True, vae_chunk_size: int | None = None, init_from: str | None = None,
                 init_ema: bool = True, require_init_from: bool = False, lora: dict | None = None,
                 audio_vae_path: str | None = None, audio_tasks: dict | None = None,
                 audio_weight: float = 1.0) -> None:
        super().__init__()
        # Hydra passes DictConfig / ListConfig: store plain values so checkpoints load with weights_only=True.
        flow, val_t, lora = _plain(flow or {}), [float(t) for t in val_t], _plain(lora) if lora else None
        vae_path = str(vae_path) if vae_path is not None else None
        audio_vae_path = str(audio_vae_path) if audio_vae_path is not None else None
        audio_tasks = {str(k): float(v) for k, v in (audio_tasks or DEFAULT_AUDIO_TASKS).items()}
        init_from = str(init_from) if init_from is not None else None
        self.save_hyperparameters(ignore=["dit", "conditioner", "optimizer", "scheduler"])
        self.dit = dit
        self.conditioner = conditioner
        self.flow = RectifiedFlow(**flow)
        self.denoiser = Denoiser(dit, self.flow)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.micro = MicroBatchCounter()
        self._frozen: dict[str, nn.Module] = {}  # not registered: not in state_dict / optimizer / EMA / FSDP units
        self._check_wiring()
        # Fine-tuning, from outside the model code: the base weights first, then adapters on top of them.
        self.base = load_base(dit, conditioner, init_from, init_ema, vae_path) if init_from else None
        self.lora = None
        if lora:
            untrained = [f"cond.{n}" for n, e in conditioner.entries.items()
                         if e.trainable and self.base is not None and f"cond.{n}" not in self.base["parts"]]
            if untrained:
                raise UserError(f"task.module.init_from={init_from}: has no {untrained[0]} weights for the run's "
                                f"trainable encoder, which a LoRA run freezes; use the base's encoder")
            self.lora = {**apply_lora(dit, **lora), "part": "dit", "prefix": "dit."}
            freeze_all_but_adapters(self)  # the text encoder too: only adapters train (optimizer, EMA, checkpoint)

    def _check_wiring(self) -> None:
        """One clear line when the DiT's input widths do not match the text entry / VAE it is trained with."""
        text_dim = self.dit.config["text_dim"]
        text = self.conditioner.entries["text"] if "text" in self.conditioner.entries else None
        if text is not None and text.dim != text_dim:
            raise UserError(f"model.dit.text_dim={text_dim} but the text encoder outputs dim={text.dim}; "
                             f"set model.dit.text_dim=${{model.text.dim}}")
        path = self.hparams.vae_path
        if path is not None and (Path(path) / CONFIG_NAME).is_file():
            latent_channels = read_config(path, VideoVAE)["config"].get("latent_channels", 16)
            if latent_channels != self.dit.in_channels:
                raise UserError(f"model.dit.in_channels={self.dit.in_channels} but the VAE at task.module.vae_path="
                                 f"{path} has {latent_channels} latent channels; set model.dit.in_channels="
                                 f"{latent_channels}")
        audio_path, stream = self.hparams.audio_vae_path, getattr(self.dit, "audio_stream", None)
        if audio_path is not None:
            audio_task_weights(self.hparams.audio_tasks)  # one line now for a bad task mix
        if audio_path is not None and (Path(audio_path) / CONFIG_NAME).is_file():  # a missing one: setup says so
            channels = read_config(audio_path, AudioVAE)["config"].get("latent_channels", 16)
            if stream is None or stream.channels != channels:
                raise UserError(f"model.dit.audio_channels={0 if stream is None else stream.channels} but the audio "
                                f"VAE at task.module.audio_vae_path={audio_path} has {channels} latent channels; set "
                                f"model.dit.audio_channels=${{vidgen.audio_latent_channels:"
                                f"${{task.module.audio_vae_path}},0}}")

    # ------------------------------------------------------------------ the frozen VAE
    @property
    def vae(self) -> VideoVAE:
        """The frozen VAE (loaded on first use, then kept on this module's device)."""
        if "vae" not in self._frozen:
            path = self.hparams.vae_path
            if path is None:
                raise UserError("task.module.vae_path is not set: a batch without 'latent' needs the VAE to encode")
            if not (Path(path) / CONFIG_NAME).is_file():
                raise FileNotFoundError(f"task.module.vae_path={path}: no VAE export folder there (expected "
                                        f"config.json + model.safetensors from python -m vidgen.io.checkpoint)")
            vae = load_pretrained(path, VideoVAE).requires_grad_(False).eval()
            if not vae.has_latent_stats:
                log.warning("VAE at %s has no measured latent statistics: the DiT sees unnormalised latents", path)
            self._frozen["vae"] = vae
        vae = self._frozen["vae"]
        if next(vae.parameters()).device != self.device:
            vae.to(self.device)
        return vae

    @property
    def audio_vae(self) -> AudioVAE:
        """The frozen audio VAE (loaded on first use, then kept on this module's device)."""
        if "audio_vae" not in self._frozen:
            path = self.hparams.audio_vae_path
            if not (Path(path) / CONFIG_NAME).is_file():
                raise FileNotFoundError(f"task.module.audio_vae_path={path}: no audio VAE export folder there "
                                        f"(expected config.json + model.safetensors: train experiment="
                                        f"quickstart_audio_vae, then python -m vidgen.io.checkpoint CKPT OUT)")
            vae = load_pretrained(path, AudioVAE).requires_grad_(False).eval()
            if not vae.has_latent_stats:
                log.warning("audio VAE at %s has no measured latent statistics: the DiT sees unnormalised latents",
                            path)
            self._frozen["audio_vae"] = vae
        vae = self._frozen["audio_vae"]
        if next(vae.parameters()).device != self.device:
            vae.to(self.device)
        return vae

    def vae_reference(self, key: str = "vae_path") -> dict[str, Any] | None:
        """{"path", "fingerprint"} of the VAE at hparams[key] (content fingerprint, as latent shards and exports
        record it); `key="audio_vae_path"`: the audio VAE's."""
        path = self.hparams.get(key)
        if path is None:
            return None
        has_weights = Path(path, WEIGHTS_NAME).is_file()
        return {"path": str(Path(path).resolve()), "fingerprint": fingerprint_folder(path) if has_weights else None}

    def setup(self, stage: str) -> None:
        if self.base is None and (self.lora is not None or self.hparams.require_init_from):
            what = "LoRA adapts trained weights" if self.lora is not None else "this run fine-tunes a trained DiT"
            raise UserError(f"task.module.init_from is not set: {what}; set it to an export folder or checkpoint")
        if self.hparams.vae_path is not None:
            _ = self.vae  # fail at start-up, not at the first batch
        if self.hparams.audio_vae_path is not None:
            _ = self.audio_vae
        build_sequence_parallel(self)  # scale.sequence_parallel > 1: the groups, now that the processes run

    @property
    def data_rank(self) -> int:
        """This rank's data-parallel rank: the global rank, or its sequence-parallel group's index."""
        return self.global_rank // self.sequence_parallel

    # ------------------------------------------------------------------ batch -> latents, conditioning
    def latents(self, batch: dict[str, Any], sample: bool = True,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Normalised latents `[B, C, t, h, w]`: `batch["latent"]`, or the VAE posterior of `batch["video"]`."""
        if "latent" in batch:
            return batch["latent"].float()
        with torch.no_grad():
            posterior = self.vae.encode(batch["video"], normalize=True, chunk_size=self.hparams.vae_chunk_size)
            return (posterior.sample(generator) if sample else posterior.mode()).float()

    def audio_latents(self, batch: dict[str, Any], frames: int, sample: bool = True,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Normalised audio latents `[B, Ca, T * a]` of `batch["audio"]` `[B, C, S]` (the sampled frames' sound) for
        `frames` (T) latent frames: the waveform padded at the start with (s - 1) video frames of silence, the span
        the causal video VAE pads before frame 0 (`vidgen.models.joint_audio`), then encoded."""
        vae, s, a = self.audio_vae, self.vae.temporal_factor, self.dit.audio_stream.per_latent_frame
        try:
            wave = sound_on_clock(batch["audio"].float(), frames, a, vae.hop, s)  # [B, C, Ta * hop]
        except ValueError as e:
            raise UserError(f"batch audio: {e}; the audio VAE runs at {vae.sample_rate} Hz: set data.audio_rate="
                            f"{vae.sample_rate} and model.dit.audio_per_latent_frame from data.target_fps "
                            f"(${{vidgen.audio_per_latent_frame:...}})") from None
        with torch.no_grad():
            posterior = vae.encode(wave, normalize=True)
            return (posterior.sample(generator) if sample else posterior.mode()).float()

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
        # All randomness of a micro-batch from one generator seeded by (seed, step, micro-batch, rank): exact
        # resume, and the micro-batches of one accumulated step draw different t and noise. Outside a Trainer
        # there is no step count to seed from: use the global RNG.
        gen = self.micro.generator(self.global_step, self.data_rank) if self._trainer is not None else None
        z = self.latents(batch, sample=self.hparams.sample_posterior, generator=gen)
        cond = self.conditioner(batch, drop=True, generator=gen)
        clean = self.clean_frame_mask(z.shape[0], z.shape[2], z.device, generator=gen)
        if self.hparams.audio_vae_path is not None and "audio" in batch:
            loss = self.joint_loss(batch, z, cond, clean, gen)
        else:
            loss = self.denoiser.loss(z, cond, clean_mask=clean, generator=gen)
        if self._trainer is not None:
            self.log("train/loss", loss, prog_bar=True, batch_size=z.shape[0])
        # Sequence parallel: each rank's gradients are its tokens' share of its group's, and DDP / FSDP average over
        # every rank, so the group's P shares must each count P times to give the mean over groups.
        return loss * self.sequence_parallel

    def joint_loss(self, batch: dict[str, Any], z: torch.Tensor, cond: dict[str, Any], clean: torch.Tensor | None,
                   gen: torch.Generator | None) -> torch.Tensor:
        """The joint audio + video loss of a clip batch with "audio": each sample's task from `audio_tasks`."""
        b, frames = z.shape[0], z.shape[2]
        a0 = self.audio_latents(batch, frames, sample=self.hparams.sample_posterior, generator=gen)
        valid = batch.get("audio_valid")
        valid = valid.to(z.device).bool() if valid is not None else None
        video_clean, audio_clean = audio_task_masks(b, frames, self.hparams.audio_tasks, z.device, gen, valid)
        clean = video_clean if clean is None else clean | video_clean
        return self.denoiser.loss(z, cond, clean_mask=clean, generator=gen, audio0=a0, audio_clean_mask=audio_clean,
                                  audio_valid=valid, audio_weight=self.hparams.audio_weight)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        """Loss at each fixed t in `val_t` with noise seeded by batch index: comparable across runs and steps."""
        z = self.latents(batch, sample=False)
        cond = self.conditioner(batch, drop=False)
        gen = torch.Generator().manual_seed(self.hparams.val_seed + batch_idx)
        noise = torch.randn(z.shape, generator=gen).to(z)
        losses = {f"val/loss_t{t:g}": self.denoiser.loss(z, cond, t=torch.full((z.shape[0],), t, device=z.device),
                                                         noise=noise) for t in self.hparams.val_t}
        losses["val/loss"] = torch.stack(list(losses.values())).mean()
        if self._trainer is not None:
            self.log_dict(losses, sync_dist=True, batch_size=z.shape[0])
        return losses

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        opt = self.optimizer_factory(params=param_groups(self))
        if self.scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer=opt),
                                                   "interval": "step"}}

    def configure_model(self) -> None:
        """FSDP2 under Lightning's `ModelParallelStrategy` (`trainer=fsdp`): shard the DiT and trainable encoders,
        each block one unit (`vidgen.training.parallelize.apply_fsdp`); bf16 parameters / fp32 reduction on GPU."""
        mesh = self.device_mesh
        if mesh is None:
            return
        if self.lora is not None:
            raise UserError("trainer=fsdp: a LoRA run trains a few adapter tensors; use trainer=ddp (the frozen base "
                            "is not sharded)")
        encoders = [enc for enc, trainable in self.conditioner.encoders().values() if trainable]
        apply_fsdp([self.dit, *encoders], mesh["data_parallel"], mixed_precision=self.device.type == "cuda")

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_description(self) -> dict[str, Any]:
        """This run's parts (DiT, conditioner encoders), flow, VAE reference and conditioner, in the one format."""
        parts = {"dit": part_spec("dit.", self.dit)}
        for name, entry in self.conditioner.entries.items():
            spec = entry.encoder_module() if entry.trainable else entry.encoder_spec()
            parts[f"cond.{name}"] = part_spec(f"conditioner.entries.{name}.encoder.", spec, entry.trainable)
            parts[f"cond.{name}"]["saved"] = entry.trainable or bool(self._frozen_weights(name))
        meta = {"flow": _plain(self.hparams.flow), "vae": self.vae_reference(), "conditioner": self.conditioner.spec()}
        if self.hparams.get("audio_vae_path") is not None:
            meta["audio_vae"] = self.vae_reference("audio_vae_path")
        if self.base is not None:
            meta["init_from"] = self.base
        if self.lora is not None:  # the checkpoint holds only the adapters: these parts' weights are the base's
            meta["adapters"] = {ADAPTER: self.lora}
            for name in self.base["parts"]:
                parts[name].update(saved=False, base=True)
        return describe("dit", parts, meta)

    def _frozen_weights(self, name: str) -> dict[str, torch.Tensor]:
        """State of a frozen entry encoder that a checkpoint must carry (one that cannot reload itself from a
        folder, e.g. a byte encoder loaded from an export); {} for trainable ones and Hugging Face folders."""
        entry = self.conditioner.entries[name]
        if entry.trainable or entry.built_encoder() is None or getattr(entry.built_encoder(), "loads_own_weights",
                                                                        False):
            return {}
        return entry.built_encoder().state_dict()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint.setdefault("vidgen", {}).update(self.checkpoint_description())
        if self.lora is not None:  # adapters only; the base is recorded by path and fingerprint
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if is_adapter(k)}
        for name in self.conditioner.entries:
            if self.lora is not None and f"cond.{name}" in self.base["parts"]:
                continue  # its weights are the base's (recorded by path and fingerprint)
            prefix = f"conditioner.entries.{name}.encoder."
            checkpoint["state_dict"].update({prefix + k: v for k, v in self._frozen_weights(name).items()})

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._restore_base(checkpoint)
        for name, entry in self.conditioner.entries.items():  # frozen encoders' weights: for exports, not resume
            if not entry.trainable:
                prefix = f"conditioner.entries.{name}.encoder."
                for key in [k for k in checkpoint.get("state_dict", {}) if k.startswith(prefix)]:
                    del checkpoint["state_dict"][key]
        # Resuming against a different VAE would train the DiT on a shifted latent space: refuse.
        meta = (checkpoint.get("vidgen") or {}).get("meta") or {}
        for name, key in (("vae", "vae_path"), ("audio_vae", "audio_vae_path")):
            ref = meta.get(name) or {}
            saved, path = ref.get("fingerprint"), self.hparams.get(key)
            if saved and path and Path(path, WEIGHTS_NAME).is_file():
                found = fingerprint_folder(path)
                if found != saved:
                    raise UserError(f"task.module.{key}={path}: this VAE (fingerprint {short(found)}) is not the one "
                                    f"the checkpoint was trained with ({ref.get('path')}, fingerprint {short(saved)})")


    def _restore_base(self, checkpoint: dict[str, Any]) -> None:
        """A LoRA checkpoint holds only adapters: check it was trained on this run's base and with this LoRA, then
        complete its state_dict with the base weights already loaded (from `init_from`), so loading stays strict."""
        saved = ((checkpoint.get("vidgen") or {}).get("meta") or {})
        adapters = (saved.get("adapters") or {}).get(ADAPTER)
        if adapters is None and self.lora is None:
            return
        if adapters is None or self.lora is None:
            have, want = ("LoRA adapters", "a full") if self.lora is None else ("full weights", "a LoRA")
            raise UserError(f"resume: the checkpoint holds {have}, but this run trains {want} model "
                            f"(task.module.lora={self.hparams.lora}); resume it with the settings it was trained with")
        check_same_base(saved.get("init_from"), self.base)
        keys = ("rank", "alpha", "modules")
        if any(adapters.get(k) != self.lora.get(k) for k in keys):
            diff = next(k for k in keys if adapters.get(k) != self.lora.get(k))
            raise UserError(f"task.module.lora: {diff} differs from the checkpoint's LoRA ({adapters.get(diff)!r} vs "
                            f"{self.lora.get(diff)!r}); resume with the LoRA settings it was trained with")
        state = checkpoint.get("state_dict") or {}
        checkpoint["state_dict"] = {**{k: v for k, v in self.state_dict().items() if not is_adapter(k)}, **state}


AUDIO_TASKS = ("joint", "video_to_audio", "audio_to_video")  # both noisy | video clean | audio clean
DEFAULT_AUDIO_TASKS = {"joint": 0.6, "video_to_audio": 0.2, "audio_to_video": 0.2}


def audio_task_weights(probs: dict[str, float]) -> list[float]:
    """The `AUDIO_TASKS` weights of `probs`, normalised; one clear line for an unknown task or bad weights."""
    unknown = sorted(set(probs) - set(AUDIO_TASKS))
    if unknown:
        raise UserError(f"task.module.audio_tasks: unknown task {unknown[0]!r}; expected some of {AUDIO_TASKS}")
    weights = [float(probs.get(k, 0.0)) for k in AUDIO_TASKS]
    if min(weights) < 0 or sum(weights) <= 0:
        raise UserError(f"task.module.audio_tasks={dict(probs)}: expected weights >= 0 with a positive sum")
    return [w / sum(weights) for w in weights]


def audio_task_masks(batch: int, frames: int, probs: dict[str, float], device: torch.device | str = "cpu",
                     generator: torch.Generator | None = None, audio_valid: torch.Tensor | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw each sample's joint task from `probs` ({joint, video_to_audio, audio_to_video}: weights, normalised):
    (video clean bool `[B, T]`, audio clean bool `[B]`). A sample whose `audio_valid` is False gets neither clean
    (its sound is missing: no audio-to-video, and no audio term to train video-to-audio)."""
    weights = torch.tensor(audio_task_weights(probs), device="cpu")
    task = torch.multinomial(weights, batch, replacement=True, generator=generator)  # [B]
    if audio_valid is not None:
        task = task * audio_valid.cpu().bool()  # 0 = joint
    video_clean = (task == 1)[:, None].expand(batch, frames)
    return video_clean.to(device), (task == 2).to(device)


def param_groups(module: nn.Module) -> list[dict[str, Any]]:
    """Trainable parameters of `module` as optimizer groups: weight decay on the weights of linear / conv layers
    only, none on norms, biases, embeddings and adaLN tables; empty groups left out."""
    decayed = {id(m.weight) for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))}
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) in decayed]},
              {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _plain(value: Any) -> Any:
    """OmegaConf containers / tuples -> plain dicts and lists (JSON-serialisable, `weights_only`-loadable)."""
    if hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return [_plain(v) for v in value]
    return value
