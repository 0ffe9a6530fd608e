"""The training recipe behind `train.py`: build everything from the Hydra config and call `Trainer.fit`."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vidgen.training.parallelize import parallelize
from vidgen.io.checkpoint import checkpoint_kind, load_checkpoint
from vidgen.training.checkpoint import AtomicCheckpointIO, newest_checkpoint

log = logging.getLogger(__name__)


class ConfigError(ValueError):
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


def check_checkpoint_kind(ckpt_path: str, task_name: str) -> None:
    """Stop with one clear line when a checkpoint was written by another task (e.g. a VAE ckpt for a DiT run).

    Sharded folders (FSDP, DeepSpeed) are read back by their own strategy, which checks what it loads.
    """
    if Path(ckpt_path).is_dir():
        return
    kind = checkpoint_kind(load_checkpoint(ckpt_path))
    if kind != "unknown" and kind != task_name:
        raise ConfigError(f"resume={ckpt_path}: a '{kind}' checkpoint, but this run is task={task_name}")


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
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = resolve_resume(cfg.get("resume"), output_dir)
    if ckpt_path:
        check_checkpoint_kind(ckpt_path, cfg.task.name)

    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.task.module)
    parallelize(module, **cfg.get("scale", {}))
    callbacks = [RunMetadata(cfg), *_instantiate_dict(cfg.get("callbacks"))]
    loggers = _instantiate_dict(cfg.get("logger"))
    if not loggers:  # logger=none: callbacks that only feed a logger would refuse to start
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.LearningRateMonitor)]
    plugins = [AtomicCheckpointIO()] if _uses_plain_files(cfg.trainer) else []
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=plugins)

    OmegaConf.save(cfg, output_dir / "config.yaml", resolve=False)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer
