"""One command from any training checkpoint to a sampling/export folder: `python -m vidgen.training.consolidate CKPT OUT`.

CKPT may be a single-file checkpoint (single device, DDP), an FSDP sharded checkpoint folder
(`torch.distributed.checkpoint` files + Lightning's `meta.pt`) or a DeepSpeed ZeRO-2/3 folder. Sharded
checkpoints are first gathered into one ordinary checkpoint file (`OUT.ckpt`, written atomically; the
whole model must fit in CPU memory), then exported by the task that wrote it (`checkpoint["vidgen"]["task"]`):
a DiT with `export_dit`, a VAE with `export_vae` (EMA weights when the checkpoint has them).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from vidgen.io.atomic import atomic_path
from vidgen.training.checkpoint import load_checkpoint

META_FILE = "meta.pt"  # Lightning's FSDPStrategy: everything but weights and optimizer states


def is_fsdp_sharded(path: Path) -> bool:
    return path.is_dir() and (path / ".metadata").is_file()


def is_deepspeed(path: Path) -> bool:
    return path.is_dir() and (path / "latest").is_file()


def load_fsdp_sharded(folder: Path) -> dict[str, Any]:
    """FSDP sharded folder -> one checkpoint dict in Lightning's single-file layout (CPU tensors)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    sharded: dict[str, Any] = {}
    _load_state_dict(sharded, storage_reader=FileSystemReader(folder), planner=_EmptyStateDictLoadPlanner(),
                     no_dist=True)
    meta = folder / META_FILE
    checkpoint = torch.load(meta, map_location="cpu", weights_only=True) if meta.is_file() else {}
    checkpoint["state_dict"] = sharded.pop("model")
    optimizers = sorted(k for k in sharded if k.startswith("optimizer_"))
    checkpoint["optimizer_states"] = [sharded[k] for k in optimizers]
    return checkpoint


def load_deepspeed(folder: Path) -> dict[str, Any]:
    """DeepSpeed ZeRO folder -> one checkpoint dict (fp32 weights gathered by DeepSpeed's own converter)."""
    try:
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict
    except ImportError as e:  # pragma: no cover - needs the deepspeed extra
        raise RuntimeError(f"{folder}: a DeepSpeed checkpoint; install the extra: pip install -e .[deepspeed]") from e
    with atomic_path(folder.with_suffix(".fp32.ckpt")) as tmp:
        convert_zero_checkpoint_to_fp32_state_dict(str(folder), str(tmp))
        return torch.load(tmp, map_location="cpu", weights_only=False)  # written just now by DeepSpeed itself


def consolidate(path: str | Path) -> dict[str, Any]:
    """Any checkpoint (file, FSDP folder, DeepSpeed folder) -> a single-file checkpoint dict."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_file():
        return load_checkpoint(path)
    if is_fsdp_sharded(path):
        return load_fsdp_sharded(path)
    if is_deepspeed(path):
        return load_deepspeed(path)
    raise ValueError(f"{path}: a folder that is neither an FSDP sharded checkpoint (.metadata) "
                     f"nor a DeepSpeed checkpoint (latest)")


def consolidate_and_export(ckpt: str | Path, out: str | Path, ema: bool = True) -> Path:
    """Consolidate `ckpt` (if sharded) and export it to `out` with the exporter of its task; returns `out`."""
    ckpt, out = Path(ckpt), Path(out)
    single = ckpt
    if ckpt.is_dir():
        single = out.with_name(out.name + ".ckpt")
        state = consolidate(ckpt)
        with atomic_path(single) as tmp:
            torch.save(state, tmp)
    task = load_checkpoint(single).get("vidgen", {}).get("task")
    if task == "dit":
        from vidgen.training.export_dit import export_dit

        return export_dit(single, out, ema=ema)
    if task == "vae":
        from vidgen.training.export_vae import export_vae

        export_vae(single, out, use_ema=ema)
        return out
    raise ValueError(f"{ckpt}: no vidgen task recorded (expected a checkpoint written by train.py)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt", help="checkpoint file, FSDP sharded folder or DeepSpeed folder")
    p.add_argument("out", help="export folder to write")
    p.add_argument("--no-ema", dest="ema", action="store_false", help="export the trained, not the EMA weights")
    args = p.parse_args(argv)
    try:
        out = consolidate_and_export(args.ckpt, args.out, ema=args.ema)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"consolidate: error: {e}", file=sys.stderr)
        return 1
    print(f"exported {args.ckpt} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
