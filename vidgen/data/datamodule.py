"""ClipDataModule: clip shards -> one-bucket ClipBatch dicts {"video" [B, 3, T, H, W] in [-1, 1], "caption", "key",
"fps" [B]} (+ "audio" [B, C, S], "audio_valid" [B] with `audio`). Shards, split, workers, resampling and loaders:
vidgen.data.base.ShardDataModule."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from vidgen.data.audio import LAYOUTS
from vidgen.data.base import ShardDataModule
from vidgen.data.buckets import BucketAssigner, parse_buckets
from vidgen.data.decode import resolve_backend
from vidgen.data.pipeline import ClipDataset, build_clip_dataset
from vidgen.data.shards import DataConfigError, ShardSet
from vidgen.data.starvation import StarveContext


class ClipDataModule(ShardDataModule):
    """Lightning data module over clip shards: bucketed, seeded per (seed, epoch), corrupt samples counted.

    Batches: ClipBatch {"video" [B, 3, T, H, W] float32 in [-1, 1], "caption" list[str], "key" list[str], "fps" [B]}
    and, with `audio`, "audio" [B, C, S] float32 in [-1, 1] and "audio_valid" [B] bool (vidgen.data.batches).

    `train_shards` / `val_shards`: a folder with manifest.json, a .tar, a glob, a brace pattern or a list.
    `val_split`: with no `val_shards`, hold out the last N shards (int) or a fraction of them (float < 1).
    `buckets`: [[frames, height, width], ...]; `batch_size`: int, {"TxHxW": n, "default": n} or a token budget.
    `target_fps` (nearest source frames) or `frame_stride` choose the frames; `decoder`: decord | pyav.
    `max_upscale`: largest enlargement allowed to cover a bucket (null: any); `require_caption` drops uncaptioned.
    `resampled` / `samples_per_epoch` / `max_empty_draws`: see vidgen.data.base. `drop_last`: drop each worker's
    partial batches. `trigger`: a word put in front of every caption (a style set); `sources`: instead of
    `train_shards`, weighted shard sets `[{shards, weight, trigger}]` mixed per sample (vidgen.data.mixing).
    `rank` / `world_size`: override the detected ones (tests, or loaders built outside a Trainer).
    `audio`: batches also hold each clip's audio over its sampled frames at `audio_rate` Hz x `audio_channels` (the
    rate and channels the shards were made with: make_shards --audio-rate/--audio-channels; a clip made otherwise is
    a counted corrupt drop naming both); clips without audio give zeros with audio_valid False.
    """

    def __init__(self, train_shards: str | Sequence[str] | None, val_shards: str | Sequence[str] | None = None,
                 val_split: int | float | None = None, buckets: Sequence = ((9, 64, 64), (1, 64, 64)),
                 batch_size: int | Mapping = 4, val_batch_size: int | Mapping | None = None, num_workers: int = 0,
                 target_fps: float | None = None, frame_stride: int = 1, max_upscale: float | None = 1.0,
                 shuffle_buffer: int = 256, resampled: bool = False, samples_per_epoch: int | None = None,
                 seed: int = 0, decoder: str = "decord", decoder_threads: int = 1, require_caption: bool = False,
                 drop_last: bool = False, pin_memory: bool = False, prefetch_factor: int = 2,
                 max_empty_draws: int | None = 50, rank: int | None = None, world_size: int | None = None,
                 log_stats: bool = True, trigger: str | None = None, sources: Sequence[Mapping] | None = None,
                 audio: bool = False, audio_rate: int = 24000, audio_channels: int = 1):
        super().__init__(locals())
        self.buckets = parse_buckets(self.hparams.buckets)
        # Validate what can be checked without touching the disk, so a bad config fails at instantiation.
        self.batch_sizes(train=True)
        self.batch_sizes(train=False)
        BucketAssigner(self.buckets, target_fps=target_fps, frame_stride=frame_stride, max_upscale=max_upscale)
        self.decoder = resolve_backend(decoder)
        if target_fps is not None and int(frame_stride) != 1:
            raise DataConfigError(f"data.target_fps={target_fps} and data.frame_stride={frame_stride}: set one of them")
        if audio:
            if int(audio_channels) not in LAYOUTS:
                raise DataConfigError(f"data.audio_channels={audio_channels}: expected 1 (mono) or 2 (stereo)")
            if int(audio_rate) <= 0:
                raise DataConfigError(f"data.audio_rate={audio_rate}: expected a positive sample rate (Hz)")

    def build_dataset(self, shards: ShardSet, *, train: bool, resampled: bool, rank: int, world_size: int,
                      context: StarveContext) -> ClipDataset:
        hp = self.hparams
        return build_clip_dataset(
            shards.urls, buckets=self.buckets, batch_size=self.batch_size if train else self.val_batch_size,
            train=train, seed=hp.seed, target_fps=hp.target_fps, frame_stride=hp.frame_stride,
            max_upscale=hp.max_upscale, shuffle_buffer=hp.shuffle_buffer if train else 0, resampled=resampled,
            decoder=self.decoder, decoder_threads=hp.decoder_threads, require_caption=hp.require_caption,
            drop_last=hp.drop_last if train else False, rank=rank, world_size=world_size,
            max_empty_draws=hp.max_empty_draws, context=context, trigger=self.trigger,
            head=self.head(train, rank, world_size), audio=hp.audio, audio_rate=hp.audio_rate,
            audio_channels=hp.audio_channels)
