"""Run the real `train.py` in a subprocess (tests): the same entry point, Hydra composition and launcher a user has."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train(overrides: list[str], root: Path, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """`python train.py OVERRIDES` with runs under `root/runs`; raises with the output tail when it fails."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "VIDGEN_ROOT": str(root)}
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides], cwd=root, env=env,
                         capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"train.py {' '.join(overrides)} exited {out.returncode}:\n"
                             f"{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return out


def tiny_dit_overrides(vae_export: Path, shards: Path) -> list[str]:
    """experiment=quickstart_dit shrunk to a seconds-long CPU run on the given shards and VAE export."""
    return ["experiment=quickstart_dit", f"task.module.vae_path={vae_export}", f"data.train_shards={shards}",
            "model.dit.dim=32", "model.dit.depth=2", "model.dit.num_heads=2", "model.dit.ffn_dim=64",
            "model.dit.freq_dim=32", "model.text.dim=16", "model.text.depth=1",
            "~callbacks.sample_logging", "logger=none", "trainer.limit_val_batches=0",
            "trainer.enable_progress_bar=false"]


def tiny_vae_overrides(shards: Path) -> list[str]:
    """experiment=quickstart_vae with the tiny VAE, shrunk to a seconds-long CPU run."""
    return ["experiment=quickstart_vae", "model/vae=tiny", f"data.train_shards={shards}",
            "task.module.log_video_every=100000", "logger=none", "trainer.limit_val_batches=0",
            "trainer.enable_progress_bar=false"]
