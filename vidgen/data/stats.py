"""Counts of samples the loader skipped (corrupt) or dropped (no bucket fits), and how they leave worker processes.

Each DataLoader worker keeps its own `WorkerCounts` for the current pass; every batch carries that worker's
running counts under `__stats__` (and a stats-only item ends each worker's pass). `ClipLoader` strips them in
the main process and folds them into a `LoaderStats`, so the counts are right for any `num_workers`.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch.utils.data

from vidgen.data.buckets import DROP_REASONS

log = logging.getLogger(__name__)

STATS_KEY = "__stats__"
# Sample drop reasons, plus `tar_error`: a shard that could not be opened or read to its end (an event, not
# a sample count; the samples it cut short are counted as `corrupt` when they arrive incomplete).
COUNTERS = DROP_REASONS + ("tar_error",)
_WARN_FIRST = 5  # per worker and pass: enough to diagnose a bad shard without flooding the log


def worker_id() -> int:
    """DataLoader worker index in this process (0 in the main process)."""
    info = torch.utils.data.get_worker_info()
    return 0 if info is None else info.id


class WorkerCounts:
    """Running per-reason counts inside one worker; also the webdataset exception handler (skip and count)."""

    def __init__(self):
        self.counts = dict.fromkeys(COUNTERS, 0)

    def reset(self) -> None:
        self.counts = dict.fromkeys(COUNTERS, 0)

    def add(self, reason: str, key: str = "", error: BaseException | str | None = None) -> None:
        """Count one dropped sample; corrupt ones are also logged (the first few per worker and pass)."""
        self.counts[reason] += 1
        if reason in ("corrupt", "tar_error"):
            n = self.counts[reason]
            if n <= _WARN_FIRST or n % 1000 == 0:
                log.warning("skipping corrupt sample %s (#%d in worker %d): %s", key or "<tar>", n, worker_id(), error)

    def handler(self, exn: BaseException) -> bool:
        """webdataset `handler=`: count a shard that fails to open or read as one `tar_error`, then continue.

        webdataset calls the handler twice for one truncated tar: at the member (args = (message,)) and again
        at the shard level, where it appends the shard url to the args; only the shard-level call is counted.
        """
        args = getattr(exn, "args", ())
        if len(args) >= 2 and isinstance(args[-1], str):
            self.add("tar_error", error=f"{type(exn).__name__}: {args[0]} ({args[-1]})")
        else:
            log.debug("tar member read error (the shard-level error follows): %s", exn)
        return True

    def snapshot(self) -> tuple[int, dict[str, int]]:
        """(worker id, a copy of the counts): what a batch carries out of the worker."""
        return worker_id(), dict(self.counts)


class LoaderStats:
    """Main-process totals: finished passes plus the latest running counts of each worker in the current pass."""

    def __init__(self):
        self._done: Counter = Counter()
        self._current: dict[int, dict[str, int]] = {}

    def start_pass(self) -> None:
        """Fold the pass that just ended into the totals (workers restart their counts each pass)."""
        for counts in self._current.values():
            self._done.update(counts)
        self._current = {}

    def update(self, snapshot: tuple[int, dict[str, int]]) -> None:
        worker, counts = snapshot
        self._current[int(worker)] = counts

    def totals(self) -> dict[str, int]:
        """{reason: count} since the loader was built, over all its workers."""
        total = Counter(self._done)
        for counts in self._current.values():
            total.update(counts)
        return {r: int(total.get(r, 0)) for r in COUNTERS}

    def metrics(self, prefix: str = "data/") -> dict[str, int]:
        """Metric names for logging: `data/skipped_corrupt`, `data/tar_errors` and `data/dropped_<reason>`."""
        totals = self.totals()
        out = {f"{prefix}skipped_corrupt": totals.pop("corrupt"), f"{prefix}tar_errors": totals.pop("tar_error")}
        out.update({f"{prefix}dropped_{r}": n for r, n in totals.items()})
        return out
