"""Latent shard format (Lightning-free, for data_prep/encode_latents.py and the loader): samples, manifest, checks.

Shard folder: `latents-r{rank:02d}-{index:06d}.tar` + `manifest.json` + `null_text.safetensors` (when text was
encoded). Each sample is `KEY.latent.safetensors` (safetensors: no pickle) holding
    mean    [C, t, h, w]  posterior mean of the VAE latent, already normalised by the VAE's latent mean/std
    logvar  [C, t, h, w]  posterior log-variance in the same (normalised) space
    text_emb [L, D], text_mask [L] bool   (only when a text encoder was used; L = this caption's tokens)
and `KEY.json` = {"key", "caption", "fps", "bucket": [T, H, W], "latent_shape", "source_shard", "clip": {...}}.
The manifest records the fingerprints (vidgen.io.fingerprint) of the VAE and text encoder that made the shards;
`check_fingerprints` compares them with a run's models.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load as st_load, save as st_save

from vidgen.data.shards import DataConfigError
from vidgen.io.atomic import atomic_write_bytes
from vidgen.io.fingerprint import fingerprint_path, short

FORMAT_VERSION = 1
LATENT_MEMBER = "latent.safetensors"
MANIFEST_NAME = "manifest.json"
NULL_TEXT_NAME = "null_text.safetensors"
SHARD_PATTERN = "latents-r{rank:02d}-{index:06d}.tar"


# ---- the sample format ----------------------------------------------------------------------------------------
def pack_sample(key: str, tensors: Mapping[str, torch.Tensor], meta: Mapping) -> dict:
    """One latent sample -> a webdataset item {"__key__", "latent.safetensors": bytes, "json": bytes}."""
    blob = st_save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})
    return {"__key__": key, LATENT_MEMBER: blob, "json": json.dumps(dict(meta), sort_keys=True).encode()}


def unpack_sample(raw: Mapping) -> tuple[dict[str, torch.Tensor], dict]:
    """A raw tar sample -> (tensors {"mean", "logvar", ["text_emb", "text_mask"]}, json dict); raises ValueError."""
    if LATENT_MEMBER not in raw or "json" not in raw:
        raise ValueError(f"missing member (has {sorted(k for k in raw if not k.startswith('__'))})")
    tensors = st_load(raw[LATENT_MEMBER])
    if "mean" not in tensors or "logvar" not in tensors or tensors["mean"].shape != tensors["logvar"].shape:
        raise ValueError("latent.safetensors lacks mean/logvar of one shape")
    meta = json.loads(raw["json"])
    if not isinstance(meta, dict):
        raise ValueError("json is not an object")
    return tensors, meta


def save_null_text(path: str | os.PathLike, emb: torch.Tensor, mask: torch.Tensor) -> None:
    """Write the "" caption's embedding emb [L0, D] + mask [L0] (for CFG dropout) atomically."""
    atomic_write_bytes(path, st_save({"text_emb": emb.detach().cpu().contiguous(),
                                      "text_mask": mask.detach().cpu().bool().contiguous()}))


def load_null_text(folder: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The null-caption embedding of a latent folder -> (emb [L0, D] float32, mask [L0] bool), or None."""
    path = Path(folder) / NULL_TEXT_NAME
    if not path.is_file():
        return None
    t = st_load(path.read_bytes())
    return t["text_emb"].float(), t["text_mask"].bool()


def read_latent_manifest(folder: str | os.PathLike, setting: str = "data.shards") -> dict:
    """`folder/manifest.json` of a latent shard folder -> dict; raises DataConfigError naming `setting`."""
    path = Path(folder) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataConfigError(f"{setting}: {path} is missing or unreadable ({e}); latent shards need the "
                              "manifest.json written by data_prep/encode_latents.py") from e
    if "vae" not in manifest or "shards" not in manifest:
        raise DataConfigError(f"{setting}: {path} is not a latent manifest (a clip-shard folder? run "
                              "data_prep/encode_latents.py on it first)")
    if manifest.get("format", FORMAT_VERSION) != FORMAT_VERSION:
        raise DataConfigError(f"{setting}: {path} has latent format {manifest['format']}, this vidgen reads format "
                              f"{FORMAT_VERSION}; re-run data_prep/encode_latents.py with this version")
    return manifest


# ---- fingerprint check ----------------------------------------------------------------------------------------
def check_fingerprints(manifests: Mapping[str, dict], expected_vae: str | None,
                       expected_text_encoder: str | None = None, setting: str = "data.shards") -> None:
    """Stop with one line when the latents were made by another VAE (or text encoder) than the run's.

    manifests: {folder: manifest}; expected_vae / expected_text_encoder: the run's model folders (None: skip).
    """
    vae_fps = {m["vae"]["fingerprint"] for m in manifests.values()}
    if len(vae_fps) > 1:
        raise DataConfigError(f"{setting}: folders {sorted(manifests)} were made by different VAEs "
                              f"({', '.join(short(f) for f in sorted(vae_fps))}); use latents of one VAE")
    made = next(iter(manifests.values()))
    if expected_vae is not None:
        want = fingerprint_path(expected_vae)
        if want not in vae_fps:
            raise DataConfigError(
                f"{setting}={','.join(manifests)}: latents were made by VAE {short(made['vae']['fingerprint'])} "
                f"({made['vae'].get('path')}) but data.expected_vae={expected_vae} is {short(want)}; "
                f"re-run data_prep/encode_latents.py --vae {expected_vae}")
    if expected_text_encoder is not None:
        text = [m.get("text_encoder") for m in manifests.values()]
        if any(t is None for t in text):
            raise DataConfigError(f"{setting}: latents hold no text embeddings (encoded with --text-encoder none) "
                                  f"but data.expected_text_encoder={expected_text_encoder} is set")
        want = fingerprint_path(expected_text_encoder)
        have = {t["fingerprint"] for t in text}
        if have != {want}:
            raise DataConfigError(
                f"{setting}={','.join(manifests)}: text embeddings were made by text encoder "
                f"{', '.join(short(f) for f in sorted(have))} ({text[0].get('path')}) but "
                f"data.expected_text_encoder={expected_text_encoder} is {short(want)}; re-run "
                f"data_prep/encode_latents.py with that --text-encoder")
