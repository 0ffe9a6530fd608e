"""OmegaConf resolvers used by the configs, registered once by every entry point."""

from __future__ import annotations

import json
import os
from pathlib import Path

from omegaconf import OmegaConf

from vidgen.models.audio_vae import audio_latents_per_video_latent
from vidgen.models.vae import compression


def _export_meta(path: str | None) -> dict | None:
    """The config.json of the export folder `path` (constructor config + the model's `export_extra`), None while it
    does not exist."""
    config = Path(str(path)) / "config.json"
    return json.loads(config.read_text()) if path is not None and config.is_file() else None


def _export_config(path: str | None) -> dict | None:
    """The recorded constructor config of the export folder `path` (its config.json), None while it does not exist."""
    meta = _export_meta(path)
    return meta["config"] if meta is not None else None


def vae_latent_channels(vae_path: str | None, default: int) -> int:
    """Latent channels of the VAE export folder `vae_path` (its config.json), or `default` while it does not exist."""
    config = _export_config(vae_path)
    return int(config["latent_channels"]) if config is not None else int(default)


def vae_time_stride(vae_path: str | None, default: int) -> int:
    """Temporal compression s of the video VAE export `vae_path` (`compression` of its config), or `default`."""
    config = _export_config(vae_path)
    if config is None:
        return int(default)
    return compression(config.get("channel_mult", (1, 2, 4, 4)), config.get("temporal_downsample", (False, True, True)),
                       config.get("patch_size", 1))[0]


def audio_latent_channels(audio_vae_path: str | None, default: int = 0) -> int:
    """Latent channels of the audio VAE export `audio_vae_path` (the DiT's audio_channels), `default` (0: no audio
    stream) while there is none."""
    config = _export_config(audio_vae_path)
    return int(config.get("latent_channels", 16)) if config is not None else int(default)


def audio_per_latent_frame(audio_vae_path: str | None, fps: float, video_time_stride: int, default: int = 1) -> int:
    """a: audio latents per video latent frame for the audio VAE export at `audio_vae_path` and video at `fps` with
    time stride s (`audio_latents_per_video_latent`), `default` while there is no export."""
    meta = _export_meta(audio_vae_path)
    if meta is None:
        return int(default)
    # The hop the model itself recorded (AudioVAE.export_extra), not a re-derivation of its formula here.
    return audio_latents_per_video_latent(int(meta["config"].get("sample_rate", 24000)), int(meta["hop"]), float(fps),
                                          int(video_time_stride))


CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
RESOLVERS = {
    "vidgen.vae_latent_channels": vae_latent_channels,
    "vidgen.vae_time_stride": vae_time_stride,
    "vidgen.audio_latent_channels": audio_latent_channels,
    "vidgen.audio_per_latent_frame": audio_per_latent_frame,
}


def register_resolvers() -> None:
    """Register `${vidgen.missing_env:NAME}` (True when the env var NAME is unset or empty),
    `${vidgen.vae_latent_channels:PATH,DEFAULT}` (wires the DiT's in_channels to a VAE export),
    `${vidgen.vae_time_stride:PATH,DEFAULT}`, `${vidgen.audio_latent_channels:PATH,DEFAULT}` and
    `${vidgen.audio_per_latent_frame:AUDIO_PATH,FPS,STRIDE,DEFAULT}` (wire the DiT's audio stream to an audio VAE
    export) and `${vidgen.config_dir:}` (this checkout's configs/ folder, whatever folder train.py runs from)."""
    if not OmegaConf.has_resolver("vidgen.config_dir"):
        OmegaConf.register_new_resolver("vidgen.config_dir", lambda: str(CONFIG_DIR))
    if not OmegaConf.has_resolver("vidgen.missing_env"):
        OmegaConf.register_new_resolver("vidgen.missing_env", lambda name: not os.environ.get(name))
    for name, fn in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()
