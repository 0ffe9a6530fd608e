"""The webdataset pipeline: shards -> node/worker split -> tar samples -> shuffle -> decode + bucket -> batches.

Every stage is a small picklable object so the pipeline works with spawned DataLoader workers too. All
randomness is seeded from (seed, epoch, ...): shard order from (seed, epoch) so every rank splits the same list;
the sample shuffle buffer and resampled shards from (seed, epoch, rank, worker); the clip start and crop from
(seed, epoch, key), so a sample gets the same clip whichever worker reads it.
"""

from __future__ import annotations

import io
import json
import random
from itertools import islice
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from vidgen.data.buckets import Assignment, Bucket, BucketAssigner, normalize, to_bucket_uint8
from vidgen.data.decode import DecodeError, open_video
from vidgen.data.sampling import clip_indices, sample_rng
from vidgen.data.stats import STATS_KEY, LoaderStats, WorkerCounts, worker_id

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")


class PipelineState:
    """Mutable state shared by the stages; set in the main process before each pass (workers get a copy)."""

    def __init__(self, epoch: int = 0):
        self.epoch = epoch


def node_info(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world_size): explicit values win, else webdataset's detection (env RANK/WORLD_SIZE, torch.distributed)."""
    if rank is not None and world_size is not None:
        return int(rank), int(world_size)
    detected_rank, detected_world, _, _ = wds.utils.pytorch_worker_info()
    return detected_rank, detected_world


class ShardSource:
    """First stage: yields dict(url=...) — each shard once per pass in a (seed, epoch) order, or resampled forever."""

    def __init__(self, urls: Sequence[str], state: PipelineState, *, shuffle: bool, resampled: bool, seed: int,
                 rank: int | None = None, world_size: int | None = None):
        self.urls, self.state, self.shuffle, self.resampled, self.seed = list(urls), state, shuffle, resampled, seed
        self.rank, self.world_size = rank, world_size

    def __call__(self) -> Iterator[dict]:
        if self.resampled:
            # Independent infinite draws per rank and worker; the epoch length is set by the loader (with_epoch).
            rank, _ = node_info(self.rank, self.world_size)
            rng = random.Random(f"{self.seed}:{self.state.epoch}:{rank}:{worker_id()}")
            while True:
                yield dict(url=rng.choice(self.urls))
        urls = list(self.urls)
        if self.shuffle:
            # Same permutation on every rank (no rank in the seed): the node split below stays a partition.
            random.Random(f"{self.seed}:{self.state.epoch}").shuffle(urls)
        yield from (dict(url=u) for u in urls)


class NodeSplit:
    """`wds.split_by_node` with optional explicit rank/world_size (tests, or loaders built before DDP init)."""

    def __init__(self, rank: int | None = None, world_size: int | None = None):
        self.rank, self.world_size = rank, world_size

    def __call__(self, src: Iterator) -> Iterator:
        if self.rank is None or self.world_size is None:
            yield from wds.split_by_node(src)
            return
        yield from islice(src, self.rank, None, self.world_size)


class TarSamples:
    """Tar streams -> raw samples {"__key__", "mp4", "json", ...}; unreadable tars/members are counted, not raised."""

    def __init__(self, counts: WorkerCounts):
        self.counts = counts

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        return wds.tarfile_samples(src, handler=self.counts.handler)


class SampleShuffle:
    """Shuffle buffer over samples, seeded per (seed, epoch, rank, worker)."""

    def __init__(self, size: int, state: PipelineState, seed: int, rank: int | None, world_size: int | None):
        self.size, self.state, self.seed, self.rank, self.world_size = size, state, seed, rank, world_size

    def __call__(self, src: Iterator) -> Iterator:
        rank, _ = node_info(self.rank, self.world_size)
        seed = f"{self.seed}:{self.state.epoch}:{rank}:{worker_id()}"
        return wds.shuffle(self.size, initial=min(self.size, 64), rng=random.Random(seed))(src)


class ClipTransform:
    """Raw sample -> {"video" [3, T, H, W] uint8, "caption", "key", "fps", "bucket"}, or a counted drop.

    Pixels stay uint8 until `collate` normalises the whole batch at once (a quarter of the copying).
    """

    def __init__(self, assigner: BucketAssigner, counts: WorkerCounts, state: PipelineState, *, train: bool,
                 seed: int, decoder: str, decoder_threads: int = 1, require_caption: bool = False):
        self.assigner, self.counts, self.state, self.train, self.seed = assigner, counts, state, train, seed
        self.decoder, self.decoder_threads, self.require_caption = decoder, decoder_threads, require_caption

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        for sample in src:
            out = self.process(sample)
            if out is not None:
                yield out

    def process(self, sample: dict) -> dict | None:
        """One sample -> transformed dict, or None after counting why it was dropped."""
        key = sample.get("__key__", "?")
        try:
            meta = json.loads(sample["json"])
            if not isinstance(meta, dict):
                raise ValueError("json is not an object")
        except (KeyError, ValueError, TypeError) as e:
            self.counts.add("corrupt", key, f"bad or missing json member ({type(e).__name__}: {e})")
            return None
        caption = str(meta.get("caption") or "")
        if self.require_caption and not caption.strip():
            self.counts.add("no_caption", key)
            return None
        media = sample.get("mp4")
        if media is None:
            image_ext = next((e for e in IMAGE_MEMBERS if e in sample), None)
            if image_ext is None:
                self.counts.add("corrupt", key, "no mp4 (or image) member")
                return None
            return self._image(sample[image_ext], meta, caption, key)
        return self._video(media, meta, caption, key)

    def _plan(self, meta: Mapping, num_frames: int, key: str) -> Assignment | None:
        try:
            plan = self.assigner.assign(num_frames, float(meta.get("fps") or 0.0),
                                        int(meta["width"]), int(meta["height"]))
        except (KeyError, ValueError, TypeError) as e:
            self.counts.add("corrupt", key, f"json lacks fps/width/height ({e})")
            return None
        if isinstance(plan, str):
            self.counts.add(plan, key, "metadata gives no frames or no size")
            return None
        return plan

    def _video(self, data: bytes, meta: dict, caption: str, key: str) -> dict | None:
        # Plan from the json first: samples that fit no bucket are dropped without touching the mp4.
        plan = self._plan(meta, int(meta.get("num_frames") or 0), key)
        if plan is None:
            return None
        rng = sample_rng(self.seed, self.state.epoch, key) if self.train else None
        try:
            reader = open_video(data, self.decoder, self.decoder_threads)
            if reader.num_frames < int(meta["num_frames"]):
                # The container is the truth: re-plan for the frames it really holds.
                plan = self._plan(meta, reader.num_frames, key)
                if plan is None:
                    return None
            indices = clip_indices(reader.num_frames, plan.bucket.frames, plan.step, rng)
            frames = reader.get(indices)  # [T, H, W, 3] uint8
        except DecodeError as e:
            self.counts.add("corrupt", key, e)
            return None
        src_fps = float(meta.get("fps") or reader.fps or 0.0)
        return self._emit(frames, plan.bucket, rng, caption, key, src_fps / plan.step)

    def _image(self, data: bytes, meta: dict, caption: str, key: str) -> dict | None:
        try:
            frames = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[None]  # [1, H, W, 3]
        except Exception as e:  # PIL raises many types for bad files
            self.counts.add("corrupt", key, e)
            return None
        plan = self._plan({**meta, "height": frames.shape[1], "width": frames.shape[2]}, 1, key)
        if plan is None:
            return None
        rng = sample_rng(self.seed, self.state.epoch, key) if self.train else None
        return self._emit(frames, plan.bucket, rng, caption, key, float(meta.get("fps") or 0.0))

    @staticmethod
    def _emit(frames, bucket: Bucket, rng, caption: str, key: str, fps: float) -> dict:
        video = to_bucket_uint8(frames, bucket, rng)  # [3, T, H, W] uint8
        return {"video": video, "caption": caption, "key": key, "fps": fps, "bucket": bucket}


def collate(samples: list[dict]) -> dict:
    """Samples of one bucket -> batch {"video" [B, 3, T, H, W] float32 in [-1, 1], "caption", "key", "fps" [B]}."""
    return {
        "video": normalize(torch.stack([s["video"] for s in samples])),
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
        "fps": torch.tensor([s["fps"] for s in samples], dtype=torch.float32),
    }


class BucketBatcher:
    """Per-bucket accumulators: yield a batch when a bucket holds its batch size, so each batch has one shape."""

    def __init__(self, batch_sizes: Mapping[Bucket, int], counts: WorkerCounts, drop_last: bool = False):
        self.batch_sizes, self.counts, self.drop_last = dict(batch_sizes), counts, drop_last

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        self.counts.reset()  # before any upstream stage runs: counts are per pass
        pending: dict[Bucket, list[dict]] = {b: [] for b in self.batch_sizes}
        for sample in src:
            group = pending[sample["bucket"]]
            group.append(sample)
            if len(group) == self.batch_sizes[sample["bucket"]]:
                yield {**collate(group), STATS_KEY: self.counts.snapshot()}
                group.clear()
        if not self.drop_last:
            for group in pending.values():
                if group:
                    yield {**collate(group), STATS_KEY: self.counts.snapshot()}
        yield {STATS_KEY: self.counts.snapshot()}  # stats-only: counts after the last batch reach the main process


class ClipDataset(wds.DataPipeline):
    """The whole pipeline as one IterableDataset; `state.epoch` and `counts` are shared with its stages."""

    def __init__(self, *stages, state: PipelineState, counts: WorkerCounts):
        super().__init__(*stages)
        self.state, self.counts = state, counts


def build_clip_dataset(urls: Sequence[str], *, buckets, batch_size, train: bool, seed: int = 0,
                       target_fps: float | None = None, frame_stride: int = 1, max_upscale: float | None = 1.0,
                       shuffle_buffer: int = 0, resampled: bool = False, decoder: str = "decord",
                       decoder_threads: int = 1, require_caption: bool = False, drop_last: bool = False,
                       rank: int | None = None, world_size: int | None = None) -> ClipDataset:
    """Shard paths -> ClipDataset yielding one-bucket batches (see ClipTransform / BucketBatcher for the fields)."""
    from vidgen.data.buckets import batch_sizes_per_bucket

    state, counts = PipelineState(), WorkerCounts()
    assigner = BucketAssigner(buckets, target_fps=target_fps, frame_stride=frame_stride, max_upscale=max_upscale)
    stages: list = [ShardSource(urls, state, shuffle=train, resampled=resampled, seed=seed, rank=rank,
                                world_size=world_size)]
    if not resampled:  # resampled draws are already independent per rank and worker
        stages += [NodeSplit(rank, world_size), wds.split_by_worker]
    stages.append(TarSamples(counts))
    if shuffle_buffer > 1:
        stages.append(SampleShuffle(shuffle_buffer, state, seed, rank, world_size))
    stages.append(ClipTransform(assigner, counts, state, train=train, seed=seed, decoder=decoder,
                                decoder_threads=decoder_threads, require_caption=require_caption))
    stages.append(BucketBatcher(batch_sizes_per_bucket(batch_size, assigner.buckets), counts, drop_last))
    return ClipDataset(*stages, state=state, counts=counts)


class ClipLoader(wds.WebLoader):
    """WebLoader over a ClipDataset: advances the epoch each pass, strips and aggregates worker stats.

    Workers are not persistent: they are forked per pass, which is how the new epoch reaches them.
    `with_epoch(n)` fixes the pass at n batches (resampled mode; the pass restarts the stream if it ends).
    """

    def __init__(self, dataset: ClipDataset, num_workers: int = 0, pin_memory: bool = False,
                 prefetch_factor: int = 2, epoch_fn=None):
        kwargs = dict(prefetch_factor=prefetch_factor) if num_workers > 0 else {}
        super().__init__(dataset, batch_size=None, shuffle=False, num_workers=num_workers,
                         persistent_workers=False, pin_memory=pin_memory, **kwargs)
        self.clip_dataset, self.stats, self.num_batches = dataset, LoaderStats(), None
        self.epoch, self._epoch_fn = -1, epoch_fn
        self._skip: tuple[int, int] | None = None  # (epoch, batches): resume inside that epoch

    def with_epoch(self, nbatches: int) -> "ClipLoader":
        """Make every pass exactly `nbatches` batches (for the infinite resampled stream)."""
        self.num_batches = int(nbatches)
        return self

    def skip_batches(self, epoch: int, batches: int) -> None:
        """On the pass of `epoch`, drop its first `batches` batches (a resumed run continues where it stopped).

        The skipped batches are read and dropped in the main process: exact (the same batches as an
        uninterrupted run, since every random choice is seeded by (seed, epoch, key)), at the cost of reading them.
        """
        self._skip = (int(epoch), int(batches)) if batches > 0 else None

    def set_epoch(self, epoch: int) -> None:
        """Use this epoch for the next pass (otherwise: `epoch_fn()` if given, else the previous one + 1)."""
        self.epoch = int(epoch) - 1
        self._epoch_fn = None

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("a non-resampled bucketed loader has no fixed length")
        return self.num_batches

    def __iter__(self) -> Iterator[dict]:
        self.epoch = self._epoch_fn() if self._epoch_fn is not None else self.epoch + 1
        self.clip_dataset.state.epoch = self.epoch
        self.stats.start_pass()
        skip = self._skip[1] if self._skip and self._skip[0] == self.epoch else 0
        self._skip = None
        produced = skip if self.num_batches is not None else 0  # skipped batches count towards a fixed length
        while True:
            got = 0
            for item in iter(self.pipeline[0]):  # the torch DataLoader
                if STATS_KEY in item:
                    self.stats.update(item.pop(STATS_KEY))
                if not item:  # a stats-only item (the end of a worker's pass); batches may be video or latent
                    continue
                got += 1
                if skip:
                    skip -= 1
                    continue
                produced += 1
                yield item
                if self.num_batches is not None and produced >= self.num_batches:
                    return
            if self.num_batches is None:
                return
            if got == 0:
                raise RuntimeError(f"the data stream yielded no batch (dropped/skipped so far: {self.stats.totals()})")
