"""Preflight counts from shard metadata only (json members; no video decoding): samples per bucket, drops by reason.

Used by data_prep/inspect_data.py. Undecodable mp4 bytes are only found by decoding; the loader counts those.
"""

from __future__ import annotations

import json
import logging
import tarfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from vidgen.data.buckets import Bucket, BucketAssigner

log = logging.getLogger(__name__)

MEDIA_MEMBERS = ("mp4", "jpg", "jpeg", "png", "webp")


@dataclass
class MetadataReport:
    """Per-bucket sample counts, drop counts by reason, and empty captions (kept unless captions are required)."""

    buckets: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    empty_captions: int = 0
    tar_errors: int = 0
    shards: int = 0

    @property
    def kept(self) -> int:
        return sum(self.buckets.values())

    @property
    def total(self) -> int:
        return self.kept + sum(self.dropped.values())


def iter_shard_members(url: str) -> Iterator[tuple[str, dict[str, bytes | None]]]:
    """(key, {ext: json bytes, or None for media}) per sample of a tar, reading only the json members' data.

    Opening the tar in random-access mode lets tarfile seek past the mp4 data instead of reading it.
    """
    members: dict[str, dict[str, bytes | None]] = defaultdict(dict)
    with tarfile.open(url, mode="r:") as tar:
        for info in tar:
            if not info.isreg() or "." not in info.name:
                continue
            key, ext = info.name.split(".", 1)
            data = tar.extractfile(info).read() if ext == "json" else None
            members[key][ext.lower()] = data
    yield from members.items()


def scan_metadata(urls: Iterable[str], assigner: BucketAssigner, require_caption: bool = False) -> MetadataReport:
    """Assign every sample of the shards to a bucket from its json alone -> MetadataReport."""
    report = MetadataReport()
    for url in urls:
        report.shards += 1
        try:
            samples = list(iter_shard_members(url))
        except (OSError, tarfile.TarError) as e:
            log.warning("cannot read shard %s: %s", url, e)
            report.tar_errors += 1
            continue
        for key, members in samples:
            outcome = _classify(members, assigner, require_caption, report)
            if isinstance(outcome, Bucket):
                report.buckets[outcome] += 1
            else:
                report.dropped[outcome] += 1
    return report


def _classify(members: dict, assigner: BucketAssigner, require_caption: bool, report: MetadataReport) -> Bucket | str:
    if members.get("json") is None or not any(m in members for m in MEDIA_MEMBERS):
        return "corrupt"  # missing member
    try:
        meta = json.loads(members["json"])
        num_frames = int(meta["num_frames"]) if "mp4" in members else 1
        plan = assigner.assign(num_frames, float(meta.get("fps") or 0.0), int(meta["width"]), int(meta["height"]))
    except (ValueError, KeyError, TypeError):
        return "corrupt"
    if not str(meta.get("caption") or "").strip():
        if require_caption:
            return "no_caption"
        report.empty_captions += 1
    return plan if isinstance(plan, str) else plan.bucket
