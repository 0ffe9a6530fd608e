"""Self-describing weights: a folder with `config.json` (class + constructor arguments) + `model.safetensors`.

    save_pretrained(model, folder)            # any vidgen model (it records `model.config`)
    model = load_pretrained(folder)           # the class is rebuilt from the recorded import path
    vae = load_pretrained(folder, VideoVAE)   # ... and checked against the class the caller expects

Only classes under `vidgen.` are ever imported from a recorded path, and weights are safetensors: nothing in a
folder runs code.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from vidgen.errors import UserError
from vidgen.io.atomic import atomic_path, atomic_write_text

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ALLOWED_PREFIXES = ("vidgen.models.", "vidgen.conditioning.")


class WeightsError(UserError):
    """Weights or a folder that cannot be read as expected; the message names the file and what was expected."""


def class_path(obj: Any) -> str:
    """`module.QualName` of an object's class (or of a class). A class that a wrapper made on the fly (FSDP2's
    `fully_shard` turns a `DiT` into an `FSDPDiT(FSDPModule, DiT)`) records the wrapped vidgen class."""
    cls = obj if isinstance(obj, type) else type(obj)
    own = next((c for c in cls.__mro__ if c.__module__.startswith(ALLOWED_PREFIXES)), cls)
    return f"{own.__module__}.{own.__qualname__}"


def import_class(path: str, where: str = "") -> type:
    """The class at a recorded import path; only vidgen model / conditioning classes are imported."""
    if not isinstance(path, str) or not path.startswith(ALLOWED_PREFIXES):
        raise WeightsError(f"{where}: class {path!r} is not a vidgen model class (expected one of "
                           f"{', '.join(p + '*' for p in ALLOWED_PREFIXES)})")
    module, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise WeightsError(f"{where}: class {path!r} does not exist in this version of vidgen") from None
    return cls


def read_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a missing or damaged file is one clear line naming it."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: missing weights file")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None


def load_state(module: nn.Module, state: dict[str, torch.Tensor], where: str) -> nn.Module:
    """`module.load_state_dict(state, strict=True)` with one line naming missing / unexpected / misshaped keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if keys:
            example = keys[0] if label != "wrong shape" else \
                f"{keys[0]} {list(state[keys[0]].shape)} vs {list(own[keys[0]].shape)}"
            problems.append(f"{len(keys)} {label} key(s) (e.g. {example})")
    if problems:
        raise WeightsError(f"{where}: weights do not fit {class_path(module)}: {'; '.join(problems)}")
    module.load_state_dict(state, strict=True)
    return module


def save_pretrained(model: nn.Module, folder: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write `config.json` (class, config, the model's `export_extra()`, `extra`) and `model.safetensors`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = state_dict if state_dict is not None else model.state_dict()
    sd = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    with atomic_path(folder / WEIGHTS_NAME) as tmp:
        save_file(sd, str(tmp), metadata={"format": "pt"})
    write_config(folder, model, extra)
    return folder


def write_config(folder: str | os.PathLike, model: nn.Module, extra: dict[str, Any] | None = None) -> Path:
    """Write only `config.json` (a frozen model whose weights live elsewhere, e.g. a Hugging Face encoder)."""
    exported = model.export_extra() if hasattr(model, "export_extra") else {}
    meta = {"class": class_path(model), "config": model.config, **exported, **(extra or {})}
    path = Path(folder) / CONFIG_NAME
    atomic_write_text(path, json.dumps(meta, indent=2, default=json_default))
    return path


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON object from a file of a model folder (config.json, vidgen.json); one line when it is not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: expected a JSON object")
    return data


def read_config(folder: str | os.PathLike, expected: type | None = None) -> dict[str, Any]:
    """The whole `config.json` of an export folder, checked against `expected` when given."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise WeightsError(f"{folder}: not an export folder (expected {CONFIG_NAME} + {WEIGHTS_NAME})")
    meta = read_json(path)
    if "class" not in meta:
        raise WeightsError(f"{path}: no recorded model class (expected a vidgen export's config.json)")
    if expected is not None and meta["class"] != class_path(expected):
        raise WeightsError(f"{folder}: holds a {meta['class']!r}, expected a {class_path(expected)!r}")
    return meta


def build_model(meta: dict[str, Any], where: str, **overrides: Any) -> nn.Module:
    """A model from its recorded {"class", "config"} (no weights)."""
    cls = import_class(meta.get("class"), where)
    try:
        return cls(**{**meta.get("config", {}), **overrides})
    except TypeError as e:
        raise WeightsError(f"{where}: the recorded config does not fit {meta['class']} ({e})") from None


def load_pretrained(folder: str | os.PathLike, expected: type | None = None,
                    map_location: str | torch.device = "cpu", **overrides: Any) -> nn.Module:
    """Rebuild the model of `folder/config.json` and load `folder/model.safetensors` (strict)."""
    meta = read_config(folder, expected)
    model = build_model(meta, str(folder), **overrides)
    weights = Path(folder) / WEIGHTS_NAME
    if weights.is_file() or not getattr(model, "loads_own_weights", False):
        load_state(model, read_safetensors(weights, map_location), str(weights))
    if hasattr(model, "after_load"):
        model.after_load(meta)
    return model


def json_default(o: Any) -> Any:
    """`json.dumps(default=...)` for configs: tuples / sets as lists, tensors and arrays via `tolist()`."""
    if isinstance(o, (tuple, set)):
        return list(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")
