"""The training recipe behind `train.py`: build everything from the Hydra config and call `Trainer.fit`."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vidgen.errors import UserError
from vidgen.training.parallelize import parallelize
from vidgen.io.checkpoint import checkpoint_kind, load_checkpoint
from vidgen.io.pretrained import read_config
from vidgen.io.sharded import check_sharded_folder
from vidgen.models.vae import VideoVAE, compression, check_frames
from vidgen.training.checkpoint import AtomicCheckpointIO, newest_checkpoint

log = logging.getLogger(__name__)


class ConfigError(UserError):
    """A setting that cannot work; the message names the setting and what was expected."""


def resolve_resume(resume: str | None, output_dir: Path) -> str | None:
    """`null` -> None; `auto` -> the newest checkpoint of the run folder (None if none); else that path.

    `auto` looks in `output_dir/checkpoints` (periodic, last, preempted) and `output_dir` (SLURM `hpc_ckpt_N`).
    """
    if resume in (None, "", "none", "null"):
        return None
    if resume == "auto":
        found = newest_checkpoint(output_dir / "checkpoints", output_dir)
        log.info("resume=auto: %s", f"continuing from {found}" if found else f"no checkpoint in {output_dir}, starting fresh")
        return str(found) if found else None
    path = Path(resume)
    if not path.exists():
        raise ConfigError(f"resume={resume}: no such checkpoint (expected a .ckpt file, 'auto' or null)")
    return str(path)


def check_resume_folder(ckpt_path: str, trainer_cfg: DictConfig) -> None:
    """A sharded checkpoint folder resumes only under a sharding strategy, and only once read the safe way."""
    if not Path(ckpt_path).is_dir():
        return
    if _uses_plain_files(trainer_cfg):
        raise ConfigError(f"resume={ckpt_path}: a sharded checkpoint folder, but this run's trainer writes single "
                          f"files; resume it with the trainer that wrote it (e.g. trainer=fsdp), or export it with "
                          f"python -m vidgen.io.checkpoint {ckpt_path} OUT")
    check_sharded_folder(ckpt_path)  # DCP / DeepSpeed unpickle what they load: refuse anything but tensors first


def check_checkpoint_kind(ckpt_path: str, task_name: str) -> None:
    """Stop with one clear line when a checkpoint was written by another task (e.g. a VAE ckpt for a DiT run).

    The task is the one `RunMetadata` recorded, else the kind of model the checkpoint holds (a distillation
    checkpoint holds a "dit" but resumes only as task=distill). Sharded folders (FSDP, DeepSpeed) are read back by
    their own strategy, which checks what it loads.
    """
    if Path(ckpt_path).is_dir():
        return
    ckpt = load_checkpoint(ckpt_path)
    kind = (ckpt.get("vidgen") or {}).get("task") or checkpoint_kind(ckpt)
    if kind != "unknown" and kind != task_name:
        raise ConfigError(f"resume={ckpt_path}: a '{kind}' checkpoint, but this run is task={task_name}")


def validate_config(cfg: DictConfig) -> None:
    """Settings checked at start-up, before any model or data loads; each failure names the setting."""
    if cfg.trainer.get("max_steps", -1) == 0:
        raise ConfigError("trainer.max_steps=0: expected a positive number of optimizer steps (or -1 to train by "
                          "trainer.max_epochs)")
    output_dir = Path(cfg.paths.output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ConfigError(f"paths.output_dir={output_dir}: not a writable folder ({e.strerror or e}); set "
                          f"paths.runs_dir or run_name to a folder you can write") from None
    _validate_buckets(cfg)


def _vae_geometry(cfg: DictConfig) -> tuple[int, int, tuple[int, int, int], str] | None:
    """(temporal, spatial compression, DiT patch, where from) of the run's VAE (+ DiT), or None if unknown yet."""
    if cfg.task.name == "vae":
        vae = cfg.model.vae
        t, s = compression(vae.get("channel_mult", (1, 2, 4, 4)), vae.get("temporal_downsample", (False, True, True)),
                       vae.get("patch_size", 1))
        return t, s, (1, 1, 1), "model.vae"
    path = cfg.task.module.get("vae_path")
    if not path or not (Path(path) / "config.json").is_file():
        return None  # the module reports a missing VAE folder itself, with the setting's name
    vae = read_config(path, VideoVAE)["config"]
    t, s = compression(vae.get("channel_mult", (1, 2, 4, 4)), vae.get("temporal_downsample", (False, True, True)),
                       vae.get("patch_size", 1))
    patch = tuple(int(p) for p in cfg.model.dit.get("patch_size", (1, 2, 2)))
    return t, s, patch, f"the VAE at task.module.vae_path={path} and model.dit.patch_size={list(patch)}"


def _validate_buckets(cfg: DictConfig) -> None:
    """Every training bucket [frames, height, width] fits the VAE's 1 + f*k frame rule and the size multiples."""
    buckets = cfg.data.get("buckets") if "buckets" in cfg.data else None
    geometry = _vae_geometry(cfg)
    if not buckets or geometry is None:
        return
    temporal, spatial, (pt, ph, pw), where = geometry
    for bucket in buckets:
        frames, height, width = (int(v) for v in bucket)
        try:
            latent = check_frames(frames, temporal)
        except ValueError as e:
            raise ConfigError(f"data.buckets: [{frames}, {height}, {width}]: {e}") from None
        if latent % pt or height % (spatial * ph) or width % (spatial * pw):
            raise ConfigError(f"data.buckets: [{frames}, {height}, {width}] does not fit {where}: height and width "
                              f"must be multiples of {spatial * ph} and {spatial * pw}, latent frames ({latent}) a "
                              f"multiple of {pt}")


def _instantiate_dict(section: DictConfig | None) -> list:
    """Instantiate every entry with a `_target_` in a config mapping (callbacks, loggers)."""
    if not section:
        return []
    return [instantiate(v) for v in section.values() if isinstance(v, DictConfig) and "_target_" in v]


def _uses_plain_files(trainer_cfg: DictConfig) -> bool:
    """Single-file checkpoints (single device, DDP); FSDP/DeepSpeed write sharded folders themselves."""
    strategy = trainer_cfg.get("strategy", None)
    if strategy is None or isinstance(strategy, str):
        return strategy in (None, "auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true", "single_device")
    target = str(strategy.get("_target_", ""))
    return target.endswith("DDPStrategy")


class RunMetadata(pl.Callback):
    """Stores the task name and the resolved run config in every checkpoint (key `vidgen`)."""

    def __init__(self, cfg: DictConfig):
        self.meta = {"task": cfg.task.name, "config": OmegaConf.to_container(cfg, resolve=True)}

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        checkpoint.setdefault("vidgen", {}).update(self.meta)  # the module adds its parts (vidgen.io.checkpoint)


def train(cfg: DictConfig) -> pl.Trainer:
    """Seed, instantiate data / module / callbacks / loggers / trainer, resume if asked, fit."""
    pl.seed_everything(cfg.seed, workers=True)
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    validate_config(cfg)
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = resolve_resume(cfg.get("resume"), output_dir)
    if ckpt_path:
        check_resume_folder(ckpt_path, cfg.trainer)
        check_checkpoint_kind(ckpt_path, cfg.task.name)

    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.task.module)
    parallelize(module, **cfg.get("scale", {}))
    callbacks = [RunMetadata(cfg), *_instantiate_dict(cfg.get("callbacks"))]
    loggers = _instantiate_dict(cfg.get("logger"))
    if not loggers:  # logger=none: callbacks that only feed a logger would refuse to start
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.LearningRateMonitor)]
    if not cfg.trainer.get("enable_progress_bar", True):
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.ProgressBar)]
    plugins = [AtomicCheckpointIO()] if _uses_plain_files(cfg.trainer) else []
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=plugins)

    OmegaConf.save(cfg, output_dir / "config.yaml", resolve=False)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer
