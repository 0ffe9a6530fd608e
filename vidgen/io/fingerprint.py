"""Fingerprints of frozen models, so latent shards can be matched to the VAE / text encoder that made them.

A fingerprint is `sha256:<hex>` over a canonical description of the model:

- export folders (`save_pretrained`: config.json + model.safetensors; VideoVAE, ByteTextEncoder) and built
  modules hash the same things: the class, the constructor config (canonical JSON), every tensor of the
  state dict (name, dtype, shape, raw bytes, in sorted name order) and the VAE's latent mean/std. `fingerprint_folder(dir) == fingerprint_module(Class.from_pretrained(dir))`, so the
  encoder side (which loads a folder) and a training run (which may hold the module) agree.
- Hugging Face folders (`fingerprint_hf_folder`) hash every regular file's bytes (weights, config, tokenizer):
  streamed, ~1 GB/s per core, so a UMT5-XXL folder costs ~10-20 s once per run.

The hash covers the weights, not the file layout: re-saving the same weights gives the same fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import safe_open

from vidgen.io.pretrained import CONFIG_NAME, WEIGHTS_NAME, json_default

_CHUNK = 1 << 22


def short(fingerprint: str | None, n: int = 12) -> str:
    """`sha256:abcdef...` -> `abcdef012345` for one-line messages."""
    return "none" if not fingerprint else fingerprint.split(":", 1)[-1][:n]


def _canonical(obj: Any) -> bytes:
    """JSON with sorted keys, tuples as lists, tensors/arrays as lists: equal configs give equal bytes."""
    # A round trip normalises tuples and OmegaConf-free containers before sorting keys.
    return json.dumps(json.loads(json.dumps(obj, default=json_default)), sort_keys=True,
                      separators=(",", ":")).encode()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    # view(uint8) works for every dtype (bf16 included, which numpy lacks).
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _hash_tensors(h: "hashlib._Hash", items: Iterable[tuple[str, torch.Tensor]]) -> None:
    for name, t in sorted(items, key=lambda kv: kv[0]):
        h.update(_canonical([name, str(t.dtype), list(t.shape)]))
        h.update(_tensor_bytes(t))


def _digest(cls_name: str, config: dict, extra: dict, tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    h.update(_canonical({"class": cls_name, "config": config, "extra": extra}))
    _hash_tensors(h, tensors)
    return f"sha256:{h.hexdigest()}"


# config.json keys that change what a loaded model computes: VideoVAE.after_load restores the latent statistics
# from them (over the buffers in the weights). Other extra keys (provenance, step counts) are not hashed.
_HASHED_EXTRA = ("latent_mean", "latent_std")


def _extra_of(meta: dict) -> dict:
    """The hashed extra keys of a config.json, as plain JSON."""
    return {k: meta[k] for k in _HASHED_EXTRA if k in meta}


def module_extra(module: torch.nn.Module) -> dict:
    """What `_extra_of` reads from the module's export (VideoVAE: latent mean/std), without writing anything."""
    return {k: getattr(module, k).tolist() for k in _HASHED_EXTRA if hasattr(module, k)}


def fingerprint_module(module: torch.nn.Module) -> str:
    """Fingerprint of a built `PretrainedMixin` model (class, config, extra keys, state dict) -> `sha256:<hex>`."""
    if not hasattr(module, "config"):
        raise TypeError(f"{type(module).__name__} has no `config`: only PretrainedMixin models can be fingerprinted")
    cls_name = f"{type(module).__module__}.{type(module).__qualname__}"
    return _digest(cls_name, module.config, module_extra(module), module.state_dict().items())


def fingerprint_folder(folder: str | os.PathLike) -> str:
    """Fingerprint of a `save_pretrained` export folder (config.json + model.safetensors) -> `sha256:<hex>`."""
    folder = Path(folder)
    config_path, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_path.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{folder}: not an export folder (expected {CONFIG_NAME} + {WEIGHTS_NAME})")
    meta = json.loads(config_path.read_text())
    with safe_open(str(weights), framework="pt", device="cpu") as f:
        tensors = [(k, f.get_tensor(k)) for k in f.keys()]
    return _digest(str(meta.get("class")), meta.get("config", {}), _extra_of(meta), tensors)


def fingerprint_hf_folder(folder: str | os.PathLike) -> str:
    """Fingerprint of a Hugging Face model folder: every regular file (relative path + bytes) -> `sha256:<hex>`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder")
    h = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.parts[-1:]))
    for p in files:
        h.update(_canonical([p.relative_to(folder).as_posix(), p.stat().st_size]))
        with open(p, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    return f"sha256:{h.hexdigest()}"


def fingerprint_path(folder: str | os.PathLike) -> str:
    """Fingerprint of a model folder: an export folder (config.json + model.safetensors) or a Hugging Face folder."""
    folder = Path(folder)
    if (folder / WEIGHTS_NAME).is_file() and _is_vidgen_export(folder / CONFIG_NAME):
        return fingerprint_folder(folder)
    return fingerprint_hf_folder(folder)


def _is_vidgen_export(config_path: Path) -> bool:
    try:
        return str(json.loads(config_path.read_text()).get("class", "")).startswith("vidgen.")
    except (OSError, ValueError):
        return False
