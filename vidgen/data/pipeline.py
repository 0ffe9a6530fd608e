"""The webdataset pipeline: shards -> node/worker split -> tar samples -> shuffle -> decode + bucket -> batches.

Every stage is a small picklable object so the pipeline works with spawned DataLoader workers too. All
randomness is seeded from (seed, epoch, ...): shard order from (seed, epoch) so every rank splits the same list;
the sample shuffle buffer and resampled shards from (seed, epoch, rank, worker); the clip start and crop from
(seed, epoch, key), so a sample gets the same clip whichever worker reads it.
"""

from __future__ import annotations

import io
import json
import logging
import random
from itertools import islice
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from vidgen.data.audio import AudioError, audio_fit_frames, audio_span, check_channels, clip_audio, no_audio
from vidgen.data.batches import ClipBatch
from vidgen.data.buckets import Assignment, Bucket, BucketAssigner, batch_sizes_per_bucket, normalize, to_bucket_uint8
from vidgen.data.decode import DecodeError, open_video
from vidgen.data.sampling import clip_indices, clip_span, sample_rng
from vidgen.data.starvation import DataStarvedError, StarveContext, clip_fixes, describe_shards, starved_message
from vidgen.data.stats import DRAW_KEY, STARVED_KEY, STATS_KEY, LoaderStats, WorkerCounts, worker_id

log = logging.getLogger(__name__)

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
TRIGGER_KEY = "__trigger__"  # on the raw samples of a style set: the word put in front of their captions


class PipelineState:
    """Mutable state shared by the stages; set in the main process before each pass (workers get a copy).

    `skip_keys` / `skip_epoch`: sample keys already trained on in epoch `skip_epoch` by a run of another world size
    (`SkipKeys` drops them in that epoch's pass; `vidgen.data.position`).
    """

    def __init__(self, epoch: int = 0):
        self.epoch = epoch
        self.skip_keys: frozenset[str] = frozenset()
        self.skip_epoch: int | None = None


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
    """Tar streams -> raw samples {"__key__", "mp4", "json", ...}; unreadable tars/members are counted, not raised.

    Each shard read is a draw of `counts` (its samples carry the draw id), so the starvation guard knows when
    a shard has been read and all its samples processed.
    """

    def __init__(self, counts: WorkerCounts):
        self.counts = counts

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        for item in src:
            draw = self.counts.start_shard(item["url"])
            for sample in wds.tarfile_samples(iter([item]), handler=self.counts.handler):
                sample[DRAW_KEY] = draw
                self.counts.read_sample(draw)
                yield sample
            self.counts.end_shard(draw)


class SkipKeys:
    """Drops raw samples whose key is in `state.skip_keys` during the pass of `state.skip_epoch` (resume of an epoch
    on another world size: what the old ranks consumed is not seen again, whichever new rank reads its shard)."""

    def __init__(self, state: PipelineState):
        self.state = state

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        skip = self.state.skip_keys if self.state.skip_epoch == self.state.epoch else frozenset()
        for raw in src:
            if raw.get("__key__") not in skip:
                yield raw


class TagTrigger:
    """Marks each raw sample with the trigger word its caption gets (the decode stages apply `with_trigger`)."""

    def __init__(self, trigger: str):
        self.trigger = trigger

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        for raw in src:
            raw[TRIGGER_KEY] = self.trigger
            yield raw


def with_trigger(caption: str, trigger: str | None) -> str:
    """`"TRIGGER caption"` (the trigger alone for an empty caption; unchanged when it already starts with it)."""
    if not trigger or caption == trigger or caption.startswith(trigger + " "):
        return caption
    return f"{trigger} {caption}" if caption else trigger


class SampleShuffle:
    """Shuffle buffer over samples, seeded per (seed, epoch, rank, worker)."""

    def __init__(self, size: int, state: PipelineState, seed: int, rank: int | None, world_size: int | None):
        self.size, self.state, self.seed, self.rank, self.world_size = size, state, seed, rank, world_size

    def __call__(self, src: Iterator) -> Iterator:
        rank, _ = node_info(self.rank, self.world_size)
        seed = f"{self.seed}:{self.state.epoch}:{rank}:{worker_id()}"
        return wds.shuffle(self.size, initial=min(self.size, 64), rng=random.Random(seed))(src)


class SampleDrop(Exception):
    """A sample that cannot be used: `reason` (a DROP_REASONS entry) and, as the message, what was wrong."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail)
        self.reason = reason


class SampleTransform:
    """Base of the decode stages: raw tar sample -> sample dict, or None after counting why it was dropped.

    Subclasses implement `transform(raw, key)` and raise SampleDrop; any other error inside one sample is
    counted as `corrupt` too: a damaged sample is never fatal (the loader stops only when none survives).
    """

    counts: WorkerCounts

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        for raw in src:
            out = self.process(raw)
            self.counts.sample_done(raw.get(DRAW_KEY), out is not None)
            if out is not None:
                yield out

    def process(self, raw: dict) -> dict | None:
        """One raw sample -> transformed dict, or None after counting why it was dropped."""
        key = raw.get("__key__", "?")
        try:
            return self.transform(raw, key)
        except SampleDrop as drop:
            self.counts.add(drop.reason, key, str(drop) or None)
        except Exception as e:  # decoders and parsers raise many types for damaged bytes
            self.counts.add("corrupt", key, f"{type(e).__name__}: {e}")
        return None

    def transform(self, raw: dict, key: str) -> dict:
        raise NotImplementedError


def read_meta(raw: Mapping) -> dict:
    """The sample's json member -> dict; raises SampleDrop("corrupt") when missing, not UTF-8 or not an object."""
    data = raw.get("json")
    if data is None:
        raise SampleDrop("corrupt", "no json member")
    try:
        meta = json.loads(data)
    except UnicodeDecodeError as e:  # e.g. a caption written in latin-1
        raise SampleDrop("corrupt", f"json is not UTF-8 ({e.reason} at byte {e.start})") from None
    except ValueError as e:
        raise SampleDrop("corrupt", f"json does not parse ({e})") from None
    if not isinstance(meta, dict):
        raise SampleDrop("corrupt", "json is not an object")
    return meta


VIDEO_FIELDS = ("num_frames", "width", "height")


def video_fields(meta: Mapping) -> tuple[int, int, int, float]:
    """(num_frames, width, height, fps) of a video sample's json (fps 0 when unknown); raises SampleDrop."""
    missing = [k for k in VIDEO_FIELDS if meta.get(k) is None]
    if missing:
        raise SampleDrop("corrupt", f"json lacks {'/'.join(missing)}")
    try:
        return (int(meta["num_frames"]), int(meta["width"]), int(meta["height"]),
                float(meta.get("fps") or 0.0))
    except (TypeError, ValueError) as e:
        raise SampleDrop("corrupt", f"json num_frames/width/height/fps are not numbers ({e})") from None


class ClipTransform(SampleTransform):
    """Raw sample -> {"video" [3, T, H, W] uint8, "caption", "key", "fps", "bucket"}, or a counted drop.

    Pixels stay uint8 until `collate` normalises the whole batch at once (a quarter of the copying).
    `audio`: also "audio" float32 [C, S] in [-1, 1], the clip's stored audio (make_shards' KEY.flac) over exactly
    the sampled frames' time span (vidgen.data.audio.audio_span), and "audio_valid" (bool: it is all real audio).
    Clips without audio and images give zeros and False. The clip start is then drawn among those whose span ends
    inside the clip when any does (the last sampled frame stands for `step` frames of sound). A clip whose audio has
    another rate or channel count than `audio_rate` / `audio_channels` is a counted `corrupt` drop naming the sample
    and both settings (a shard set made for another rate starves the loader with that one line).
    """

    def __init__(self, assigner: BucketAssigner, counts: WorkerCounts, state: PipelineState, *, train: bool,
                 seed: int, decoder: str, decoder_threads: int = 1, require_caption: bool = False,
                 audio: bool = False, audio_rate: int = 24000, audio_channels: int = 1):
        self.assigner, self.counts, self.state, self.train, self.seed = assigner, counts, state, train, seed
        self.decoder, self.decoder_threads, self.require_caption = decoder, decoder_threads, require_caption
        self.audio, self.audio_rate, self.audio_channels = bool(audio), int(audio_rate), int(audio_channels)
        if self.audio:
            check_channels(self.audio_channels)
            if self.audio_rate <= 0:
                raise ValueError(f"audio_rate={audio_rate}: expected a positive sample rate")

    def transform(self, raw: dict, key: str) -> dict:
        meta = read_meta(raw)
        caption = str(meta.get("caption") or "")
        if self.require_caption and not caption.strip():
            raise SampleDrop("no_caption")
        caption = with_trigger(caption, raw.get(TRIGGER_KEY))
        media = raw.get("mp4")
        if media is not None:
            return self._video(media, raw.get("flac"), meta, caption, key)
        image_ext = next((e for e in IMAGE_MEMBERS if e in raw), None)
        if image_ext is None:
            raise SampleDrop("corrupt", "no mp4 (or image) member")
        return self._image(raw[image_ext], meta, caption, key)

    def _plan(self, num_frames: int, fps: float, width: int, height: int) -> Assignment:
        plan = self.assigner.assign(num_frames, fps, width, height)
        if isinstance(plan, str):
            detail = (f"{num_frames} frame(s) at {fps:g} fps, {width}x{height}" if plan != "corrupt"
                      else "json gives no frames or no size")
            raise SampleDrop(plan, detail)
        return plan

    def _video(self, data: bytes, flac: bytes | None, meta: dict, caption: str, key: str) -> dict:
        num_frames, width, height, fps = video_fields(meta)
        # Plan from the json first: samples that fit no bucket are dropped without touching the mp4.
        plan = self._plan(num_frames, fps, width, height)
        rng = sample_rng(self.seed, self.state.epoch, key) if self.train else None
        try:
            reader = open_video(data, self.decoder, self.decoder_threads)
            if reader.num_frames < num_frames:
                # The container is the truth: re-plan for the frames it really holds.
                plan = self._plan(reader.num_frames, fps, width, height)
            t, step = plan.bucket.frames, plan.step
            starts_from = (audio_fit_frames(reader.num_frames, t, step, clip_span(t, step)) if self.audio
                           else reader.num_frames)
            indices = clip_indices(starts_from, t, step, rng)
            frames = reader.get(indices)  # [T, H, W, 3] uint8
        except DecodeError as e:
            raise SampleDrop("corrupt", str(e)) from None
        fps = fps or reader.fps or 0.0
        out = self._emit(frames, plan.bucket, rng, caption, key, fps / plan.step)
        if self.audio:
            out.update(self._audio(flac, meta, audio_span(indices[0], t, step, fps, self.audio_rate)))
        return out

    def _audio(self, flac: bytes | None, meta: dict, span: tuple[int, int]) -> dict:
        """The clip's audio over the samples span = (start, length) -> {"audio" [C, S], "audio_valid"}."""
        try:
            wave, valid = clip_audio(meta, flac, *span, self.audio_rate, self.audio_channels)
        except AudioError as e:  # AudioMismatch included: the message names both rates
            raise SampleDrop("corrupt", str(e)) from None
        return {"audio": wave, "audio_valid": valid}

    def _image(self, data: bytes, meta: dict, caption: str, key: str) -> dict:
        try:
            frames = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[None]  # [1, H, W, 3]
        except Exception as e:  # PIL raises many types for bad files
            raise SampleDrop("corrupt", f"image does not decode ({type(e).__name__}: {e})") from None
        fps = float(meta.get("fps") or 0.0)
        plan = self._plan(1, fps, frames.shape[2], frames.shape[1])
        rng = sample_rng(self.seed, self.state.epoch, key) if self.train else None
        out = self._emit(frames, plan.bucket, rng, caption, key, fps)
        if self.audio:  # silence as long as the one frame lasts at its nominal fps
            out.update(audio=no_audio(self.audio_channels, audio_span(0, 1, 1.0, fps, self.audio_rate)[1]),
                       audio_valid=False)
        return out

    @staticmethod
    def _emit(frames, bucket: Bucket, rng, caption: str, key: str, fps: float) -> dict:
        video = to_bucket_uint8(frames, bucket, rng)  # [3, T, H, W] uint8
        return {"video": video, "caption": caption, "key": key, "fps": fps, "bucket": bucket}


def collate(samples: list[dict]) -> ClipBatch:
    """Samples of one bucket -> ClipBatch {"video" [B, 3, T, H, W] float32 in [-1, 1], "caption", "key", "fps" [B]},
    plus "audio" [B, C, S] float32 and "audio_valid" [B] bool when the samples carry audio (one S per batch)."""
    batch: ClipBatch = {
        "video": normalize(torch.stack([s["video"] for s in samples])),
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
        "fps": torch.tensor([s["fps"] for s in samples], dtype=torch.float32),
    }
    if "audio" in samples[0]:
        batch["audio"] = torch.stack([s["audio"] for s in samples])  # [B, C, S]
        batch["audio_valid"] = torch.tensor([s["audio_valid"] for s in samples], dtype=torch.bool)
    return batch


class Batcher:
    """Last stage: per-shape accumulators, so each batch has one shape; every item carries the worker's counts.

    Yields a batch when a group holds its batch size, then (unless `drop_last`) the partial groups, then a
    stats-only item. A starved stream (DataStarvedError upstream) ends with a `__starved__` item instead, so the
    main process raises it as one line rather than a worker traceback. Subclasses say how samples group and batch.
    """

    def __init__(self, counts: WorkerCounts, drop_last: bool = False):
        self.counts, self.drop_last = counts, drop_last

    def group(self, sample: dict):
        """The (sortable) shape key of a sample."""
        raise NotImplementedError

    def size(self, sample: dict) -> int:
        """The batch size of the sample's group."""
        raise NotImplementedError

    def collate(self, samples: list[dict]) -> dict:
        raise NotImplementedError

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        self.counts.reset()  # before any upstream stage runs: counts are per pass
        pending: dict = {}
        try:
            for sample in src:
                group = pending.setdefault(self.group(sample), [])
                group.append(sample)
                if len(group) >= self.size(sample):
                    yield self._batch(group)
                    group.clear()
        except DataStarvedError as e:
            yield {STARVED_KEY: str(e), STATS_KEY: self.counts.snapshot()}
            return
        if not self.drop_last:
            for key in sorted(pending):
                if pending[key]:
                    yield self._batch(pending[key])
        yield {STATS_KEY: self.counts.snapshot()}  # stats-only: counts after the last batch reach the main process

    def _batch(self, samples: list[dict]) -> dict:
        return {**self.collate(samples), STATS_KEY: self.counts.snapshot()}


class BucketBatcher(Batcher):
    """Clip samples grouped by bucket, batch sizes per Bucket.

    With audio, by (bucket, audio samples): clips of one bucket last longer where the source is slower than the
    target fps (it is read at its own rate), so their audio is longer, and each batch keeps one audio length.
    """

    def __init__(self, batch_sizes: Mapping[Bucket, int], counts: WorkerCounts, drop_last: bool = False):
        super().__init__(counts, drop_last)
        self.batch_sizes = dict(batch_sizes)

    def group(self, sample: dict) -> Bucket | tuple[Bucket, int]:
        return (sample["bucket"], sample["audio"].shape[-1]) if "audio" in sample else sample["bucket"]

    def size(self, sample: dict) -> int:
        return self.batch_sizes[sample["bucket"]]

    def collate(self, samples: list[dict]) -> ClipBatch:
        return collate(samples)


class ClipDataset(wds.DataPipeline):
    """The whole pipeline as one IterableDataset; `state.epoch` and `counts` are shared with its stages.

    `context` (from the counts) names the shards in the error raised when a pass yields no batch.
    """

    def __init__(self, *stages, state: PipelineState, counts: WorkerCounts):
        super().__init__(*stages)
        self.state, self.counts = state, counts
        self.context = counts.context or StarveContext("data", "?")


def source_stages(urls: Sequence[str], state: PipelineState, counts: WorkerCounts, *, train: bool, seed: int,
                  shuffle_buffer: int, resampled: bool, rank: int | None, world_size: int | None,
                  trigger: str | None = None) -> list:
    """The stages every shard pipeline starts with: shards -> node/worker split -> raw samples -> shuffle
    (-> tagged with the `trigger` word of a style set). Several weighted shard sets: `vidgen.data.mixing`."""
    stages: list = [ShardSource(urls, state, shuffle=train, resampled=resampled, seed=seed, rank=rank,
                                world_size=world_size)]
    if not resampled:  # resampled draws are already independent per rank and worker
        stages += [NodeSplit(rank, world_size), wds.split_by_worker]
    stages.append(TarSamples(counts))
    if shuffle_buffer > 1:
        stages.append(SampleShuffle(shuffle_buffer, state, seed, rank, world_size))
    if trigger:
        stages.append(TagTrigger(trigger))
    return stages


Head = Callable[[PipelineState, WorkerCounts], list]  # the first stages of a pipeline (up to raw samples)


def worker_counts(urls: Sequence[str], resampled: bool, max_empty_draws: int | None,
                  context: StarveContext | None) -> WorkerCounts:
    """Counts for a pipeline; a resampled (endless) one gets the starvation guard."""
    return WorkerCounts(watch=resampled, starve_after=max_empty_draws, num_shards=len(set(urls)), context=context)


def build_clip_dataset(urls: Sequence[str], *, buckets, batch_size, train: bool, seed: int = 0,
                       target_fps: float | None = None, frame_stride: int = 1, max_upscale: float | None = 1.0,
                       shuffle_buffer: int = 0, resampled: bool = False, decoder: str = "decord",
                       decoder_threads: int = 1, require_caption: bool = False, drop_last: bool = False,
                       rank: int | None = None, world_size: int | None = None, max_empty_draws: int | None = 50,
                       context: StarveContext | None = None, trigger: str | None = None,
                       head: Head | None = None, audio: bool = False, audio_rate: int = 24000,
                       audio_channels: int = 1) -> ClipDataset:
    """Shard paths -> ClipDataset yielding one-bucket ClipBatch dicts (see ClipTransform / BucketBatcher).

    trigger: a word put in front of every caption; head: the stages up to raw samples (default `source_stages`
    over `urls`; `vidgen.data.mixing.mixed_stages` draws from several weighted shard sets instead);
    audio / audio_rate / audio_channels: batches also hold the clips' audio (ClipTransform).
    """
    state = PipelineState()
    context = context or StarveContext("data.train_shards", describe_shards(urls), clip_fixes("data.train_shards"))
    counts = worker_counts(urls, resampled, max_empty_draws, context)
    assigner = BucketAssigner(buckets, target_fps=target_fps, frame_stride=frame_stride, max_upscale=max_upscale)
    stages = head(state, counts) if head is not None else source_stages(
        urls, state, counts, train=train, seed=seed, shuffle_buffer=shuffle_buffer, resampled=resampled, rank=rank,
        world_size=world_size, trigger=trigger)
    stages.append(SkipKeys(state))
    stages.append(ClipTransform(assigner, counts, state, train=train, seed=seed, decoder=decoder,
                                decoder_threads=decoder_threads, require_caption=require_caption, audio=audio,
                                audio_rate=audio_rate, audio_channels=audio_channels))
    stages.append(BucketBatcher(batch_sizes_per_bucket(batch_size, assigner.buckets), counts, drop_last))
    return ClipDataset(*stages, state=state, counts=counts)


class ClipLoader(wds.WebLoader):
    """WebLoader over a ClipDataset (clip or latent batches): advances the epoch each pass, strips and aggregates
    worker stats, and stops with one DataStarvedError line when a pass yields no batch.

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

    def skip_keys(self, epoch: int, keys: set[str]) -> None:
        """On the pass of `epoch`, leave out the samples with these keys (resume on another world size)."""
        self.clip_dataset.state.skip_epoch, self.clip_dataset.state.skip_keys = int(epoch), frozenset(keys)

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
                if STARVED_KEY in item:
                    self._starved(item.pop(STARVED_KEY), got)
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
            if got == 0:
                self._empty_pass()
            if self.num_batches is None:
                return

    def _starved(self, message: str, got: int) -> None:
        """A worker gave up on its endless stream: an error unless other workers already delivered batches."""
        if got == 0:
            raise DataStarvedError(message)
        log.warning("a data worker stopped (its other draws kept nothing): %s", message)

    def _empty_pass(self) -> None:
        """A whole pass of this loader gave no batch: stop with one line (a rank without shards just ends)."""
        now = self.stats.current()
        if self.num_batches is None and now["shards"] == 0:
            return  # this rank got no shard of a validation set (warned when the loader was built)
        ctx = self.clip_dataset.context
        scope = (f"a whole {ctx.role} pass over {now['shards']} shard(s)" if self.num_batches is None
                 else f"a resampled {ctx.role} pass ({now['shards']} shard draw(s))")
        raise DataStarvedError(starved_message(ctx, now["counts"], now["examples"], kept=now["kept"], scope=scope))
