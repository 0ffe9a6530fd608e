"""OmegaConf resolvers used by the configs, registered once by every entry point."""

from __future__ import annotations

import json
import os
from pathlib import Path

from omegaconf import OmegaConf


def vae_latent_channels(vae_path: str | None, default: int) -> int:
    """Latent channels of the VAE export folder `vae_path` (its config.json), or `default` while it does not exist."""
    config = Path(str(vae_path)) / "config.json"
    return int(json.loads(config.read_text())["config"]["latent_channels"]) if config.is_file() else int(default)


CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def register_resolvers() -> None:
    """Register `${vidgen.missing_env:NAME}` (True when the env var NAME is unset or empty),
    `${vidgen.vae_latent_channels:PATH,DEFAULT}` (wires the DiT's in_channels to a VAE export) and
    `${vidgen.config_dir:}` (this checkout's configs/ folder, whatever folder train.py runs from)."""
    if not OmegaConf.has_resolver("vidgen.config_dir"):
        OmegaConf.register_new_resolver("vidgen.config_dir", lambda: str(CONFIG_DIR))
    if not OmegaConf.has_resolver("vidgen.missing_env"):
        OmegaConf.register_new_resolver("vidgen.missing_env", lambda name: not os.environ.get(name))
    if not OmegaConf.has_resolver("vidgen.vae_latent_channels"):
        OmegaConf.register_new_resolver("vidgen.vae_latent_channels", vae_latent_channels)


register_resolvers()
