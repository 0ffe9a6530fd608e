"""Counts of samples the loader skipped (corrupt) or dropped (no bucket fits), and how they leave worker processes.

Each DataLoader worker keeps its own `WorkerCounts` for the current pass; every batch carries that worker's
running counts under `__stats__` (and a stats-only item ends each worker's pass). `ClipLoader` strips them in
the main process and folds them into a `LoaderStats`, so the counts are right for any `num_workers`.

For an endless (resampled) stream the worker also watches for starvation: when every shard, or `starve_after`
shard draws, have been read and processed and not one sample was kept this pass, it raises DataStarvedError;
the batcher turns that into a `__starved__` item, so the main process raises it as one line (no worker traceback).
"""

from __future__ import annotations

import logging
from collections import Counter

import torch.utils.data

from vidgen.data.buckets import DROP_REASONS
from vidgen.data.starvation import DataStarvedError, StarveContext, one_line, starved_message

log = logging.getLogger(__name__)

STATS_KEY = "__stats__"
STARVED_KEY = "__starved__"
DRAW_KEY = "__draw__"  # set on each raw sample: which shard draw of this worker's pass it came from
# Sample drop reasons, plus `tar_error`: a shard that could not be opened or read to its end (an event, not
# a sample count; the samples it cut short are counted as `corrupt` when they arrive incomplete).
COUNTERS = DROP_REASONS + ("tar_error",)
_WARN_FIRST = 5  # per reason, worker and pass: enough to diagnose a bad shard without flooding the log


def worker_id() -> int:
    """DataLoader worker index in this process (0 in the main process)."""
    info = torch.utils.data.get_worker_info()
    return 0 if info is None else info.id


class WorkerCounts:
    """Per-pass counts inside one worker (drops by reason with a first example, samples kept, shards read);
    also the webdataset exception handler and, with `watch`, the resampled-stream starvation guard.

    watch: guard this (endless) stream: give up when `num_shards` distinct shards, or `starve_after` shard draws
    (None: no limit), have been read and processed and no sample was kept this pass;
    context: names the setting and folder in the error.
    """

    def __init__(self, watch: bool = False, starve_after: int | None = None, num_shards: int = 0,
                 context: StarveContext | None = None):
        self.watch, self.starve_after, self.num_shards, self.context = watch, starve_after, num_shards, context
        self.reset()

    def reset(self) -> None:
        """Start a pass: zero every counter."""
        self.counts = dict.fromkeys(COUNTERS, 0)
        self.examples: dict[str, str] = {}
        self.kept = 0
        self.shards = 0
        self._open: dict[int, list] = {}  # draw -> [url, samples read, samples processed, read finished]
        self._done_draws = 0
        self._done_urls: set[str] = set()

    def add(self, reason: str, key: str = "", error: BaseException | str | None = None) -> None:
        """Count one dropped sample (or, for `tar_error`, one unreadable shard); log the first few of a reason."""
        self.counts[reason] += 1
        n = self.counts[reason]
        if reason not in self.examples:
            self.examples[reason] = one_line(f"{key or '<shard>'}: {error}" if error else key or "<shard>")
        if reason in ("corrupt", "tar_error") and (n <= _WARN_FIRST or n % 1000 == 0):
            what = "unreadable shard" if reason == "tar_error" else f"corrupt sample {key}"
            log.warning("skipping %s (#%d in worker %d): %s", what, n, worker_id(), one_line(error, 300))

    def handler(self, exn: BaseException) -> bool:
        """webdataset `handler=`: count a shard that fails to open or read as one `tar_error`, then continue.

        webdataset calls the handler twice for one truncated tar: at the member (args = (message,)) and again
        at the shard level, where it appends the shard url to the args; only the shard-level call is counted.
        """
        args = getattr(exn, "args", ())
        if len(args) >= 2 and isinstance(args[-1], str):
            self.add("tar_error", args[-1].rsplit("/", 1)[-1], f"{type(exn).__name__}: {args[0]}")
        else:
            log.debug("tar member read error (the shard-level error follows): %s", exn)
        return True

    # ---- shard draws: the starvation guard -------------------------------------------------------------------
    def start_shard(self, url: str) -> int:
        """A shard is about to be read -> its draw id (tag its samples with it)."""
        self.shards += 1
        self._open[self.shards] = [url, 0, 0, False]
        return self.shards

    def read_sample(self, draw: int) -> None:
        """One raw sample of `draw` left the tar reader."""
        self._open[draw][1] += 1

    def end_shard(self, draw: int) -> None:
        """The tar of `draw` is read to its end (or to its error)."""
        self._open[draw][3] = True
        self._settle(draw)

    def sample_done(self, draw: int | None, kept: bool) -> None:
        """A raw sample was decoded and kept, or dropped (already counted by reason)."""
        if kept:
            self.kept += 1
        if draw in self._open:
            self._open[draw][2] += 1
            self._settle(draw)

    def _settle(self, draw: int) -> None:
        url, read, processed, finished = self._open[draw]
        if not finished or processed < read:
            return  # some of its samples still wait in the shuffle buffer
        del self._open[draw]
        self._done_draws += 1
        self._done_urls.add(url)
        if not self.watch or self.kept:
            return
        all_tried = len(self._done_urls) >= self.num_shards
        if all_tried or (self.starve_after is not None and self._done_draws >= self.starve_after):
            covered = "all" if all_tried else f"{len(self._done_urls)} of"
            scope = (f"{self.shards} resampled shard draw(s) in worker {worker_id()}, covering {covered} "
                     f"{self.num_shards} shard(s)")
            ctx = self.context or StarveContext("data", "?")
            raise DataStarvedError(starved_message(ctx, self.counts, self.examples, kept=0, scope=scope,
                                                   all_tried=all_tried))

    def snapshot(self) -> tuple[int, dict]:
        """(worker id, a copy of this pass's counts): what a batch carries out of the worker."""
        return worker_id(), {"counts": dict(self.counts), "examples": dict(self.examples), "kept": self.kept,
                             "shards": self.shards}


class LoaderStats:
    """Main-process totals: finished passes plus the latest running counts of each worker in the current pass."""

    def __init__(self):
        self._done: Counter = Counter()
        self._current: dict[int, dict] = {}

    def start_pass(self) -> None:
        """Fold the pass that just ended into the totals (workers restart their counts each pass)."""
        for snap in self._current.values():
            self._done.update(snap["counts"])
        self._current = {}

    def update(self, snapshot: tuple[int, dict]) -> None:
        worker, snap = snapshot
        self._current[int(worker)] = snap

    def current(self) -> dict:
        """This pass over all workers: {"counts": {reason: n}, "examples": {reason: str}, "kept", "shards"}."""
        counts: Counter = Counter()
        examples: dict[str, str] = {}
        for snap in self._current.values():
            counts.update(snap["counts"])
            for reason, text in snap["examples"].items():
                examples.setdefault(reason, text)
        return {"counts": {r: int(counts.get(r, 0)) for r in COUNTERS}, "examples": examples,
                "kept": sum(s["kept"] for s in self._current.values()),
                "shards": sum(s["shards"] for s in self._current.values())}

    def totals(self) -> dict[str, int]:
        """{reason: count} since the loader was built, over all its workers."""
        total = Counter(self._done)
        for snap in self._current.values():
            total.update(snap["counts"])
        return {r: int(total.get(r, 0)) for r in COUNTERS}

    def metrics(self, prefix: str = "data/") -> dict[str, int]:
        """Metric names for logging: `data/skipped_corrupt`, `data/tar_errors` and `data/dropped_<reason>`."""
        totals = self.totals()
        out = {f"{prefix}skipped_corrupt": totals.pop("corrupt"), f"{prefix}tar_errors": totals.pop("tar_error")}
        out.update({f"{prefix}dropped_{r}": n for r, n in totals.items()})
        return out
