"""Find media files in an input folder and resolve their captions (sidecar .txt/.json or a CSV/JSONL manifest).

Paths inside the input folder are handled as POSIX strings relative to it (e.g. "trips/day1.mp4"),
so the same folder gives the same keys and captions on any machine.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from vidgen.io.video import IMAGE_EXTS, VIDEO_EXTS

MEDIA_EXTS = VIDEO_EXTS + IMAGE_EXTS


def is_image(path: str | os.PathLike) -> bool:
    """True when the file extension is an image type (an image becomes a 1-frame clip)."""
    return Path(path).suffix.lower() in IMAGE_EXTS


def find_media(root: str | os.PathLike) -> list[str]:
    """Recursively list video and image files under `root` -> sorted POSIX paths relative to `root`.

    Hidden files and folders (name starting with ".") are skipped: they hold editor backups,
    macOS resource forks ("._x.mp4") and our own work caches, never user media.
    """
    root = Path(root)
    found, seen = [], {os.path.realpath(root)}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        # Symlinked folders are followed (datasets are often assembled from links), each real folder once:
        # a link back to an ancestor would otherwise recurse forever.
        keep = []
        for d in sorted(dirnames):
            real = os.path.realpath(os.path.join(dirpath, d))
            if not d.startswith(".") and real not in seen:
                seen.add(real)
                keep.append(d)
        dirnames[:] = keep
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in MEDIA_EXTS:
                found.append((Path(dirpath) / name).relative_to(root).as_posix())
    return sorted(found)


def load_caption_manifest(path: str | os.PathLike) -> dict[str, str]:
    """Read a captions manifest (CSV with columns file,caption or JSONL of {"file", "caption"}) -> {file: caption}.

    `file` is relative to the input folder; it is normalised to a POSIX path without a leading "./".
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions file not found: {path}")
    rows: list[dict] = []
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    elif path.suffix.lower() in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
    else:
        raise ValueError(f"captions file {path} must be .csv, .tsv or .jsonl")
    captions = {}
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict) or "file" not in row or "caption" not in row:
            raise ValueError(f"{path}: row {i} needs the fields 'file' and 'caption', got {row!r}")
        captions[normalise_rel(row["file"])] = str(row["caption"] or "").strip()
    return captions


def normalise_rel(rel: str) -> str:
    """Normalise a relative media path from a manifest: POSIX separators, no leading './'."""
    return Path(str(rel).strip().replace("\\", "/")).as_posix().removeprefix("./")


def sidecar_caption(media: str | os.PathLike) -> str | None:
    """Caption from `NAME.json` ({"caption": ...}) or `NAME.txt` beside the media file, else None."""
    media = Path(media)
    js = media.with_suffix(".json")
    if js.is_file():
        try:
            data = json.loads(js.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"caption sidecar {js} is not valid JSON: {e}") from None
        if isinstance(data, dict) and data.get("caption") is not None:
            return str(data["caption"]).strip()
    txt = media.with_suffix(".txt")
    if txt.is_file():
        return txt.read_text(encoding="utf-8").strip()
    return None


def resolve_captions(root: str | os.PathLike, rel_paths: list[str],
                     manifest: dict[str, str] | None = None) -> dict[str, str]:
    """Caption per media file -> {rel: caption}; "" where none is found.

    Precedence: the explicit manifest (the user chose it for this run), then NAME.json, then NAME.txt.
    """
    manifest = manifest or {}
    root = Path(root)
    out = {}
    for rel in rel_paths:
        caption = manifest.get(rel)
        if caption is None:
            caption = sidecar_caption(root / rel)
        out[rel] = caption or ""
    return out
