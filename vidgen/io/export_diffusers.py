"""Write a vidgen DiT checkpoint or export folder (Wan 2.1 layout) in diffusers' format.

    python -m vidgen.io.export_diffusers EXPORT OUT

    OUT/transformer    WanTransformer3DModel.from_pretrained (config.json + diffusion_pytorch_model.safetensors)
    OUT/vae            AutoencoderKLWan.from_pretrained (latents_mean / latents_std = the VAE's latent statistics)
    OUT/text_encoder   links to the Hugging Face text-encoder folder the export records (not copied), and
    OUT/tokenizer        OUT/model_index.json + OUT/scheduler (FlowMatchEulerDiscreteScheduler at the export's
                         shift), so `WanPipeline.from_pretrained(OUT)` loads the whole pipeline

EXPORT is anything `vidgen.io.checkpoint.read_parts` reads (an export folder, a .ckpt, an FSDP / DeepSpeed folder;
EMA weights when present). A DiT or VAE whose config has no diffusers counterpart (text_mask=true, another RoPE
base, per-level residual-block counts, ...) is refused in one line naming the field. Tensors are written as they
are: Wan (diffusers) -> import_wan -> export_diffusers gives the original tensors back bit for bit. Sampling
settings other than the shift (guidance, negative prompt, frame count) have no place in a diffusers folder.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from vidgen.diffusion.flow import RectifiedFlow, num_latent_tokens
from vidgen.errors import one_line_errors
from vidgen.io.atomic import atomic_dir, atomic_write_text
from vidgen.io.checkpoint import CheckpointError, ModelParts, check_vae_reference, read_parts
from vidgen.io.convert_wan_dit import DIFFUSERS_CLASS as TRANSFORMER_CLASS, diffusers_config_from_dit, \
    diffusers_state_dict
from vidgen.io.convert_wan_vae import DIFFUSERS_CLASS as VAE_CLASS, diffusers_config_from_vae
from vidgen.io.pretrained import WEIGHTS_NAME, WeightsError, class_path, read_config, read_safetensors
from vidgen.models.dit import DiT
from vidgen.models.text import HFTextEncoder
from vidgen.models.vae import VideoVAE, compression

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"  # = our Euler sampler with a fixed shift
STATS = ("latent_mean", "latent_std")  # our VAE's buffers; diffusers keeps them in config.json


def _diffusers_version() -> str:
    try:
        return importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        return "0.32.0"


def write_diffusers_model(folder: Path, class_name: str, config: dict[str, Any],
                          state: dict[str, torch.Tensor]) -> None:
    """`config.json` (`_class_name` + config) and `diffusion_pytorch_model.safetensors`, as diffusers saves them."""
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / DIFFUSERS_WEIGHTS), metadata={"format": "pt"})
    meta = {"_class_name": class_name, "_diffusers_version": _diffusers_version(), **config}
    atomic_write_text(folder / "config.json", json.dumps(meta, indent=2))


def check_with_diffusers(class_name: str, config: dict[str, Any], state: dict[str, torch.Tensor],
                         where: str) -> None:
    """When diffusers is installed: its `class_name(**config)` (built on the meta device) takes exactly `state`."""
    try:
        import diffusers  # optional: the export is written without it
    except ImportError:
        return
    with torch.device("meta"):
        ref = getattr(diffusers, class_name).from_config(config).state_dict()
    missing, unexpected = sorted(set(ref) - set(state)), sorted(set(state) - set(ref))
    shapes = sorted(k for k in set(ref) & set(state) if ref[k].shape != state[k].shape)
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("misshaped", shapes)):
        if keys:
            raise WeightsError(f"{where}: does not map to diffusers' {class_name}: {len(keys)} {label} key(s) "
                               f"(e.g. {keys[0]})")


def transformer_files(parts: ModelParts, where: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The DiT part -> (`WanTransformer3DModel` config, diffusers-named state)."""
    dit = parts.parts.get("dit")
    if dit is None or dit.cls != class_path(DiT):
        raise WeightsError(f"{where}: its DiT is {dit.cls if dit else 'missing'}; only {class_path(DiT)} "
                           f"(the Wan 2.1 layout) exports to diffusers")
    config = diffusers_config_from_dit(dit.config, f"{where} [dit]")
    state = diffusers_state_dict(dit.state)
    check_with_diffusers(TRANSFORMER_CLASS, config, state, f"{where} [dit]")
    return config, state


def vae_files(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A `VideoVAE` export folder -> (`AutoencoderKLWan` config with its latent statistics, state)."""
    meta = read_config(folder, VideoVAE)
    state = read_safetensors(folder / WEIGHTS_NAME)
    mean, std = (meta.get(k, state[k].tolist() if k in state else None) for k in STATS)
    config = diffusers_config_from_vae(meta["config"], mean, std, f"vae={folder}")
    state = {k: v for k, v in state.items() if k not in STATS}
    check_with_diffusers(VAE_CLASS, config, state, f"vae={folder}")
    return config, state


def scheduler_shift(parts: ModelParts, vae_config: dict[str, Any], patch: list[int]) -> float:
    """The fixed shift diffusers' scheduler gets: the recorded default, else the flow's shift at the default size."""
    defaults = parts.meta.get("defaults") or {}
    if defaults.get("shift") is not None:
        return float(defaults["shift"])
    flow = RectifiedFlow(**(parts.meta.get("flow") or {}))
    if flow.base_tokens is None or not {"num_frames", "height", "width"} <= set(defaults):
        return float(flow.base_shift)
    tf, sf = compression(vae_config["dim_mult"], vae_config["temperal_downsample"])
    shape = (1, 1, 1 + (int(defaults["num_frames"]) - 1) // tf, int(defaults["height"]) // sf,
             int(defaults["width"]) // sf)
    return float(flow.shift_for(num_latent_tokens(shape, patch)))


def link_text_encoder(parts: ModelParts, out: Path, where: str) -> str | None:
    """Link `out/text_encoder` and `out/tokenizer` to the recorded HF folder; its (model, tokenizer) class names."""
    text = parts.parts.get("cond.text")
    if text is None or text.cls != class_path(HFTextEncoder):
        return None
    folder = Path(text.config["path"])
    if not (folder / "config.json").is_file():
        raise WeightsError(f"{where}: the text encoder it records ({folder}) is not there (expected a Hugging "
                           f"Face folder with config.json)")
    for name in ("text_encoder", "tokenizer"):
        os.symlink(folder.resolve(), out / name, target_is_directory=True)
    return str(folder)


_HF_ENCODERS = {"umt5": "UMT5EncoderModel", "t5": "T5EncoderModel", "mt5": "MT5EncoderModel"}


def _class_names(folder: Path) -> tuple[str, str]:
    """(text-encoder class, tokenizer class) of a Hugging Face folder, as a model_index.json lists them."""
    config = json.loads((folder / "config.json").read_text())
    model = (config.get("architectures") or [None])[0] or _HF_ENCODERS.get(config.get("model_type"), "AutoModel")
    tok_config = folder / "tokenizer_config.json"
    tokenizer = json.loads(tok_config.read_text()).get("tokenizer_class") if tok_config.is_file() else None
    return model, tokenizer or "AutoTokenizer"


def export_diffusers(export: str | os.PathLike, out: str | os.PathLike) -> dict[str, Any]:
    """Write `out` (see the module docstring); returns what was written {"transformer", "vae", "text_encoder", ...}."""
    out, where = Path(out), f"export={export}"
    if out.exists() and any(out.iterdir()) and not (out / "transformer" / "config.json").is_file():
        raise CheckpointError(f"out={out}: exists and is not a diffusers export; choose an empty or new folder")
    parts = read_parts(export, kind="dit", setting="export")
    if parts.adapters:
        raise WeightsError(f"{where}: holds adapters ({', '.join(parts.adapters)}); fold them into the DiT first "
                           f"(python -m vidgen.io.lora {export} MERGED --merge) or export them alone "
                           f"(python -m vidgen.io.lora {export} LORA.safetensors --layout diffusers)")
    t_config, t_state = transformer_files(parts, where)
    vae_folder = check_vae_reference(parts.meta.get("vae") or {})
    v_config, v_state = vae_files(vae_folder)
    shift = scheduler_shift(parts, v_config, t_config["patch_size"])
    with atomic_dir(out) as tmp:
        write_diffusers_model(tmp / "transformer", TRANSFORMER_CLASS, t_config, t_state)
        write_diffusers_model(tmp / "vae", VAE_CLASS, v_config, v_state)
        text = link_text_encoder(parts, tmp, where)
        if text is not None:
            (tmp / "scheduler").mkdir()
            scheduler = {"_class_name": SCHEDULER_CLASS, "_diffusers_version": _diffusers_version(),
                         "num_train_timesteps": 1000, "shift": shift, "use_dynamic_shifting": False}
            atomic_write_text(tmp / "scheduler" / "scheduler_config.json", json.dumps(scheduler, indent=2))
            model, tokenizer = _class_names(Path(text))
            index = {"_class_name": "WanPipeline", "_diffusers_version": _diffusers_version(),
                     "scheduler": ["diffusers", SCHEDULER_CLASS], "text_encoder": ["transformers", model],
                     "tokenizer": ["transformers", tokenizer], "transformer": ["diffusers", TRANSFORMER_CLASS],
                     "vae": ["diffusers", VAE_CLASS]}
            atomic_write_text(tmp / "model_index.json", json.dumps(index, indent=2))
    return {"out": out, "transformer": t_config, "vae": vae_folder, "text_encoder": text, "shift": shift}


def main(argv: list[str] | None = None) -> int:
    """`python -m vidgen.io.export_diffusers EXPORT OUT`."""
    p = argparse.ArgumentParser(prog="python -m vidgen.io.export_diffusers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export", help="a vidgen DiT export folder or checkpoint (Wan 2.1 layout)")
    p.add_argument("out", help="the diffusers folder to write")
    args = p.parse_args(argv)
    done = export_diffusers(args.export, args.out)
    text = (f"text_encoder + tokenizer -> {done['text_encoder']}, scheduler shift {done['shift']:g}; "
            f"WanPipeline.from_pretrained({args.out}) loads it") if done["text_encoder"] else \
        "no Hugging Face text encoder recorded: transformer and vae only"
    print(f"wrote {args.out}/transformer ({TRANSFORMER_CLASS}) and {args.out}/vae ({VAE_CLASS}, from "
          f"{done['vae']}); {text}")
    return 0


if __name__ == "__main__":
    sys.exit(one_line_errors(main)())
