"""Export a DiT checkpoint to a self-describing folder for sampling: `python -m vidgen.training.export_dit CKPT OUT`.

OUT/
  vidgen.json        {"kind": "dit_export", "format": 1, "source", "global_step", "ema_used", "default_shape"}
  dit/               DiT config.json + model.safetensors (EMA weights by default)
  text_encoder/      config.json (class + constructor args) + model.safetensors when it was trained
                     (a frozen Hugging Face encoder is referenced by its folder path, not copied)
  flow.json          {"objective": "rectified_flow", "kwargs": RectifiedFlow arguments (shift settings included)}
  vae.json           {"path", "fingerprint"} of the VAE the DiT was trained with
  vae/               a copy of that VAE export (unless --no-copy-vae)

`sample.py ckpt=OUT` needs nothing else. The folder is written beside OUT and renamed into place, so an
interrupted export never leaves a half-written folder under OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from vidgen.io.atomic import atomic_write_text
from vidgen.models.dit import DiT
from vidgen.models.pretrained import CONFIG_NAME
from vidgen.sampling_pipeline import EXPORT_KIND, SamplingError, build_text_encoder, read_checkpoint, resolve_vae


def export_dit(ckpt: str | os.PathLike, out: str | os.PathLike, ema: bool = True, copy_vae: bool = True) -> Path:
    """Write the export folder `out` from the DiT Lightning checkpoint `ckpt`; returns `out`."""
    parts = read_checkpoint(ckpt, ema=ema)
    out = Path(out)
    if out.exists() and not (out / "vidgen.json").is_file() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not a DiT export folder; choose an empty or new folder")
    resolve_vae(parts.vae)  # refuse to export against a missing or changed VAE
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        dit = DiT(**parts.dit_config)
        dit.load_state_dict(parts.dit_state, strict=True)  # validates the weights before they are written
        dit.save_pretrained(tmp / "dit")
        if parts.text_state is not None:
            build_text_encoder(parts.text_spec, parts.text_state).save_pretrained(tmp / "text_encoder")
        else:  # frozen encoder: its own folder holds the weights; record the class and constructor arguments
            spec = {"class": parts.text_spec["class"], "config": parts.text_spec["config"]}
            atomic_write_text(tmp / "text_encoder" / CONFIG_NAME, json.dumps(spec, indent=2))
        atomic_write_text(tmp / "flow.json", json.dumps({"objective": "rectified_flow", "kwargs": parts.flow},
                                                        indent=2))
        atomic_write_text(tmp / "vae.json", json.dumps(parts.vae, indent=2))
        if copy_vae:
            shutil.copytree(parts.vae["path"], tmp / "vae")
        meta = {"kind": EXPORT_KIND, "format": 1, **parts.info}
        atomic_write_text(tmp / "vidgen.json", json.dumps(meta, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", help="DiT Lightning checkpoint (.ckpt)")
    parser.add_argument("out", help="export folder to write")
    parser.add_argument("--no-ema", dest="ema", action="store_false", help="export the trained, not the EMA weights")
    parser.add_argument("--no-copy-vae", dest="copy_vae", action="store_false",
                        help="reference the VAE folder (vae.json) instead of copying it into OUT/vae")
    args = parser.parse_args(argv)
    try:
        out = export_dit(args.ckpt, args.out, ema=args.ema, copy_vae=args.copy_vae)
    except (SamplingError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    meta = json.loads((out / "vidgen.json").read_text())
    print(f"exported {args.ckpt} -> {out} (EMA weights: {meta['ema_used']}, step {meta['global_step']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
