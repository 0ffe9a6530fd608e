"""Lightning's side of checkpoint files: atomic writes, safe loading (`vidgen.io.checkpoint`), the newest one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from vidgen.io.atomic import atomic_path, remove_stale_temporaries
from vidgen.io.checkpoint import load_checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that writes to a temporary file and renames it into place.

    A kill during `save_checkpoint` leaves the previous checkpoint file intact (no torn writes);
    loading uses `weights_only=True` so no pickled code runs from a checkpoint.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any = None,
                        weights_only: bool | None = True) -> dict[str, Any]:
        return load_checkpoint(path, map_location=map_location or "cpu")


def newest_checkpoint(*folders: str | os.PathLike) -> Path | None:
    """The most recently written checkpoint (`*.ckpt` file or sharded folder) in any of `folders`, or None.

    Temporary files of an interrupted atomic write start with "." and are never picked; the stale ones
    (their writer was killed) are deleted here, so a run starting with `resume=auto` cleans them up.
    """
    for folder in folders:
        remove_stale_temporaries(folder, suffix=".ckpt")
    found = [p for folder in map(Path, folders) if folder.is_dir()
             for p in folder.iterdir() if p.suffix == ".ckpt" and not p.name.startswith(".")]
    return max(found, key=lambda p: (p.stat().st_mtime_ns, p.name)) if found else None
