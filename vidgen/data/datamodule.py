"""ClipDataModule: clip shards -> one-bucket batches {"video" [B, 3, T, H, W] in [-1, 1], "caption", "key", "fps" [B]}.

Two modes. Default (`resampled=false`): each pass reads every shard once, split over ranks then DataLoader
workers, so every sample is seen exactly once per epoch; it needs at least world_size x num_workers shards
(workers beyond the shards of a rank are dropped with a warning, and a training rank with no shard is an error).
Ranks may then yield different numbers of batches, which DDP training does not tolerate: use it for one process
or for validation. `resampled=true` (multi-node training): every rank and worker draws shards at random, forever,
and an epoch is `num_samples // (batch_size * world_size)` batches per rank (`samples_per_epoch` overrides
`num_samples`, which otherwise comes from the manifests).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import lightning.pytorch as pl

from vidgen.data.buckets import BucketAssigner, batch_sizes_per_bucket, parse_buckets
from vidgen.data.decode import resolve_backend
from vidgen.data.position import DataPositionMixin
from vidgen.data.pipeline import ClipLoader, build_clip_dataset
from vidgen.data.shards import (DataConfigError, ShardSet, resampled_epoch_batches, resolve_shards,
                                 split_validation)

log = logging.getLogger(__name__)


def _plain(value):
    """OmegaConf ListConfig/DictConfig -> list/dict (Hydra passes those); other values unchanged."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


class ClipDataModule(DataPositionMixin, pl.LightningDataModule):
    """Lightning data module over clip shards: bucketed, seeded per (seed, epoch), corrupt samples counted.

    Batches: {"video" [B, 3, T, H, W] float32 in [-1, 1], "caption" list[str], "key" list[str], "fps" [B]}.

    `train_shards` / `val_shards`: a folder with manifest.json, a .tar, a glob, a brace pattern or a list.
    `val_split`: with no `val_shards`, hold out the last N shards (int) or a fraction of them (float < 1).
    `buckets`: [[frames, height, width], ...]; `batch_size`: int or {"TxHxW": n, "default": n}.
    `target_fps` (nearest source frames) or `frame_stride` choose the frames; `decoder`: decord | pyav.
    `max_upscale`: largest enlargement allowed to cover a bucket (null: any); `require_caption` drops uncaptioned.
    `resampled` / `samples_per_epoch`: see the module docstring. `drop_last`: drop each worker's partial batches.
    `rank` / `world_size`: override the detected ones (tests, or loaders built outside a Trainer).
    Drop counts: `data_stats()`, logged as data/skipped_corrupt, data/tar_errors, data/dropped_<reason>.
    """

    def __init__(self, train_shards: str | Sequence[str] | None, val_shards: str | Sequence[str] | None = None,
                 val_split: int | float | None = None, buckets: Sequence = ((9, 64, 64), (1, 64, 64)),
                 batch_size: int | Mapping = 4, val_batch_size: int | Mapping | None = None, num_workers: int = 0,
                 target_fps: float | None = None, frame_stride: int = 1, max_upscale: float | None = 1.0,
                 shuffle_buffer: int = 256, resampled: bool = False, samples_per_epoch: int | None = None,
                 seed: int = 0, decoder: str = "decord", decoder_threads: int = 1, require_caption: bool = False,
                 drop_last: bool = False, pin_memory: bool = False, prefetch_factor: int = 2,
                 rank: int | None = None, world_size: int | None = None, log_stats: bool = True):
        # Plain containers (not OmegaConf nodes) in the hparams: checkpoints then load with weights_only=True.
        hparams = {k: _plain(v) for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        self.save_hyperparameters(hparams)
        self.buckets = parse_buckets(hparams["buckets"])
        batch_size, val_batch_size = hparams["batch_size"], hparams["val_batch_size"]
        self.batch_size = dict(batch_size) if isinstance(batch_size, Mapping) else int(batch_size)
        self.val_batch_size = self.batch_size if val_batch_size is None else (
            dict(val_batch_size) if isinstance(val_batch_size, Mapping) else int(val_batch_size))
        # Validate what can be checked without touching the disk, so a bad config fails at instantiation.
        batch_sizes_per_bucket(self.batch_size, self.buckets)
        batch_sizes_per_bucket(self.val_batch_size, self.buckets)
        BucketAssigner(self.buckets, target_fps=target_fps, frame_stride=frame_stride, max_upscale=max_upscale)
        self.decoder = resolve_backend(decoder)
        if target_fps is not None and int(frame_stride) != 1:
            raise DataConfigError(f"data.target_fps={target_fps} and data.frame_stride={frame_stride}: set one of them")
        self.train_set: ShardSet | None = None
        self.val_set: ShardSet | None = None
        self._train_loader: ClipLoader | None = None
        self._val_loader: ClipLoader | None = None
        self._warned_uneven = False

    # ---- shards ---------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Resolve the shard lists (a missing folder stops here with one line naming the setting)."""
        hp = self.hparams
        train = resolve_shards(hp.train_shards, "data.train_shards")
        if hp.val_shards is not None:
            self.train_set, self.val_set = train, resolve_shards(hp.val_shards, "data.val_shards")
        else:
            self.train_set, self.val_set = split_validation(train, hp.val_split, "data.val_split")
        if self.trainer is not None and hp.log_stats:
            from vidgen.data.callbacks import DataStatsCallback

            if not any(isinstance(c, DataStatsCallback) for c in self.trainer.callbacks):
                self.trainer.callbacks.append(DataStatsCallback())

    def _workers_for(self, shards: ShardSet, rank: int, world: int, train: bool, setting: str) -> int:
        """DataLoader workers that will get at least one shard (warns when shards < world_size x num_workers)."""
        workers = int(self.hparams.num_workers)
        if self.hparams.resampled and train:
            return workers
        n = len(shards.urls)
        mine = len(range(rank, n, world))
        if mine == 0:
            msg = (f"{setting}: {n} shard(s) for world_size={world}: rank {rank} gets none; "
                   "re-shard into more (smaller) shards or set data.resampled=true")
            if train:
                raise DataConfigError(msg)
            log.warning(msg)
            return 0
        if workers > mine:
            log.warning("%s: %d shard(s) over world_size=%d x num_workers=%d: rank %d has %d shard(s), so it uses %d "
                        "worker(s) (each worker reads whole shards); make more shards to use every worker",
                        setting, n, world, workers, rank, mine, mine)
            return mine
        return workers

    # ---- loaders --------------------------------------------------------------------------------------------
    def _loader(self, shards: ShardSet, train: bool, setting: str) -> ClipLoader:
        hp = self.hparams
        rank, world = self._rank_world()
        resampled = bool(hp.resampled) and train
        if train and not resampled and world > 1 and not self._warned_uneven:
            self._warned_uneven = True
            log.warning("data.resampled=false with world_size=%d: ranks read disjoint shards and may end their epochs "
                        "at different steps; pace the run by max_steps, or set data.resampled=true", world)
        dataset = build_clip_dataset(
            shards.urls, buckets=self.buckets, batch_size=self.batch_size if train else self.val_batch_size,
            train=train, seed=hp.seed, target_fps=hp.target_fps, frame_stride=hp.frame_stride,
            max_upscale=hp.max_upscale, shuffle_buffer=hp.shuffle_buffer if train else 0, resampled=resampled,
            decoder=self.decoder, decoder_threads=hp.decoder_threads, require_caption=hp.require_caption,
            drop_last=hp.drop_last if train else False, rank=rank, world_size=world)
        epoch_fn = (lambda: self.trainer.current_epoch) if (train and self.trainer is not None) else None
        loader = ClipLoader(dataset, num_workers=self._workers_for(shards, rank, world, train, setting),
                            pin_memory=hp.pin_memory, prefetch_factor=hp.prefetch_factor, epoch_fn=epoch_fn)
        if resampled:
            loader.with_epoch(self.epoch_batches(shards, world))
        return loader

    def epoch_batches(self, shards: ShardSet, world_size: int) -> int:
        """Resampled epoch length per rank: num_samples // (batch_size * world_size), at least 1."""
        return resampled_epoch_batches(self.hparams.samples_per_epoch or shards.num_samples,
                                       batch_sizes_per_bucket(self.batch_size, self.buckets).values(), world_size,
                                       "the shards have no manifest.json with sample counts")

    def train_dataloader(self) -> ClipLoader:
        if self.train_set is None:
            self.setup("fit")
        self._train_loader = self._loader(self.train_set, train=True, setting="data.train_shards")
        self.apply_resume_position(self._train_loader)
        return self._train_loader

    def val_dataloader(self) -> ClipLoader | list:
        if self.train_set is None:
            self.setup("validate")
        if self.val_set is None:
            return []
        self._val_loader = self._loader(self.val_set, train=False, setting="data.val_shards")
        return self._val_loader

    # ---- counters -------------------------------------------------------------------------------------------
    def data_stats(self) -> dict[str, int]:
        """Train-loader drop counts on this rank as metrics: data/skipped_corrupt, data/dropped_<reason>."""
        return self._train_loader.stats.metrics() if self._train_loader is not None else {}
