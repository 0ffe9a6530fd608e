"""Wan 2.1 VAE weights <-> `VideoVAE`: diffusers' `AutoencoderKLWan` folders and the original `Wan2.1_VAE.pth`.

Our module tree mirrors diffusers' names, so a diffusers state dict maps key for key; this file translates the
config, checks shapes and carries the published latent statistics over (diffusers' `latents_mean/std` become
our `latent_mean/std`). The original release (`WanVAE_` in Wan's `wan/modules/vae.py`: flat `downsamples` /
`upsamples` sequences, `residual.{0,2,3,6}`, `middle.{0,1,2}`, `head.{0,2}`, `conv1/conv2`) is renamed to
diffusers' names first, its config read off the tensor shapes, and its latent statistics are the ones Wan
hard-codes for the 16-channel VAE (`WAN21_LATENTS_MEAN/STD`).

    python -m vidgen.io.convert_wan_vae src=PATH/Wan2.1-T2V-1.3B-Diffusers/vae out=weights/wan21_vae
    python -m vidgen.io.convert_wan_vae src=PATH/Wan2.1-T2V-1.3B/Wan2.1_VAE.pth out=weights/wan21_vae
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vidgen.errors import one_line_errors
from vidgen.io.checkpoint import load_checkpoint
from vidgen.io.pretrained import WeightsError, read_json, read_safetensors, save_pretrained
from vidgen.models.vae import VideoVAE

DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "model.safetensors")
DIFFUSERS_CLASS = "AutoencoderKLWan"
# Wan 2.1's per-channel latent statistics (wan/modules/vae.py `WanVAE`; = diffusers' AutoencoderKLWan defaults).
WAN21_LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
WAN21_LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]


def vae_config_from_diffusers(cfg: dict[str, Any]) -> dict[str, Any]:
    """diffusers `AutoencoderKLWan` config dict -> `VideoVAE` constructor kwargs (Wan 2.1 layouts only)."""
    unsupported = {"attn_scales": [], "is_residual": False, "patch_size": None}
    for key, ok in unsupported.items():
        if cfg.get(key) not in (None, ok):
            raise WeightsError(f"vae config: {DIFFUSERS_CLASS} has {key}={cfg[key]!r}; only the Wan 2.1 layout "
                               f"({key}={ok!r}) is supported")
    base = cfg.get("base_dim", 96)
    if cfg.get("decoder_base_dim") not in (None, base):
        raise WeightsError(f"vae config: decoder_base_dim={cfg['decoder_base_dim']} != base_dim={base} is not "
                           f"supported")
    return {
        "in_channels": cfg.get("in_channels", 3),
        "latent_channels": cfg.get("z_dim", 16),
        "base_channels": base,
        "channel_mult": list(cfg.get("dim_mult", [1, 2, 4, 4])),
        "num_res_blocks": cfg.get("num_res_blocks", 2),
        "temporal_downsample": list(cfg.get("temperal_downsample", [False, True, True])),
        "dropout": cfg.get("dropout", 0.0),
    }


def diffusers_config_from_vae(cfg: dict[str, Any], mean: list[float], std: list[float],
                              where: str = "vae") -> dict[str, Any]:
    """`VideoVAE` config + latent statistics -> the `AutoencoderKLWan` config of the same model (one line if none)."""
    blocks = cfg.get("num_res_blocks", 2)
    if not isinstance(blocks, int):
        if len(set(blocks)) != 1:
            raise WeightsError(f"{where}: config num_res_blocks={blocks} (one count per level) does not map to "
                               f"diffusers' {DIFFUSERS_CLASS} (one count for all levels)")
        blocks = int(blocks[0])
    if int(cfg.get("patch_size", 1)) != 1:
        raise WeightsError(f"{where}: config patch_size={cfg['patch_size']} (pixels folded into channels) has no "
                           f"diffusers {DIFFUSERS_CLASS} equivalent in the Wan 2.1 layout; export a VAE with "
                           "patch_size 1")
    mult, down = list(cfg.get("channel_mult", [1, 2, 4, 4])), list(cfg.get("temporal_downsample", [False, True, True]))
    in_ch = int(cfg.get("in_channels", 3))
    return {"base_dim": int(cfg.get("base_channels", 96)), "decoder_base_dim": None,
            "z_dim": int(cfg.get("latent_channels", 16)), "dim_mult": mult, "num_res_blocks": blocks,
            "attn_scales": [], "temperal_downsample": down, "dropout": float(cfg.get("dropout", 0.0)),
            "latents_mean": [_short_float(v) for v in mean], "latents_std": [_short_float(v) for v in std],
            "is_residual": False, "in_channels": in_ch, "out_channels": in_ch, "patch_size": None,
            "scale_factor_temporal": 2 ** sum(map(bool, down)), "scale_factor_spatial": 2 ** (len(mult) - 1)}


def _short_float(value: float) -> float:
    """The shortest decimal of a float32 value (0.10000000149 -> 0.1): published statistics come back as written."""
    return float(str(np.float32(value)))


def convert_wan_vae_state_dict(sd: dict[str, torch.Tensor], vae: VideoVAE) -> dict[str, torch.Tensor]:
    """diffusers state dict -> `vae.state_dict()` layout (same keys; checked shape by shape).

    Latent statistics are buffers of ours only; they are kept from `vae` unless present in `sd`.
    """
    ours = vae.state_dict()
    missing = sorted(set(ours) - set(sd) - {"latent_mean", "latent_std"})
    unexpected = sorted(set(sd) - set(ours))
    if missing or unexpected:
        raise WeightsError(f"vae: Wan VAE weights do not match VideoVAE: missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]}")
    out = {}
    for key, ref in ours.items():
        value = sd.get(key, ref)
        if value.shape != ref.shape:
            raise WeightsError(f"vae: {key} has shape {tuple(value.shape)}, VideoVAE expects {tuple(ref.shape)}")
        out[key] = value.to(ref.dtype)
    return out


# ------------------------------------------------------------------------------------------ original layout
_RESIDUAL = {"residual.0.": "norm1.", "residual.2.": "conv1.", "residual.3.": "norm2.", "residual.6.": "conv2.",
             "shortcut.": "conv_shortcut."}
_FIXED = {"conv1.": "quant_conv.", "conv2.": "post_quant_conv.", "encoder.conv1.": "encoder.conv_in.",
          "decoder.conv1.": "decoder.conv_in.", "encoder.head.0.": "encoder.norm_out.",
          "encoder.head.2.": "encoder.conv_out.", "decoder.head.0.": "decoder.norm_out.",
          "decoder.head.2.": "decoder.conv_out."}
_MIDDLE = {"0": "resnets.0.", "1": "attentions.0.", "2": "resnets.1."}
_SEQ = re.compile(r"^(encoder|decoder)\.(downsamples|upsamples|middle)\.(\d+)\.(.*)$")


def original_vae_config(sd: dict[str, torch.Tensor], where: str = "vae") -> dict[str, Any]:
    """An `AutoencoderKLWan` config read off the tensor shapes of an original-layout Wan VAE state dict."""
    if "encoder.conv1.weight" not in sd or "conv2.weight" not in sd:
        raise WeightsError(f"{where}: not an original Wan VAE state dict (no encoder.conv1.weight / conv2.weight)")
    indices = sorted({int(m.group(3)) for k in sd if (m := _SEQ.match(k)) and m.group(2) == "downsamples"})
    levels, downs = [[]], []  # residual-block indices per level; the down-sampler indices between levels
    for i in indices:
        p = f"encoder.downsamples.{i}."
        if p + "to_qkv.weight" in sd:
            raise WeightsError(f"{where}: attention blocks between the down-sampling levels (attn_scales) are not "
                               f"supported; only the Wan 2.1 layout is")
        if p + "resample.1.weight" in sd:
            downs.append(i)
            levels.append([])
        else:
            levels[-1].append(i)
    counts = [len(level) for level in levels]
    if len(set(counts)) != 1 or counts[0] == 0:
        raise WeightsError(f"{where}: the encoder's levels hold {counts} residual blocks; expected the same "
                           f"count per level")
    base = sd["encoder.conv1.weight"].shape[0]
    return {"base_dim": base, "z_dim": sd["conv2.weight"].shape[0], "in_channels": sd["encoder.conv1.weight"].shape[1],
            "dim_mult": [sd[f"encoder.downsamples.{level[-1]}.residual.6.weight"].shape[0] // base
                         for level in levels],
            "num_res_blocks": counts[0],
            "temperal_downsample": [f"encoder.downsamples.{i}.time_conv.weight" in sd for i in downs]}


def original_vae_to_diffusers(sd: dict[str, torch.Tensor], cfg: dict[str, Any],
                              where: str = "vae") -> dict[str, torch.Tensor]:
    """Rename an original-layout Wan VAE state dict to `AutoencoderKLWan` names (`cfg` from `original_vae_config`)."""
    per_level = cfg["num_res_blocks"] + 2  # decoder: num_res_blocks + 1 residual blocks, then the up-sampler
    out = {}
    for key, value in sd.items():
        m = _SEQ.match(key)
        if m is None:
            hit = next((k for k in _FIXED if key.startswith(k)), None)
            if hit is None:
                raise WeightsError(f"{where}: unexpected key {key!r} for an original Wan 2.1 VAE")
            out[_FIXED[hit] + key[len(hit):]] = value
            continue
        side, seq, index, rest = m.group(1), m.group(2), int(m.group(3)), m.group(4)
        rest = next((new + rest[len(old):] for old, new in _RESIDUAL.items() if rest.startswith(old)), rest)
        if seq == "middle":
            head = f"{side}.mid_block.{_MIDDLE[str(index)]}"
        elif seq == "downsamples":
            head = f"{side}.down_blocks.{index}."
        else:
            level, j = divmod(index, per_level)
            head = f"{side}.up_blocks.{level}." + (f"resnets.{j}." if j < per_level - 1 else "upsamplers.0.")
        out[head + rest] = value
    return out


# ------------------------------------------------------------------------------------------ loading
def vae_from_diffusers_state(cfg: dict[str, Any], sd: dict[str, torch.Tensor], where: str = "vae") -> VideoVAE:
    """A `VideoVAE` from an `AutoencoderKLWan` config + diffusers-named weights (+ its latents_mean / latents_std)."""
    vae = VideoVAE(**vae_config_from_diffusers(cfg))
    try:
        vae.load_state_dict(convert_wan_vae_state_dict(sd, vae), strict=True)
    except WeightsError as e:
        raise WeightsError(str(e).replace("vae:", f"{where}:", 1)) from None
    if "latents_mean" in cfg and "latents_std" in cfg:
        vae.set_latent_stats(cfg["latents_mean"], cfg["latents_std"])
    return vae


def load_wan_vae_from_diffusers(folder: str | Path, where: str | None = None) -> VideoVAE:
    """Build a `VideoVAE` from a diffusers `AutoencoderKLWan` folder (config.json + *.safetensors)."""
    folder = Path(folder)
    where = where or str(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise WeightsError(f"{where}: no config.json (expected a diffusers {DIFFUSERS_CLASS} folder)")
    cfg = read_json(cfg_path)
    if cfg.get("_class_name", DIFFUSERS_CLASS) != DIFFUSERS_CLASS:
        raise WeightsError(f"{where}: {cfg_path.name} holds a {cfg['_class_name']}, expected {DIFFUSERS_CLASS}")
    weights = next((folder / n for n in DIFFUSERS_WEIGHTS if (folder / n).is_file()), None)
    if weights is None:
        raise WeightsError(f"{where}: none of {', '.join(DIFFUSERS_WEIGHTS)} found")
    return vae_from_diffusers_state(cfg, read_safetensors(weights), where)


def load_wan_vae_original(path: str | Path, where: str | None = None) -> VideoVAE:
    """Build a `VideoVAE` from the original `Wan2.1_VAE.pth` (or a .safetensors file with the same keys)."""
    path = Path(path)
    where = where or str(path)
    sd = read_safetensors(path) if path.suffix == ".safetensors" else load_checkpoint(path)
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if "encoder.conv_in.weight" in sd:
        raise WeightsError(f"{where}: a VAE file in diffusers' key layout; pass its folder (with config.json)")
    cfg = original_vae_config(sd, where)
    if cfg["z_dim"] != len(WAN21_LATENTS_MEAN):
        raise WeightsError(f"{where}: a {cfg['z_dim']}-channel VAE; latent statistics are known only for Wan 2.1's "
                           f"{len(WAN21_LATENTS_MEAN)}-channel VAE (pass a diffusers folder with latents_mean/std)")
    cfg.update(latents_mean=WAN21_LATENTS_MEAN, latents_std=WAN21_LATENTS_STD)
    return vae_from_diffusers_state(cfg, original_vae_to_diffusers(sd, cfg, where), where)


def load_wan_vae(path: str | Path, setting: str = "vae") -> VideoVAE:
    """A Wan 2.1 VAE from a diffusers folder or an original single file -> `VideoVAE` with its latent statistics."""
    path = Path(path)
    where = f"{setting}={path}"
    if not path.exists():
        raise WeightsError(f"{where}: no such file or folder (expected a diffusers {DIFFUSERS_CLASS} folder or "
                           f"the original Wan2.1_VAE.pth)")
    return load_wan_vae_from_diffusers(path, where) if path.is_dir() else load_wan_vae_original(path, where)


def main(argv: list[str] | None = None) -> int:
    """CLI: `src=DIFFUSERS_VAE_FOLDER|Wan2.1_VAE.pth out=EXPORT_FOLDER` -> a `VideoVAE.from_pretrained` folder."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("args", nargs="+", help="src=FOLDER|FILE out=FOLDER")
    kv = dict(a.split("=", 1) for a in p.parse_args(argv).args if "=" in a)
    if set(kv) != {"src", "out"}:
        p.error(f"expected src=FOLDER|FILE out=FOLDER, got {sorted(kv)}")
    vae = load_wan_vae(kv["src"], "src")
    save_pretrained(vae, kv["out"], extra={"source": f"wan:{Path(kv['src']).resolve()}"})
    print(f"wrote {kv['out']} ({sum(p.numel() for p in vae.parameters()):,} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(one_line_errors(main)())
