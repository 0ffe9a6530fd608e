"""Fine-tuning from outside the model code: start from a base (`init_from`), then add LoRA adapters (peft).

    base = load_base(dit, conditioner, "exports/dit")        # strict: one line naming the first misfit tensor
    spec = apply_lora(dit, rank=16, alpha=16)                # in place; returns what checkpoints record
    freeze_all_but_adapters(module)                          # only `lora_` tensors train (optimizer, EMA)

The base is any checkpoint or export folder `vidgen.io.checkpoint.read_parts` reads (ours, or an imported Wan
export); its DiT part and any conditioner encoder it trained are loaded into the run's configured models, and
`base` records where they came from with a content fingerprint per part. LoRA (Hu et al. 2021) adds
`W x + (alpha / r) B A x` beside the frozen linear layers named by a regex (`DEFAULT_TARGETS`: the attention and
MLP linears of every block); peft's `lora_A` / `lora_B` modules hold the adapter, so a LoRA checkpoint stores only
those and `vidgen.io.lora` exports them for diffusers / ComfyUI or folds them into the weights.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any

from torch import nn

from vidgen.conditioning import Conditioner
from vidgen.errors import UserError
from vidgen.io.checkpoint import ModelParts, Part, read_parts
from vidgen.io.fingerprint import fingerprint_folder, fingerprint_module, short
from vidgen.io.pretrained import WEIGHTS_NAME, WeightsError, class_path, load_state

log = logging.getLogger(__name__)

ADAPTER = "lora"          # its name in checkpoints and exports (`adapter_lora.safetensors`)
PEFT_NAME = "default"     # peft's adapter name inside the modules (`to_q.lora_A.default.weight`)
LORA_MARK = ".lora_"      # in the name of every adapter tensor, and of no base weight
# Self- and cross-attention projections and the MLP of every block (our names; see vidgen.models.layers).
DEFAULT_TARGETS = r"blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out)|blocks\.\d+\.ffn\.(fc1|fc2)"


# ---------------------------------------------------------------------------------------------- the base
def load_base(dit: nn.Module, conditioner: Conditioner, path: str, ema: bool = True, vae_path: str | None = None,
              setting: str = "task.module.init_from") -> dict[str, Any]:
    """Load the DiT (and any trained conditioner encoder) of the checkpoint / export `path` into the run's models.

    Returns {"path", "ema", "step", "parts": [names loaded], "fingerprints": {name: sha256}} for the checkpoint
    meta. Stops with one line on: no such base, a base that holds adapters, a part whose tensors do not fit
    (the first misfit tensor named), an encoder of another kind, or a VAE other than the base's (`vae_path`).
    A joint audio + video DiT starts from a video-only base: the video weights loaded, the audio stream new.
    """
    parts = read_parts(path, ema=ema, setting=setting)
    where = f"{setting}={path}"
    if parts.kind == "model" and set(parts.parts) == {"model"}:  # a lone model folder (save_pretrained of a DiT)
        parts = dataclasses.replace(parts, kind="dit", parts={"dit": parts.parts["model"]})
    if parts.kind != "dit":
        raise UserError(f"{where}: a '{parts.kind}' checkpoint or export; expected a DiT one to start from")
    if parts.adapters:
        raise UserError(f"{where}: holds adapters ({', '.join(parts.adapters)}) beside its weights; fold them in "
                        f"first (python -m vidgen.io.lora {path} OUT --merge) and start from OUT")
    _check_vae(parts, vae_path, where)
    loaded = {"dit": _load_part(dit, parts, "dit", where, "model.dit")}
    for name, entry in conditioner.entries.items():
        part = parts.parts.get(f"cond.{name}")
        if part is None:
            log.warning("%s has no cond.%s part: the %s encoder starts from the run's config", where, name, name)
            continue
        if entry.trainable and part.state is None:
            raise UserError(f"{where}: its {name} encoder is a frozen {part.cls} ({part.config.get('path')}), but "
                            f"the run trains a {class_path(entry.encoder)}; use the base's encoder (e.g. "
                            f"model/text=hf model.text.path={part.config.get('path')})")
        if entry.trainable:
            loaded[f"cond.{name}"] = _load_part(entry.encoder, parts, f"cond.{name}", where, f"model.{name}")
        elif part.state is not None:
            raise UserError(f"{where}: its {name} encoder is a trained {part.cls}, but the run's is frozen "
                            f"({entry.encoder_spec()['class']}); configure the base's encoder (e.g. model/{name}=byte)")
        elif part.cls != entry.encoder_spec()["class"]:
            raise UserError(f"{where}: its {name} encoder is a {part.cls}, the run's a "
                            f"{entry.encoder_spec()['class']}; configure the base's encoder")
    log.info("%s: started from %s (step %s, %s weights)", setting, parts.info.get("source"),
             parts.info.get("global_step"), "EMA" if parts.info.get("ema_used") else "trained")
    return {"path": str(Path(path).resolve()), "ema": bool(ema), "step": parts.info.get("global_step"),
            "parts": list(loaded), "fingerprints": {name: _fingerprint(m) for name, m in loaded.items()}}


def _fingerprint(model: nn.Module) -> str:
    """`fingerprint_module` of a Hydra-built model: its config as plain JSON values (Hydra passes ListConfig
    arguments), so it equals the fingerprint of the same part rebuilt from a checkpoint's recorded config."""
    config = model.config
    model.config = json.loads(json.dumps(config, default=lambda o: dict(o) if hasattr(o, "items") else list(o)))
    try:
        return fingerprint_module(model)
    finally:
        model.config = config


def _load_part(model: nn.Module, parts: ModelParts, name: str, where: str, settings: str) -> nn.Module:
    """`parts[name]`'s weights into `model` (strict); one line naming the first misfit tensor and config hints."""
    part: Part | None = parts.parts.get(name)
    if part is None or part.state is None:
        raise UserError(f"{where}: no '{name}' weights there (it holds {', '.join(parts.parts) or 'no parts'})")
    if part.cls != class_path(model):
        raise UserError(f"{where} [{name}]: a {part.cls}, but the run builds a {class_path(model)}")
    state = part.state
    stream = getattr(model, "audio_stream", None)
    if stream is not None and not any(k.startswith("audio_stream.") for k in state):
        # Sound added to a video model: every video weight from the base, the new audio stream as initialised
        # (its output head is zero, so the joint model starts as the base on video).
        log.info("%s [%s]: a video-only DiT; the audio stream starts fresh", where, name)
        state = {**state, **{f"audio_stream.{k}": v for k, v in stream.state_dict().items()}}
    try:
        return load_state(model, state, f"{where} [{name}]")
    except WeightsError as e:
        mine = getattr(model, "config", {})
        diffs = [f"{settings}.{k}={part.config[k]}" for k in sorted(part.config)
                 if k in mine and mine[k] != part.config[k] and k != "gradient_checkpointing"]
        hint = f"; the base was built with {' '.join(diffs)}" if diffs else ""
        raise UserError(f"{e}{hint}") from None


def _check_vae(parts: ModelParts, vae_path: str | None, where: str) -> None:
    """The run's VAE must be the one the base was trained with (else its latents mean something else)."""
    ref = parts.meta.get("vae") or {}
    if not ref.get("fingerprint") or vae_path is None or not Path(vae_path, WEIGHTS_NAME).is_file():
        return
    found = fingerprint_folder(vae_path)
    if found != ref["fingerprint"]:
        raise UserError(f"task.module.vae_path={vae_path}: VAE fingerprint {short(found)}, but the base at {where} "
                        f"was trained with {ref.get('path')} ({short(ref['fingerprint'])}); use that VAE (an export "
                        f"folder holds a copy in its vae/ subfolder)")


def check_same_base(saved: dict[str, Any] | None, mine: dict[str, Any] | None, ckpt: str = "the checkpoint") -> None:
    """Resuming an adapter run on another base would pair its adapters with weights they were not trained on."""
    saved_fp, my_fp = (saved or {}).get("fingerprints") or {}, (mine or {}).get("fingerprints") or {}
    for name, fp in saved_fp.items():
        if my_fp.get(name) != fp:
            raise UserError(f"task.module.init_from={(mine or {}).get('path')}: its {name} (fingerprint "
                            f"{short(my_fp.get(name))}) is not the base {ckpt} was trained from "
                            f"({(saved or {}).get('path')}, {short(fp)})")


# ---------------------------------------------------------------------------------------------- LoRA
def apply_lora(model: nn.Module, rank: int = 16, alpha: float | None = None, dropout: float = 0.0,
               targets: str = DEFAULT_TARGETS, setting: str = "task.module.lora") -> dict[str, Any]:
    """Add peft LoRA adapters (in place) to every `nn.Linear` of `model` whose name fully matches `targets`.

    Returns the spec checkpoints record: {"rank", "alpha", "dropout", "targets", "modules": [adapted names]}.
    `alpha` defaults to `rank` (scale 1). Only the new `lora_A` / `lora_B` weights are trainable afterwards.
    """
    try:
        from peft import LoraConfig, inject_adapter_in_model  # optional dependency: only LoRA runs need it
    except ImportError:
        raise UserError(f"{setting}: LoRA needs the peft package (pip install peft)") from None
    if int(rank) < 1:
        raise UserError(f"{setting}.rank={rank}: expected an integer >= 1")
    if not 0.0 <= float(dropout) < 1.0:
        raise UserError(f"{setting}.dropout={dropout}: expected a probability in [0, 1)")
    try:
        pattern = re.compile(targets)
    except (re.error, TypeError) as e:
        raise UserError(f"{setting}.targets={targets!r}: not a regular expression ({e})") from None
    matched = {n: m for n, m in model.named_modules() if n and pattern.fullmatch(n)}
    if not matched:
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise UserError(f"{setting}.targets={targets!r} matches no module (linear layers are named like "
                        f"{', '.join(linear[:3])})")
    other = [n for n, m in matched.items() if not isinstance(m, nn.Linear)]
    if other:
        raise UserError(f"{setting}.targets={targets!r} matches {other[0]} ({type(matched[other[0]]).__name__}); "
                        f"only linear layers take LoRA adapters here")
    spec = {"rank": int(rank), "alpha": float(alpha if alpha is not None else rank), "dropout": float(dropout),
            "targets": targets, "modules": sorted(matched)}
    config = LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], lora_dropout=spec["dropout"],
                        target_modules=spec["modules"], bias="none")
    inject_adapter_in_model(config, model, adapter_name=PEFT_NAME)
    freeze_all_but_adapters(model)
    return spec


def is_adapter(name: str) -> bool:
    """Whether a parameter / state-dict name is a LoRA adapter tensor."""
    return LORA_MARK in name


def freeze_all_but_adapters(module: nn.Module) -> list[str]:
    """requires_grad only on adapter tensors (so the optimizer and EMA see nothing else); their names."""
    trainable = []
    for name, p in module.named_parameters():
        p.requires_grad_(is_adapter(name))
        if is_adapter(name):
            trainable.append(name)
    return trainable


def adapter_state(model: nn.Module) -> dict[str, Any]:
    """The adapter tensors of a LoRA-wrapped model, named as in `model.state_dict()`."""
    return {k: v for k, v in model.state_dict().items() if is_adapter(k)}


def load_adapter(model: nn.Module, state: dict[str, Any], where: str) -> nn.Module:
    """Load adapter tensors (as `adapter_state` names them, e.g. `ModelParts.adapters["lora"]`) into a model that
    `apply_lora` wrapped with the same spec; one line when the names or shapes differ."""
    own = adapter_state(model)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shapes:
        first = (missing or unexpected or shapes)[0]
        raise UserError(f"{where}: the adapter does not fit the model ({len(missing)} missing, {len(unexpected)} "
                        f"unexpected, {len(shapes)} misshaped tensor(s), e.g. {first})")
    model.load_state_dict(state, strict=False)
    return model
