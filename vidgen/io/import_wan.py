"""Import local Wan 2.1 text-to-video weights (e.g. T2V-1.3B) as a vidgen DiT export folder.

    python -m vidgen.io.import_wan transformer=PATH vae=PATH text_encoder=PATH out=EXPORT \\
        [shift=5.0 guidance=5.0 negative_prompt=... num_frames=81 height=480 width=832 \\
         num_heads=N max_length=512 text_dtype=bfloat16]

- transformer: a diffusers `WanTransformer3DModel` folder (config.json + diffusion_pytorch_model.safetensors, or
  shards + their .index.json), or the original release (`WanModel` keys such as `blocks.0.self_attn.q.weight`):
  its folder (config.json + weights) or a single .safetensors / .pth file (read with `weights_only=True`). Without
  a config.json the config is read off the tensor shapes, with Wan's head size 128 (or `num_heads=N`).
- vae: a diffusers `AutoencoderKLWan` folder or the original `Wan2.1_VAE.pth` (`vidgen.io.convert_wan_vae`); it
  is written as its own export folder `OUT/vae` with the published latent statistics.
- text_encoder: a local transformers UMT5 folder holding its tokenizer too; the export records its path (the
  frozen `HFTextEncoder`, 512 tokens, padding "max_length"), it does not copy the weights.

OUT is an export folder (`vidgen.io.checkpoint`): `sample.py ckpt=OUT` samples from it and a fine-tune starts from
it. Wan's sampling settings travel with it in `meta["defaults"]` (81 frames at 480x832, Euler, guidance 5 with
Wan's default negative prompt) and its fixed timestep shift in `meta["flow"]` (`base_tokens=None`).
Image-to-video Wan (I2V-14B) is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from vidgen.conditioning.text import TextCondition
from vidgen.diffusion.sampling import SAMPLERS
from vidgen.errors import UserError, one_line_errors
from vidgen.io.atomic import atomic_write_text
from vidgen.io.checkpoint import EXPORT_META, ModelParts, Part, load_checkpoint, write_export
from vidgen.io.convert_wan_dit import (DIFFUSERS_CLASS, check_t2v, diffusers_config_from_original,
                                       diffusers_config_from_state, dit_config_from_diffusers, convert_wan_state_dict,
                                       is_original_layout, original_to_diffusers)
from vidgen.io.convert_wan_vae import load_wan_vae
from vidgen.io.fingerprint import fingerprint_folder
from vidgen.io.pretrained import WeightsError, class_path, read_json, read_safetensors, save_pretrained
from vidgen.models.dit import DiT
from vidgen.models.text import HFTextEncoder

# Wan 2.1's sampling defaults (wan/configs: 81 frames at 480x832, sample_shift 5, guide scale 5, 50 steps).
WAN_NEGATIVE_PROMPT = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，"
                       "作品，画作，画面，静止，整体发灰，最差质量，低质"
                       "量，JPEG压缩残留，丑陋的，残缺的，多余的手指"
                       "，画得不好的手部，画得不好的脸部，畸形的，毁容的"
                       "，形态畸形的肢体，手指融合，静止不动的画面，杂乱"
                       "的背景，三条腿，背景人很多，倒着走")  # wan_shared_cfg.sample_neg_prompt
DEFAULTS = {"num_frames": 81, "height": 480, "width": 832, "steps": 50, "shift": 5.0, "guidance": 5.0,
            "negative_prompt": WAN_NEGATIVE_PROMPT, "sampler": "euler"}
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")
PREFIX = "model.diffusion_model."  # single files repackaged for ComfyUI


# ---------------------------------------------------------------------------------------------- weights files
def read_weights_file(path: Path, where: str) -> dict[str, torch.Tensor]:
    """All tensors of one .safetensors or .pth/.pt/.bin file (`weights_only=True`)."""
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix not in TORCH_SUFFIXES:
        raise WeightsError(f"{where}: expected a .safetensors or {'/'.join(TORCH_SUFFIXES)} weights file")
    sd = load_checkpoint(path)
    for wrapper in ("state_dict", "model", "module"):  # a training script's {"model": state_dict}
        if isinstance(sd.get(wrapper), dict) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
            sd = sd[wrapper]
    if not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{where}: {path.name} is not a plain state dict of tensors")
    return sd


def read_weights_folder(folder: Path, where: str) -> dict[str, torch.Tensor]:
    """A folder's weights: sharded safetensors with their index json, one known file, or its only weights file."""
    for name in WEIGHT_NAMES:
        index = folder / f"{name}.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise WeightsError(f"{index}: not a safetensors index (expected a JSON object with weight_map)") \
                    from None
            sd: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                sd.update(read_safetensors(folder / shard))
            missing = sorted(set(weight_map) - set(sd))
            if missing:
                raise WeightsError(f"{index}: lists {len(missing)} tensor(s) its shards do not hold "
                                   f"(e.g. {missing[0]})")
            return sd
        if (folder / name).is_file():
            return read_safetensors(folder / name)
    files = [p for p in sorted(folder.iterdir()) if p.suffix in (".safetensors", *TORCH_SUFFIXES)]
    if len(files) != 1:
        raise WeightsError(f"{where}: no weights found (expected {WEIGHT_NAMES[0]}, its shards with "
                           f"{WEIGHT_NAMES[0]}.index.json, or a single .safetensors / .pth file)")
    return read_weights_file(files[0], where)


# ---------------------------------------------------------------------------------------------- the three parts
def load_transformer(path: str | os.PathLike, num_heads: int | None = None,
                     setting: str = "transformer") -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    """A Wan 2.1 T2V transformer (diffusers folder, original folder or file) -> (DiT config, our state, layout)."""
    path = Path(path)
    where = f"{setting}={path}"
    if not path.exists():
        raise WeightsError(f"{where}: no such file or folder (expected a diffusers {DIFFUSERS_CLASS} folder or the "
                           f"original Wan 2.1 weights)")
    config = read_json(path / "config.json") if (path / "config.json").is_file() else None
    if config is not None:
        name = config.get("_class_name", DIFFUSERS_CLASS)
        if name not in (DIFFUSERS_CLASS, "WanModel"):
            raise WeightsError(f"{where}: config.json holds a {name}, expected a {DIFFUSERS_CLASS} (or WanModel)")
        config = diffusers_config_from_original(config, where) if name == "WanModel" else config
        dit_config_from_diffusers(config, where)  # refuses I2V (image_dim) before any weights are read
    sd = read_weights_folder(path, where) if path.is_dir() else read_weights_file(path, where)
    sd = {k.removeprefix(PREFIX): v for k, v in sd.items()}
    check_t2v(sd, where)
    layout = "original" if is_original_layout(sd) else "diffusers"
    if layout == "original":
        sd = original_to_diffusers(sd, where)
    if config is None:
        config = diffusers_config_from_state(sd, num_heads, where)
    if num_heads is not None and num_heads != config.get("num_attention_heads"):
        raise WeightsError(f"num_heads={num_heads}: {where} has a config.json with "
                           f"{config.get('num_attention_heads')} heads")
    return dit_config_from_diffusers(config, where), convert_wan_state_dict(sd), layout


def text_encoder_part(path: str | os.PathLike, text_dim: int, max_length: int = 512, dtype: str | None = None,
                      setting: str = "text_encoder") -> Part:
    """A local transformers UMT5 folder (+ tokenizer) -> the frozen `HFTextEncoder` part (path recorded, no copy)."""
    path = Path(path)
    where = f"{setting}={path}"
    if not path.is_dir():
        raise WeightsError(f"{where}: {'a file' if path.exists() else 'no such folder'}; expected a local "
                           f"transformers UMT5 folder (config.json, weights and tokenizer files, e.g. "
                           f"Wan2.1-T2V-1.3B-Diffusers/text_encoder with the files of its tokenizer/ folder)")
    if not (path / "config.json").is_file():
        raise WeightsError(f"{where}: no config.json (expected a transformers text-encoder folder)")
    config = read_json(path / "config.json")
    if not any(p.suffix in (".safetensors", ".bin") for p in path.iterdir()):
        raise WeightsError(f"{where}: no weights (*.safetensors) beside config.json")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        sibling = path.parent / "tokenizer"
        hint = f"; copy the files of {sibling} into it" if sibling.is_dir() else ""
        raise WeightsError(f"{where}: no tokenizer ({' / '.join(TOKENIZER_FILES)}): HFTextEncoder reads the model "
                           f"and its tokenizer from one folder{hint}")
    width = config.get("d_model", config.get("hidden_size"))
    if width != text_dim:
        raise WeightsError(f"{where}: its width is {width}, the transformer's text_dim is {text_dim} (Wan 2.1 reads "
                           f"UMT5-XXL embeddings, 4096 wide)")
    dtype = dtype or str(config.get("dtype") or config.get("torch_dtype") or "float32")
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise UserError(f"text_dtype={dtype}: expected a torch dtype name such as float32 or bfloat16")
    config = {"path": str(path.resolve()), "max_length": max_length, "padding": "max_length", "dtype": dtype,
              "dim": int(width)}
    return Part(class_path(HFTextEncoder), config, None, trainable=False)


def check_defaults(defaults: dict[str, Any], vae: torch.nn.Module, dit_config: dict[str, Any]) -> None:
    """Refuse default sizes or a sampler the imported VAE + DiT cannot sample with (one line naming the setting)."""
    if defaults["sampler"] not in SAMPLERS:
        raise UserError(f"sampler={defaults['sampler']}: expected one of {', '.join(sorted(SAMPLERS))}")
    try:
        vae.latent_frames(int(defaults["num_frames"]))
    except ValueError as e:
        raise UserError(f"num_frames={defaults['num_frames']}: {e}") from None
    m = vae.spatial_factor * max(dit_config["patch_size"][1:])
    for key in ("height", "width"):
        if int(defaults[key]) % m or int(defaults[key]) < m:
            raise UserError(f"{key}={defaults[key]}: expected a positive multiple of {m}")


# ---------------------------------------------------------------------------------------------- the export
def import_wan(transformer: str | os.PathLike, vae: str | os.PathLike, text_encoder: str | os.PathLike,
               out: str | os.PathLike, num_heads: int | None = None, max_length: int = 512,
               text_dtype: str | None = None, **defaults: Any) -> Path:
    """Write the export folder `out` (DiT + text encoder reference + `out/vae`); `defaults` override `DEFAULTS`."""
    unknown = sorted(set(defaults) - set(DEFAULTS))
    if unknown:
        raise UserError(f"{unknown[0]}: unknown setting (expected one of {', '.join(DEFAULTS)})")
    defaults = {**DEFAULTS, **defaults}
    out = Path(out)
    dit_config, dit_state, layout = load_transformer(transformer, num_heads)
    text = text_encoder_part(text_encoder, dit_config["text_dim"], max_length, text_dtype)
    vae_model = load_wan_vae(vae)
    if vae_model.latent_channels != dit_config["in_channels"]:
        raise WeightsError(f"vae={vae}: {vae_model.latent_channels} latent channels, the transformer {transformer} "
                           f"takes {dit_config['in_channels']}")
    check_defaults(defaults, vae_model, dit_config)
    sources = {"transformer": transformer, "vae": vae, "text_encoder": text_encoder}
    info = {"source": str(Path(transformer).resolve()), "ema_used": False, "global_step": None,
            "imported": {"model": "Wan 2.1 T2V", "transformer_layout": layout,
                         **{k: str(Path(v).resolve()) for k, v in sources.items()}}}
    flow = {"logit_mean": 0.0, "logit_std": 1.0, "base_shift": float(defaults["shift"]), "base_tokens": None,
            "min_shift": 1.0, "max_shift": 8.0, "per_frame_t": False}  # Wan samples with one fixed shift
    conditioner = {"text": {"class": class_path(TextCondition), "dropout": 0.1}}  # CFG dropout when fine-tuning
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.vae-", dir=out.parent) as staging:
        vae_dir = save_pretrained(vae_model, Path(staging) / "vae", extra={"source": f"wan:{info['imported']['vae']}"})
        meta = {"flow": flow, "vae": {"path": str(vae_dir), "fingerprint": fingerprint_folder(vae_dir)},
                "conditioner": conditioner, "defaults": defaults}
        parts = ModelParts("dit", {"dit": Part(class_path(DiT), dit_config, dit_state),
                                   "cond.text": text}, meta, info)
        write_export(parts, out)  # validates every part and copies the VAE into out/vae
    export = read_json(out / EXPORT_META)  # the VAE's home is now out/vae, not the staging folder
    export["meta"]["vae"]["path"] = str((out / "vae").resolve())
    atomic_write_text(out / EXPORT_META, json.dumps(export, indent=2))
    return out


# ---------------------------------------------------------------------------------------------- command line
_REQUIRED = ("transformer", "vae", "text_encoder", "out")
_TYPES = {"shift": float, "guidance": float, "num_frames": int, "height": int, "width": int, "steps": int,
          "num_heads": int, "max_length": int, "negative_prompt": str, "sampler": str, "text_dtype": str}


def parse_settings(argv: list[str] | None) -> dict[str, Any]:
    """`key=value` arguments -> typed keyword arguments of `import_wan` (one line naming a bad one)."""
    p = argparse.ArgumentParser(prog="python -m vidgen.io.import_wan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("settings", nargs="+", help="transformer=PATH vae=PATH text_encoder=PATH out=FOLDER [key=value]")
    settings = {}
    for arg in p.parse_args(argv).settings:
        key, sep, value = arg.partition("=")
        if not sep or key not in (*_REQUIRED, *_TYPES):
            raise UserError(f"{arg}: unknown setting (expected {'=, '.join(_REQUIRED)}= and optionally "
                            f"{'=, '.join(_TYPES)}=)")
        try:
            settings[key] = _TYPES.get(key, str)(value)
        except ValueError:
            raise UserError(f"{key}={value}: expected {'a number' if _TYPES[key] is float else 'an integer'}") \
                from None
    missing = [k for k in _REQUIRED if k not in settings]
    if missing:
        raise UserError(f"{missing[0]}=PATH: missing (expected {'=PATH '.join(_REQUIRED)}=FOLDER)")
    return settings


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (see the module docstring)."""
    settings = parse_settings(argv)
    out = import_wan(**settings)
    dit = json.loads((out / "dit" / "config.json").read_text())["config"]
    print(f"imported Wan 2.1 T2V ({dit['depth']} blocks, width {dit['dim']}) -> {out} (dit, cond.text -> "
          f"{settings['text_encoder']}, vae); sample with: python sample.py ckpt={out} prompt=\"...\"")
    return 0


if __name__ == "__main__":
    sys.exit(one_line_errors(main)())
