"""Import a Wan 2.1 VAE saved in diffusers format (`AutoencoderKLWan`) as a `VideoVAE`.

Our module tree mirrors diffusers' names, so the state dict maps key for key; this file only
translates the config, checks shapes, and carries the published latent statistics over.

    python -m vidgen.io.convert_wan_vae src=PATH/Wan2.1-T2V-1.3B-Diffusers/vae out=weights/wan21_vae
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from vidgen.models.vae import VideoVAE
from vidgen.io.pretrained import save_pretrained

DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "model.safetensors")


def vae_config_from_diffusers(cfg: dict[str, Any]) -> dict[str, Any]:
    """diffusers `AutoencoderKLWan` config dict -> `VideoVAE` constructor kwargs (Wan 2.1 layouts only)."""
    unsupported = {"attn_scales": [], "is_residual": False, "patch_size": None}
    for key, ok in unsupported.items():
        if cfg.get(key) not in (None, ok):
            raise ValueError(f"AutoencoderKLWan config has {key}={cfg[key]!r}; only the Wan 2.1 layout "
                             f"({key}={ok!r}) is supported")
    base = cfg.get("base_dim", 96)
    if cfg.get("decoder_base_dim") not in (None, base):
        raise ValueError(f"decoder_base_dim={cfg['decoder_base_dim']} != base_dim={base} is not supported")
    return {
        "in_channels": cfg.get("in_channels", 3),
        "latent_channels": cfg.get("z_dim", 16),
        "base_channels": base,
        "channel_mult": list(cfg.get("dim_mult", [1, 2, 4, 4])),
        "num_res_blocks": cfg.get("num_res_blocks", 2),
        "temporal_downsample": list(cfg.get("temperal_downsample", [False, True, True])),
        "dropout": cfg.get("dropout", 0.0),
    }


def convert_wan_vae_state_dict(sd: dict[str, torch.Tensor], vae: VideoVAE) -> dict[str, torch.Tensor]:
    """diffusers state dict -> `vae.state_dict()` layout (same keys; checked shape by shape).

    Latent statistics are buffers of ours only; they are kept from `vae` unless present in `sd`.
    """
    ours = vae.state_dict()
    missing = sorted(set(ours) - set(sd) - {"latent_mean", "latent_std"})
    unexpected = sorted(set(sd) - set(ours))
    if missing or unexpected:
        raise KeyError(f"Wan VAE weights do not match VideoVAE: missing {missing[:5]}, unexpected {unexpected[:5]}")
    out = {}
    for key, ref in ours.items():
        value = sd.get(key, ref)
        if value.shape != ref.shape:
            raise ValueError(f"{key}: weights have shape {tuple(value.shape)}, VideoVAE expects {tuple(ref.shape)}")
        out[key] = value.to(ref.dtype)
    return out


def load_wan_vae_from_diffusers(folder: str | Path) -> VideoVAE:
    """Build a `VideoVAE` from a diffusers `AutoencoderKLWan` folder (config.json + *.safetensors)."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected a diffusers AutoencoderKLWan folder)")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("_class_name", "AutoencoderKLWan") != "AutoencoderKLWan":
        raise ValueError(f"{cfg_path}: holds a {cfg['_class_name']}, expected AutoencoderKLWan")
    weights = next((folder / n for n in DIFFUSERS_WEIGHTS if (folder / n).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{folder}: none of {DIFFUSERS_WEIGHTS} found")
    vae = VideoVAE(**vae_config_from_diffusers(cfg))
    vae.load_state_dict(convert_wan_vae_state_dict(load_file(str(weights)), vae), strict=True)
    if "latents_mean" in cfg and "latents_std" in cfg:
        vae.set_latent_stats(cfg["latents_mean"], cfg["latents_std"])
    return vae


def main(argv: list[str] | None = None) -> None:
    """CLI: `src=DIFFUSERS_VAE_FOLDER out=EXPORT_FOLDER` -> a `VideoVAE.from_pretrained` folder."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("args", nargs="+", help="src=FOLDER out=FOLDER")
    kv = dict(a.split("=", 1) for a in p.parse_args(argv).args)
    if set(kv) != {"src", "out"}:
        raise SystemExit(f"expected src=FOLDER out=FOLDER, got {sorted(kv)}")
    vae = load_wan_vae_from_diffusers(kv["src"])
    save_pretrained(vae, kv["out"], extra={"source": f"diffusers:{kv['src']}"})
    print(f"wrote {kv['out']} ({sum(p.numel() for p in vae.parameters()):,} parameters)")


if __name__ == "__main__":
    main()
