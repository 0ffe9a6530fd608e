"""Find shard files from a setting: a folder (with manifest.json), a .tar path, a glob, a brace pattern or a list.

Every failure names the setting (e.g. `data.train_shards`) and what was expected, in one line.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import webdataset as wds

from vidgen.errors import UserError

log = logging.getLogger(__name__)

EXPECTED = ("a shard folder (holding manifest.json and clips-*.tar), a .tar path, a glob, "
            "a brace pattern like clips-{000000..000009}.tar, or a list of these")


class DataConfigError(UserError):
    """A data setting that cannot work; the message names the setting and what was expected."""


@dataclass(frozen=True)
class ShardSet:
    """Shard paths plus the per-shard sample counts when a manifest gave them (None where unknown)."""

    urls: tuple[str, ...]
    counts: tuple[int | None, ...]

    @property
    def num_samples(self) -> int | None:
        """Total samples if every shard's count is known, else None."""
        return None if any(c is None for c in self.counts) else sum(self.counts)

    def split_last(self, n: int) -> tuple["ShardSet", "ShardSet"]:
        """(first len-n shards, last n shards)."""
        k = len(self.urls) - n
        return ShardSet(self.urls[:k], self.counts[:k]), ShardSet(self.urls[k:], self.counts[k:])


def read_manifest(folder: str | os.PathLike) -> dict:
    """Load `folder/manifest.json` -> dict (raises DataConfigError on a malformed file)."""
    path = Path(folder) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
        assert isinstance(manifest.get("shards"), list)
    except (OSError, ValueError, AssertionError) as e:
        raise DataConfigError(f"{path}: not a valid shard manifest ({e or 'no shards list'})") from e
    return manifest


def _from_folder(folder: Path, setting: str) -> tuple[list[str], list[int | None]]:
    if (folder / "manifest.json").is_file():
        shards = read_manifest(folder)["shards"]
        urls = [str(folder / s["name"]) for s in shards]
        missing = [u for u in urls if not os.path.isfile(u)]
        if missing:
            raise DataConfigError(f"{setting}={folder}: manifest.json lists {len(missing)} shard(s) that are "
                                  f"missing, e.g. {missing[0]} (re-run data_prep/make_shards.py)")
        return urls, [int(s["num_samples"]) if "num_samples" in s else None for s in shards]
    urls = sorted(str(p) for p in folder.glob("*.tar"))
    if urls:
        log.warning("%s=%s has no manifest.json: using its %d .tar files, sample counts unknown",
                    setting, folder, len(urls))
    return urls, [None] * len(urls)


def resolve_shards(spec: str | os.PathLike | Sequence | None, setting: str = "data.train_shards") -> ShardSet:
    """Expand a shard setting into shard paths (in order) -> ShardSet; raises DataConfigError naming `setting`."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        raise DataConfigError(f"{setting} is not set: expected {EXPECTED}")
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    urls: list[str] = []
    counts: list[int | None] = []
    for item in specs:
        item = os.path.expanduser(str(item))
        if os.path.isdir(item):
            u, c = _from_folder(Path(item), setting)
        elif any(ch in item for ch in "*?["):
            u = sorted(glob.glob(item))
            c = [None] * len(u)
        elif "{" in item and ".." in item:
            u = wds.shardlists.expand_urls(item)
            missing = [x for x in u if not os.path.isfile(x)]
            if missing:
                raise DataConfigError(f"{setting}={item!r}: {len(missing)} shard(s) missing, e.g. {missing[0]}")
            c = [None] * len(u)
        elif os.path.isfile(item):
            u, c = [item], [None]
        else:
            raise DataConfigError(f"{setting}={item!r}: no such folder or file; expected {EXPECTED}")
        if not u:
            raise DataConfigError(f"{setting}={item!r}: matches no shard; expected {EXPECTED}")
        urls += u
        counts += c
    return ShardSet(tuple(urls), tuple(counts))


def split_validation(train: ShardSet, val_split: int | float | None,
                     setting: str = "data.val_split") -> tuple[ShardSet, ShardSet | None]:
    """Hold out the last shards for validation: an int >= 1 = that many shards, a float in (0, 1) = that fraction."""
    if val_split in (None, 0):
        return train, None
    n_total = len(train.urls)
    if isinstance(val_split, float) and 0 < val_split < 1:
        n = max(1, math.floor(n_total * val_split))
    elif float(val_split).is_integer() and val_split >= 1:
        n = int(val_split)
    else:
        raise DataConfigError(f"{setting}={val_split!r}: expected a shard count >= 1 or a fraction in (0, 1)")
    if n >= n_total:
        raise DataConfigError(f"{setting}={val_split!r} holds out {n} of {n_total} shard(s): none left to train on")
    return train.split_last(n)


def resampled_epoch_batches(num_samples: int | None, batch_sizes, world_size: int, what: str) -> int:
    """Resampled epoch length per rank: num_samples // (mean per-bucket batch size * world_size), at least 1.

    `num_samples`: `data.samples_per_epoch` or the manifest's count; `what` names where counts were looked for.
    """
    if not num_samples:
        raise DataConfigError(f"data.samples_per_epoch is not set and {what}: resampled mode needs one of them "
                              "to size an epoch")
    sizes = list(batch_sizes)
    batch = max(1, round(sum(sizes) / len(sizes)))  # per-bucket sizes: their mean is the typical batch
    return max(1, int(num_samples) // (batch * world_size))
