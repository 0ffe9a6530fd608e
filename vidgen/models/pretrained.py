"""Self-describing weights: a folder with `config.json` (constructor arguments) + `model.safetensors`.

Every model class records its constructor arguments in `self.config`; `save_pretrained(dir)`
writes them beside the weights and `from_pretrained(dir)` rebuilds the model from that folder
alone (safetensors: no pickled code is ever loaded).
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vidgen.io.atomic import atomic_path, atomic_write_text

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def capture_config(cls: type, frame_locals: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments of `cls` taken from `locals()` inside its `__init__`."""
    params = inspect.signature(cls.__init__).parameters
    return {k: frame_locals[k] for k in params if k != "self" and k in frame_locals}


class PretrainedMixin:
    """Adds `save_pretrained` / `from_pretrained` to an `nn.Module` that sets `self.config`."""

    config: dict[str, Any]

    def save_pretrained(self, folder: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None,
                        extra: dict[str, Any] | None = None) -> Path:
        """Write `config.json` (+ `extra` keys, e.g. latent statistics) and `model.safetensors` atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        sd = state_dict if state_dict is not None else self.state_dict()  # type: ignore[attr-defined]
        sd = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
        with atomic_path(folder / WEIGHTS_NAME) as tmp:
            save_file(sd, str(tmp), metadata={"format": "pt"})
        meta = {"class": f"{type(self).__module__}.{type(self).__qualname__}", "config": self.config, **(extra or {})}
        atomic_write_text(folder / CONFIG_NAME, json.dumps(meta, indent=2, default=_json_default))
        return folder

    @classmethod
    def read_config(cls, folder: str | os.PathLike) -> dict[str, Any]:
        """The whole `config.json` of an export folder, with a clear error when it is not one."""
        path = Path(folder) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{folder}: not an export folder (expected {CONFIG_NAME} + {WEIGHTS_NAME})")
        meta = json.loads(path.read_text())
        expected = f"{cls.__module__}.{cls.__qualname__}"
        if meta.get("class") != expected:
            raise ValueError(f"{folder}: holds a {meta.get('class')!r}, expected a {expected!r}")
        return meta

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, map_location: str | torch.device = "cpu", **overrides: Any):
        """Rebuild the model from `folder/config.json` and load `folder/model.safetensors` (strict)."""
        meta = cls.read_config(folder)
        model = cls(**{**meta["config"], **overrides})
        weights = Path(folder) / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"{folder}: missing {WEIGHTS_NAME}")
        model.load_state_dict(load_file(str(weights), device=str(map_location)), strict=True)  # type: ignore[attr-defined]
        model.after_load(meta)
        return model

    def after_load(self, meta: dict[str, Any]) -> None:
        """Hook for subclasses: restore extra keys of `config.json` (e.g. latent statistics)."""


def _json_default(o: Any) -> Any:
    if isinstance(o, (tuple, set)):
        return list(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")
