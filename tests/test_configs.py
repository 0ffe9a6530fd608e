"""Hydra: every experiment composes through the real entry point and instantiates its module."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

import vidgen.config  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml"))


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=False)


def test_experiments_exist():
    assert EXPERIMENTS, "configs/experiment/ holds no experiment"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_train_cfg_job_composes(experiment, tmp_path):
    """`python train.py experiment=X --cfg job` composes and prints the job config."""
    out = subprocess.run([sys.executable, "train.py", f"experiment={experiment}", "--cfg", "job"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    cfg = OmegaConf.create(out.stdout)
    assert cfg.task.name in ("vae", "dit", "distill", "audio_vae")
    assert "_target_" in cfg.task.module and "_target_" in cfg.trainer and "_target_" in cfg.data


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_module_instantiates(experiment, tmp_path):
    """The LightningModule of every experiment builds (on the meta device: no memory for 1B-scale nets)."""
    cfg = _compose([f"experiment={experiment}", f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/out"])
    if cfg.task.module.get("init_from"):  # a fine-tune of an earlier run's export (not there in a fresh folder)
        cfg.task.module.init_from = None
        cfg.task.module.vae_path = f"{tmp_path}/vae"
    with torch.device("meta"):
        module = instantiate(cfg.task.module)
    assert sum(p.numel() for p in module.parameters()) > 0


def test_override_typo_is_one_clear_error():
    out = subprocess.run([sys.executable, "train.py", "trainer.max_stepz=3", "--cfg", "job"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "max_stepz" in out.stderr


def test_unknown_experiment_is_one_clear_error():
    out = subprocess.run([sys.executable, "train.py", "experiment=nope", "--cfg", "job"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "experiment" in out.stderr and "nope" in out.stderr


def test_slurm_launcher_config_composes():
    """`-m hydra/launcher=slurm` (submitit) composes: the sweep path users take on a cluster."""
    out = subprocess.run([sys.executable, "train.py", "hydra/launcher=slurm", "experiment=dit_pretrain",
                          "trainer=multinode", "--cfg", "hydra"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    launcher = OmegaConf.create(out.stdout).hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.tasks_per_node == 8


def test_trainer_strategies_compose():
    """Every trainer config composes and names its strategy; multinode reads the node count from SLURM."""
    for name in ("cpu", "gpu", "ddp", "ddp_cpu", "fsdp", "fsdp_cpu", "deepspeed_zero2", "deepspeed_zero3",
                 "multinode"):
        cfg = _compose([f"trainer={name}", "paths.root_dir=/tmp", "paths.output_dir=/tmp/out"])
        assert cfg.trainer._target_ == "lightning.pytorch.Trainer", name
    for name in ("fsdp", "fsdp_cpu"):  # FSDP2: the module shards itself in configure_model (parallelize.apply_fsdp)
        cfg = _compose([f"trainer={name}", "paths.root_dir=/tmp", "paths.output_dir=/tmp/out"])
        assert cfg.trainer.strategy._target_ == "vidgen.training.parallelize.FSDP2Strategy"
