"""The one checkpoint format and its one reader: any training checkpoint or export folder -> `ModelParts`.

A training checkpoint (Lightning `.ckpt`, an FSDP sharded folder or a DeepSpeed folder) carries, besides the
weights, `checkpoint["vidgen"]`, written by the training module and the recipe:

    {"format": 2, "kind": "dit" | "vae", "config": <resolved run config>,
     "parts": {NAME: {"class": import path, "config": constructor args, "prefix": "dit.", "trainable": bool}},
     "meta": {"flow": {...}, "vae": {"path", "fingerprint"}, "conditioner": {...}, "defaults": {...}}}

An export folder holds the same description in `vidgen.json` and one `config.json + model.safetensors`
subfolder per part (`vidgen.io.pretrained`); a VAE export is that pair alone. `read_parts(path)` turns any of
them into the same `ModelParts` (EMA weights overlaid when the checkpoint has them), `write_export(parts, out)`
writes the folder, and `python -m vidgen.io.checkpoint CKPT OUT` does both (consolidating sharded checkpoints).
Classes are rebuilt from the recorded import paths (vidgen classes only); every load is safetensors or
`torch.load(weights_only=True)`, and sharded folders are read by `vidgen.io.sharded` without unpickling.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from vidgen.errors import one_line_errors
from vidgen.conditioning import Conditioner
from vidgen.io.atomic import atomic_dir, atomic_write_text
from vidgen.io.fingerprint import fingerprint_folder, fingerprint_module, short
from vidgen.io.pretrained import (CONFIG_NAME, WEIGHTS_NAME, WeightsError, build_model, class_path, import_class,
                                  json_default, load_state, read_config, read_json,
                                  read_safetensors, save_pretrained)
from vidgen.io.sharded import read_deepspeed_folder, read_fsdp_folder

FORMAT = 2
EXPORT_META = "vidgen.json"
EMA_KEY = "EMA"  # the EMA callback's state key in checkpoint["callbacks"]


class CheckpointError(WeightsError):
    """A checkpoint that cannot be used as asked; the message names the path and what was expected."""


# ---------------------------------------------------------------------------------------------- raw reading
def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """A single-file checkpoint with `weights_only=True`; missing, truncated or pickled-code files are one line."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    if path.is_dir():
        raise CheckpointError(f"{path}: a folder; expected a .ckpt file (read folders with read_training_checkpoint)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path}: refused: it holds pickled objects that are not plain tensors/containers "
                              f"(torch.load weights_only=True rejected it; no code from it was run)") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt? {first})") from None


def checkpoint_layout(path: str | os.PathLike) -> str:
    """"file", "fsdp", "deepspeed", "export" (vidgen.json), "model" (config.json + weights) or "unknown"."""
    path = Path(path)
    if path.is_file():
        return "file"
    if (path / EXPORT_META).is_file():
        return "export"
    if (path / ".metadata").is_file():
        return "fsdp"
    if (path / "latest").is_file():
        return "deepspeed"
    if (path / CONFIG_NAME).is_file():
        return "model"
    return "unknown"


def read_training_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Any training checkpoint (file, FSDP folder, DeepSpeed folder) -> one dict in Lightning's single-file layout."""
    path = Path(path)
    layout = checkpoint_layout(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    if layout == "file":
        return load_checkpoint(path)
    if layout == "fsdp":
        return read_fsdp_folder(path)
    if layout == "deepspeed":
        return read_deepspeed_folder(path)
    raise CheckpointError(f"{path}: a folder that is neither an FSDP sharded checkpoint (.metadata) nor a DeepSpeed "
                          f"checkpoint (latest) nor an export folder ({EXPORT_META})")


def checkpoint_kind(ckpt: dict[str, Any]) -> str:
    """Which task wrote a training checkpoint dict ("dit", "vae", or "unknown")."""
    meta = ckpt.get("vidgen") or {}
    return str(meta.get("kind") or meta.get("task") or "unknown")


def ema_weights(ckpt: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The EMA shadow weights (module-level names) a checkpoint holds, or None."""
    state = (ckpt.get("callbacks") or {}).get(EMA_KEY)
    return state.get("shadow") if state else None


def overlay_ema(state: dict[str, torch.Tensor], ckpt: dict[str, Any]) -> bool:
    """Replace trained weights by their EMA shadows in place (buffers stay); True when any was replaced."""
    shadow = ema_weights(ckpt) or {}
    hits = {k: v for k, v in shadow.items() if k in state}
    state.update({k: v.to(state[k].dtype) for k, v in hits.items()})
    return bool(hits)


# ---------------------------------------------------------------------------------------------- parts
@dataclass
class Part:
    """One model of a checkpoint: its class import path, constructor config and weights (None: loads its own)."""

    cls: str
    config: dict[str, Any]
    state: dict[str, torch.Tensor] | None
    trainable: bool = True
    extra: dict[str, Any] = field(default_factory=dict)   # extra config.json keys (the VAE's latent statistics)

    def build(self, where: str = "") -> nn.Module:
        """The model with its weights (strict: one line naming missing / unexpected / misshaped keys)."""
        meta = {"class": self.cls, "config": self.config, **self.extra}
        model = build_model(meta, where or self.cls)
        if self.state is not None:
            load_state(model, self.state, where or self.cls)
        if hasattr(model, "after_load"):
            model.after_load(meta)
        return model


@dataclass
class ModelParts:
    """What any checkpoint or export folder holds: kind, named parts, the shared meta and provenance.

    kind: "dit" | "vae"; parts: {"dit", "text"} or {"vae"}; meta: {"flow", "vae", "conditioner", "defaults"};
    info: {"source", "ema_used", "global_step"}; adapters: optional adapter weights by name (e.g. LoRA).
    """

    kind: str
    parts: dict[str, Part]
    meta: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    adapters: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def conditioner(self) -> Conditioner:
        """The `Conditioner` recorded in `meta["conditioner"]`, each entry around its encoder part `cond.NAME`."""
        entries = {}
        for name, spec in (self.meta.get("conditioner") or {}).items():
            cls = import_class(spec.get("class"), f"{self.info.get('source')} [conditioner.{name}]")
            entries[name] = cls(self.build(f"cond.{name}"), dropout=float(spec.get("dropout", 0.0)))
        if not entries:
            raise CheckpointError(f"{self.info.get('source')}: no conditioner recorded")
        return Conditioner(**entries)

    def build(self, name: str) -> nn.Module:
        """The part `name` as a built model with its weights."""
        if name not in self.parts:
            raise CheckpointError(f"{self.info.get('source')}: a '{self.kind}' checkpoint without a '{name}' part")
        return self.parts[name].build(f"{self.info.get('source')} [{name}]")


def describe(kind: str, parts: dict[str, dict[str, Any]], meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `checkpoint["vidgen"]` entry a training module writes: kind + parts + shared meta (format 2).

    parts: {NAME: {"class", "config", "prefix", "trainable"}} (see `part_spec`).
    """
    return {"format": FORMAT, "kind": kind, "parts": parts, "meta": dict(meta or {})}


def part_spec(prefix: str, model: nn.Module | dict[str, Any], trainable: bool = True) -> dict[str, Any]:
    """One part's description: class import path, constructor config, state-dict prefix, whether it is saved."""
    if isinstance(model, nn.Module):
        model = {"class": class_path(model), "config": model.config}
    return {"class": model["class"], "config": _plain(model["config"]), "prefix": prefix, "trainable": trainable}


def _plain(value: Any) -> Any:
    """Containers -> plain dicts / lists (JSON-serialisable, `weights_only`-loadable)."""
    if isinstance(value, dict) or hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or (hasattr(value, "__iter__") and not isinstance(value, (str, bytes))):
        return [_plain(v) for v in value]
    return value


def _sub_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def parts_from_checkpoint(ckpt: dict[str, Any], source: str, ema: bool = True) -> ModelParts:
    """A training checkpoint dict -> `ModelParts` (EMA overlaid when asked and present)."""
    meta = ckpt.get("vidgen") or {}
    if "parts" not in meta:
        raise CheckpointError(f"{source}: no vidgen model description in the checkpoint (written by an older "
                              f"vidgen or another program; expected one written by train.py)")
    state = dict(ckpt.get("state_dict") or {})
    ema_used = overlay_ema(state, ckpt) if ema else False
    shared = dict(meta.get("meta") or {})
    base = _base_states(meta["parts"], shared.get("init_from"), source)  # adapter runs: weights from their base
    parts = {}
    for name, spec in meta["parts"].items():
        saved = spec.get("saved", spec.get("trainable", True))  # a frozen encoder's weights may travel too
        sub = base[name] if name in base else _sub_state(state, spec["prefix"]) if saved else None
        parts[name] = Part(spec["class"], spec["config"], sub, bool(spec.get("trainable", True)),
                           dict(spec.get("extra") or {}))
    info = {"source": source, "ema_used": ema_used, "global_step": ckpt.get("global_step")}
    adapters = dict(ckpt.get("adapters") or {})
    for name, spec in (shared.get("adapters") or {}).items():  # e.g. LoRA: the tensors under the adapted part
        adapters[name] = _sub_state(state, spec["prefix"])
    shared.setdefault("defaults", _default_shape(meta.get("config")))
    return ModelParts(checkpoint_kind(ckpt), parts, shared, info, adapters)


def _base_states(specs: dict[str, dict], init_from: dict | None, source: str) -> dict[str, dict[str, torch.Tensor]]:
    """Weights of the parts an adapter run left out of its checkpoint (`"base": true`): those of the checkpoint or
    export it started from (`meta.init_from`), refused in one line if they changed since (content fingerprints)."""
    names = [name for name, spec in specs.items() if spec.get("base")]
    if not names:
        return {}
    path = (init_from or {}).get("path")
    if not path:
        raise CheckpointError(f"{source}: parts {', '.join(names)} take their weights from the base the run started "
                              f"from, but the checkpoint records none (meta.init_from)")
    found = read_parts(path, ema=bool(init_from.get("ema", True)), setting=f"{source}: its base")
    states = {}
    for name in names:
        part = found.parts.get(name)
        if part is None or part.state is None:
            raise CheckpointError(f"{source}: its base {path} has no '{name}' weights")
        spec = specs[name]
        model = Part(spec["class"], spec["config"], part.state).build(f"{path} [{name}]")
        fingerprint, expected = fingerprint_module(model), (init_from.get("fingerprints") or {}).get(name)
        if fingerprint != expected:
            raise CheckpointError(f"{source}: its base {path} [{name}] changed since the adapters were trained on it "
                                  f"(fingerprint {short(fingerprint)}, trained on {short(expected)}); restore the base "
                                  f"they were trained on")
        states[name] = part.state
    return states


def _default_shape(run_config: dict | None) -> dict[str, int]:
    """{num_frames, height, width} of the first multi-frame training bucket of a run config ({} if unknown)."""
    buckets = ((run_config or {}).get("data") or {}).get("buckets") or []
    videos = [list(map(int, b)) for b in buckets if isinstance(b, (list, tuple)) and len(b) == 3 and int(b[0]) > 1]
    return dict(zip(("num_frames", "height", "width"), videos[0])) if videos else {}


def parts_from_export(folder: Path) -> ModelParts:
    """An export folder (vidgen.json + one folder per part) or a lone model folder -> `ModelParts`."""
    if not (folder / EXPORT_META).is_file():
        model = read_config(folder)
        kind = {".VideoVAE": "vae", ".AudioVAE": "audio_vae"}.get("." + model["class"].rsplit(".", 1)[-1], "model")
        extra = {k: v for k, v in model.items() if k not in ("class", "config")}
        part = Part(model["class"], model["config"], read_safetensors(folder / WEIGHTS_NAME), True, extra)
        return ModelParts(kind, {kind: part}, {}, {"source": str(folder.resolve()), **extra.get("exported_from", {})})
    meta = read_json(folder / EXPORT_META)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{folder}: export format {meta.get('format')!r}, this vidgen reads format {FORMAT}; "
                              f"re-export it from its checkpoint")
    parts = {}
    for name, spec in meta["parts"].items():
        sub = folder / spec["folder"]
        config = read_config(sub)
        weights = sub / WEIGHTS_NAME
        state = read_safetensors(weights) if weights.is_file() else None
        extra = {k: v for k, v in config.items() if k not in ("class", "config")}
        parts[name] = Part(config["class"], config["config"], state, bool(spec.get("trainable", True)), extra)
    adapters = {name: read_safetensors(folder / rel) for name, rel in (meta.get("adapters") or {}).items()}
    meta_ = dict(meta.get("meta") or {})
    for key in ("vae", "audio_vae"):  # a copy of the VAE (and of a joint model's audio VAE) travels with the export
        if (folder / key).is_dir():
            meta_[key] = {**(meta_.get(key) or {}), "path": str((folder / key).resolve())}
    info = {**(meta.get("info") or {}), "source": str(folder.resolve())}
    return ModelParts(meta["kind"], parts, meta_, info, adapters)


def read_parts(path: str | os.PathLike, ema: bool = True, kind: str | None = None,
               setting: str = "ckpt") -> ModelParts:
    """Any checkpoint (.ckpt, FSDP folder, DeepSpeed folder) or export folder -> `ModelParts` of `kind`."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{setting}={path}: no such checkpoint file or export folder")
    layout = checkpoint_layout(path)
    if layout in ("export", "model"):
        parts = parts_from_export(path)
    else:
        ckpt = read_training_checkpoint(path)
        if kind is not None and checkpoint_kind(ckpt) != kind:
            raise CheckpointError(f"{setting}={path}: a '{checkpoint_kind(ckpt)}' checkpoint, expected a '{kind}' "
                                  f"checkpoint or export folder")
        parts = parts_from_checkpoint(ckpt, str(path.resolve()), ema=ema)
    if kind is not None and parts.kind != kind:
        raise CheckpointError(f"{setting}={path}: a '{parts.kind}' checkpoint, expected a '{kind}' checkpoint or "
                              f"export folder")
    return parts


# ---------------------------------------------------------------------------------------------- writing
def check_vae_reference(ref: dict[str, Any], override: str | os.PathLike | None = None,
                        setting: str = "vae") -> Path:
    """The VAE folder a DiT was trained with (or `override`), refusing one whose content fingerprint differs."""
    folder = Path(override or (ref or {}).get("path") or "")
    if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{setting}={folder}: the VAE export recorded with the DiT is not there; pass "
                              f"{setting}=PATH to its export folder")
    expected, found = (ref or {}).get("fingerprint"), fingerprint_folder(folder)
    if expected and found != expected:
        raise CheckpointError(f"{setting}={folder}: VAE fingerprint {short(found)}, but the DiT was trained with "
                              f"{short(expected)} ({(ref or {}).get('path')}); pass {setting}=PATH to that VAE")
    return folder


def write_export(parts: ModelParts, out: str | os.PathLike, copy_vae: bool = True) -> Path:
    """Write `parts` as an export folder `out` (atomically: built beside it, then renamed into place)."""
    out = Path(out)
    if out.exists() and not (out / EXPORT_META).is_file() and not (out / CONFIG_NAME).is_file() \
            and any(out.iterdir()):
        raise CheckpointError(f"out={out}: exists and is not an export folder; choose an empty or new folder")
    with atomic_dir(out) as tmp:  # a killed export leaves `out` as it was (its temporary is cleaned up later)
        if parts.kind in ("vae", "audio_vae") and set(parts.parts) == {parts.kind}:  # a VAE export: the bare folder
            vae = parts.build(parts.kind)
            save_pretrained(vae, tmp, extra={k: v for k, v in parts.parts[parts.kind].extra.items()
                                             if k not in vae.export_extra()})
        else:
            _write_parts(parts, tmp, copy_vae)
    return out


def _write_parts(parts: ModelParts, tmp: Path, copy_vae: bool) -> None:
    specs = {}
    for name, part in parts.parts.items():
        if part.state is not None:
            model = part.build(f"{parts.info.get('source')} [{name}]")  # validates the weights before writing
            save_pretrained(model, tmp / name, extra=part.extra)
        else:  # a frozen encoder whose weights live in its own folder (never loaded here): class + config only
            import_class(part.cls, f"{parts.info.get('source')} [{name}]")
            (tmp / name).mkdir(parents=True)
            meta = {"class": part.cls, "config": part.config, **part.extra}
            atomic_write_text(tmp / name / CONFIG_NAME, json.dumps(meta, indent=2, default=json_default))
        specs[name] = {"folder": name, "trainable": part.trainable}
    adapters = {}
    for name, state in parts.adapters.items():
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / f"adapter_{name}.safetensors"))
        adapters[name] = f"adapter_{name}.safetensors"
    meta = dict(parts.meta)
    for key in ("vae", "audio_vae"):
        if parts.kind == "dit" and meta.get(key):
            vae = check_vae_reference(meta[key], setting=key)
            if copy_vae:
                shutil.copytree(vae, tmp / key)
    info = {k: v for k, v in parts.info.items() if k != "source"}
    info["exported_from"] = parts.info.get("source")
    atomic_write_text(tmp / EXPORT_META, json.dumps({"format": FORMAT, "kind": parts.kind, "parts": specs,
                                                     "adapters": adapters, "meta": meta, "info": info}, indent=2))


# ---------------------------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    """`python -m vidgen.io.checkpoint CKPT OUT`: any checkpoint (file, FSDP, DeepSpeed) -> an export folder."""
    p = argparse.ArgumentParser(description="Export any vidgen checkpoint (a .ckpt, an FSDP sharded folder or a "
                                            "DeepSpeed folder) to a self-describing export folder.")
    p.add_argument("ckpt", help="checkpoint file, FSDP sharded folder or DeepSpeed folder")
    p.add_argument("out", help="export folder to write")
    p.add_argument("--no-ema", dest="ema", action="store_false", help="export the trained, not the EMA weights")
    p.add_argument("--no-copy-vae", dest="copy_vae", action="store_false",
                   help="a DiT export references its VAE folder instead of holding a copy")
    args = p.parse_args(argv)
    parts = read_parts(args.ckpt, ema=args.ema)
    out = write_export(parts, args.out, copy_vae=args.copy_vae)
    print(f"exported {parts.kind} {args.ckpt} -> {out} ({'EMA' if parts.info.get('ema_used') else 'raw'} weights, "
          f"step {parts.info.get('global_step')})")
    return 0


if __name__ == "__main__":
    sys.exit(one_line_errors(main)())
