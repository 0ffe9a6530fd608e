"""Checkpoint files: atomic writes, safe loading, and finding the newest checkpoint to resume from."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from vidgen.io.atomic import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that writes to a temporary file and renames it into place.

    A kill during `save_checkpoint` leaves the previous checkpoint file intact (no torn writes);
    loading uses `weights_only=True` so no pickled code runs from a checkpoint.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any = None, weights_only: bool | None = True) -> dict[str, Any]:
        return load_checkpoint(path, map_location=map_location or "cpu")


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a Lightning checkpoint with `weights_only=True`; a clear error when the file is missing."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a sharded (FSDP / DeepSpeed) checkpoint folder; consolidate and export "
                                f"it with: python -m vidgen.training.consolidate {path} OUT")
    return torch.load(path, map_location=map_location, weights_only=True)


def newest_checkpoint(*folders: str | os.PathLike) -> Path | None:
    """The most recently written checkpoint (`*.ckpt` file or sharded folder) in any of `folders`, or None.

    Temporary files of an interrupted atomic write start with "." and are never picked.
    """
    found = [p for folder in map(Path, folders) if folder.is_dir()
             for p in folder.iterdir() if p.suffix == ".ckpt" and not p.name.startswith(".")]
    return max(found, key=lambda p: (p.stat().st_mtime_ns, p.name)) if found else None
