"""Preflight counts for data_prep/inspect_data.py: every sample from its json alone (fast), then a sample of the
clips decoded by the loader's own transform, since undecodable mp4 bytes are only found by decoding.
"""

from __future__ import annotations

import logging
import math
import tarfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from itertools import islice
from typing import Iterable, Iterator, Sequence

from vidgen.data.buckets import Bucket, BucketAssigner
from vidgen.data.pipeline import ClipTransform, PipelineState, SampleDrop, TarSamples, read_meta, video_fields
from vidgen.data.stats import WorkerCounts

log = logging.getLogger(__name__)

MEDIA_MEMBERS = ("mp4", "jpg", "jpeg", "png", "webp")


@dataclass
class MetadataReport:
    """Per-bucket sample counts, drop counts by reason, and empty captions (kept unless captions are required)."""

    buckets: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    empty_captions: int = 0
    tar_errors: int = 0

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
    """One sample's bucket from its json (the loader's own json rules), or the drop reason."""
    if not any(m in members for m in MEDIA_MEMBERS):
        return "corrupt"  # missing member
    try:
        meta = read_meta(members)
        if "mp4" in members:
            num_frames, width, height, fps = video_fields(meta)
        else:  # an image: one frame of the size make_shards recorded
            num_frames, width, height, fps = 1, int(meta["width"]), int(meta["height"]), 0.0
    except (SampleDrop, KeyError, TypeError, ValueError):
        return "corrupt"
    if not str(meta.get("caption") or "").strip():
        if require_caption:
            return "no_caption"
        report.empty_captions += 1
    plan = assigner.assign(num_frames, fps, width, height)
    return plan if isinstance(plan, str) else plan.bucket


@dataclass
class DecodeReport:
    """A sample of the shards run through the loader's transform (json + decoding): kept, drops by reason."""

    tried: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    tar_errors: int = 0

    @property
    def kept_fraction(self) -> float | None:
        return self.kept / self.tried if self.tried else None


def decode_check(urls: Sequence[str], assigner: BucketAssigner, *, max_samples: int = 64, decoder: str = "decord",
                 require_caption: bool = False) -> DecodeReport:
    """Decode up to `max_samples` samples spread over the shards (the first ones of evenly spaced shards), with
    the loader's own ClipTransform in validation mode (centred clip) -> DecodeReport."""
    report = DecodeReport()
    if not urls or max_samples < 1:
        return report
    visit = min(len(urls), max_samples)
    chosen = [urls[int(i * len(urls) / visit)] for i in range(visit)]
    per_shard = math.ceil(max_samples / visit)
    counts = WorkerCounts()
    transform = ClipTransform(assigner, counts, PipelineState(0), train=False, seed=0, decoder=decoder,
                              require_caption=require_caption)
    for url in chosen:
        for raw in islice(TarSamples(counts)(iter([dict(url=url)])), min(per_shard, max_samples - report.tried)):
            report.tried += 1
            report.kept += transform.process(raw) is not None
        if report.tried >= max_samples:
            break
    report.tar_errors = counts.counts.pop("tar_error")
    report.dropped.update({r: n for r, n in counts.counts.items() if n})
    report.examples = dict(counts.examples)
    return report
