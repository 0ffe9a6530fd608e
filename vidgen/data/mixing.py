"""Weighted mixing of several shard sets: a style set with its trigger word beside prior-preservation sets.

    data.sources=[{shards: /shards/mystyle, weight: 3, trigger: sks}, {shards: /shards/general, weight: 1}]

Every raw sample is a draw: a source is picked with probability weight / sum(weights), then its next sample is
taken. Each source is an endless stream (its shards drawn at random, as `data.resampled=true`, then its own
shuffle buffer), so a 20-clip style set repeats as often as its weight asks beside a 10k-clip regularisation
set; an epoch is `data.samples_per_epoch` samples (default: the sources' sample counts added up). A source's
`trigger` word goes in front of its captions (`vidgen.data.pipeline.with_trigger`); a source without one keeps
its captions. Every choice is seeded by (seed, epoch, rank, worker, source), so a resumed run re-reads exactly
the batches it skips (`vidgen.data.position`).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from vidgen.data.pipeline import PipelineState, SampleShuffle, ShardSource, TagTrigger, TarSamples, node_info
from vidgen.data.shards import DataConfigError, ShardSet, resolve_shards
from vidgen.data.starvation import DataStarvedError
from vidgen.data.stats import WorkerCounts, worker_id

SOURCE_KEYS = ("shards", "weight", "trigger")


@dataclass(frozen=True)
class Source:
    """One shard set of a mixture: its shards, its draw weight and the trigger word of its captions (or None)."""

    name: str            # the setting that names it, e.g. data.sources[0]
    shards: ShardSet
    weight: float
    trigger: str | None = None


def check_trigger(trigger, setting: str) -> str | None:
    """A trigger word setting -> the word (None when unset); one line when it is not a non-empty string."""
    if trigger is None:
        return None
    if not isinstance(trigger, str) or not trigger.strip():
        raise DataConfigError(f"{setting}={trigger!r}: expected a non-empty word (e.g. sks) or null")
    return trigger.strip()


def parse_sources(spec, setting: str = "data.sources") -> tuple[Source, ...]:
    """`[{shards, weight, trigger}, ...]` -> Sources with resolved shards; one line naming the faulty entry."""
    if not isinstance(spec, Sequence) or isinstance(spec, (str, bytes)) or not spec:
        raise DataConfigError(f"{setting}={spec!r}: expected a list like [{{shards: /shards/style, weight: 3, "
                              f"trigger: sks}}, {{shards: /shards/general, weight: 1}}]")
    sources = []
    for i, entry in enumerate(spec):
        name = f"{setting}[{i}]"
        if not isinstance(entry, Mapping):
            raise DataConfigError(f"{name}={entry!r}: expected a mapping with keys {', '.join(SOURCE_KEYS)}")
        unknown = sorted(set(entry) - set(SOURCE_KEYS))
        if unknown:
            raise DataConfigError(f"{name}: unknown key(s) {', '.join(unknown)} (expected {', '.join(SOURCE_KEYS)})")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise DataConfigError(f"{name}.weight={weight!r}: expected a number > 0")
        shards = resolve_shards(entry.get("shards"), f"{name}.shards")
        sources.append(Source(name, shards, float(weight), check_trigger(entry.get("trigger"), f"{name}.trigger")))
    return tuple(sources)


def union(sources: Sequence[Source]) -> ShardSet:
    """Every shard of the mixture (epoch length and worker checks read it; a set listed twice counts twice)."""
    return ShardSet(tuple(u for s in sources for u in s.shards.urls),
                    tuple(c for s in sources for c in s.shards.counts))


class WeightedChoice:
    """Index `i` with probability `weights[i] / sum(weights)`: `pick(rng)` (one uniform draw per pick)."""

    def __init__(self, weights: Sequence[float]):
        total = float(sum(weights))
        self.cumulative, acc = [], 0.0
        for w in weights:
            acc += float(w) / total
            self.cumulative.append(acc)

    def pick(self, rng: random.Random) -> int:
        u = rng.random()
        return next((i for i, c in enumerate(self.cumulative) if u < c), len(self.cumulative) - 1)


class SourceMix:
    """First pipeline stage: endless raw samples, each from a source chosen by weight (tagged with its trigger).

    A source whose `max_empty_draws` shard draws in a row give no sample at all (unreadable or empty shards)
    stops the stream with one DataStarvedError line naming it, instead of spinning on it forever.
    """

    def __init__(self, sources: Sequence[Source], state: PipelineState, counts: WorkerCounts, *, seed: int,
                 shuffle_buffer: int, rank: int | None, world_size: int | None, max_empty_draws: int | None = 50):
        self.sources, self.state, self.counts, self.seed = tuple(sources), state, counts, seed
        self.shuffle_buffer, self.rank, self.world_size = shuffle_buffer, rank, world_size
        self.max_empty_draws = max_empty_draws

    def _stream(self, i: int) -> Iterator[dict]:
        src, seed = self.sources[i], f"{self.seed}:source{i}"  # independent shard draws and shuffles per source
        empty = [0]  # shard draws since this source last gave a sample
        limit = max(self.max_empty_draws or 0, len(set(src.shards.urls)))

        def shard_draws() -> Iterator[dict]:
            for item in ShardSource(src.shards.urls, self.state, shuffle=True, resampled=True, seed=seed,
                                    rank=self.rank, world_size=self.world_size)():
                if empty[0] >= limit:
                    raise DataStarvedError(f"{src.name}.shards: {empty[0]} shard draw(s) in a row gave no sample "
                                           f"(unreadable or empty shards, counted as tar_error); point it at "
                                           f"readable shards")
                empty[0] += 1
                yield item

        def counted(samples: Iterator[dict]) -> Iterator[dict]:
            for raw in samples:
                empty[0] = 0
                yield raw

        stream = counted(TarSamples(self.counts)(shard_draws()))
        if self.shuffle_buffer > 1:
            stream = SampleShuffle(self.shuffle_buffer, self.state, seed, self.rank, self.world_size)(stream)
        return TagTrigger(src.trigger)(stream) if src.trigger else stream

    def __call__(self) -> Iterator[dict]:
        rank, _ = node_info(self.rank, self.world_size)
        streams = [self._stream(i) for i in range(len(self.sources))]
        choice = WeightedChoice([s.weight for s in self.sources])
        rng = random.Random(f"{self.seed}:{self.state.epoch}:{rank}:{worker_id()}:mix")
        while True:  # endless: the loader fixes the epoch length (`ClipLoader.with_epoch`)
            yield next(streams[choice.pick(rng)])


def mixed_stages(sources: Sequence[Source], state: PipelineState, counts: WorkerCounts, *, seed: int,
                 shuffle_buffer: int, rank: int | None, world_size: int | None,
                 max_empty_draws: int | None = 50) -> list:
    """The head of a mixed pipeline (for `build_clip_dataset(head=...)` / `build_latent_dataset(head=...)`)."""
    return [SourceMix(sources, state, counts, seed=seed, shuffle_buffer=shuffle_buffer, rank=rank,
                      world_size=world_size, max_empty_draws=max_empty_draws)]
