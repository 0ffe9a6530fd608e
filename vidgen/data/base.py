"""ShardDataModule: what clip and latent shards share — shard resolution, the train/val split, the worker policy,
the resampled epoch length, drop-count logging and the loaders. Subclasses only build the per-pass dataset.

Two modes. Default (`resampled=false`): each pass reads every shard once, split over ranks then DataLoader
workers, so every sample is seen exactly once per epoch; it needs at least world_size x num_workers shards
(workers beyond the shards of a rank are dropped with a warning, and a training rank with no shard is an error).
Ranks may then yield different numbers of batches, which DDP training does not tolerate: use it for one process
or for validation. `resampled=true` (multi-node training): every rank and worker draws shards at random, forever,
and an epoch is `num_samples // (batch_size * world_size)` batches per rank (`samples_per_epoch` overrides
`num_samples`, which otherwise comes from the manifests).

A pass that yields no batch stops with one DataStarvedError line (see vidgen.data.starvation): after a whole
non-resampled pass, or after `max_empty_draws` resampled shard draws (or every shard drawn) with no sample kept.

Fine-tuning: `trigger` puts a word in front of every caption (train and validation); `sources` (instead of the
train shards) mixes several weighted shard sets, each with its own trigger (vidgen.data.mixing); a mixed training
stream is endless like a resampled one, and validation then reads `val_shards` only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import partial

import lightning.pytorch as pl

from vidgen.data.callbacks import DataStatsCallback
from vidgen.data.buckets import Bucket, batch_sizes_per_bucket
from vidgen.data.mixing import Source, check_trigger, mixed_stages, parse_sources, union
from vidgen.data.pipeline import ClipDataset, ClipLoader
from vidgen.data.position import DataPositionMixin
from vidgen.data.shards import DataConfigError, ShardSet, resampled_epoch_batches, resolve_shards, split_validation
from vidgen.data.starvation import StarveContext, clip_fixes, describe_shards

log = logging.getLogger(__name__)


def plain(value):
    """OmegaConf ListConfig/DictConfig -> list/dict (Hydra passes those); other values unchanged."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def _batch_size(value) -> int | dict:
    return dict(value) if isinstance(value, Mapping) else int(value)


class ShardDataModule(DataPositionMixin, pl.LightningDataModule):
    """Lightning data module over webdataset shards; batches of one shape, seeded per (seed, epoch), drops counted.

    Subclasses set `train_key` (their hyperparameter naming the training shards), `self.buckets` (at init or
    setup) and implement `build_dataset`; they may extend `setup`. Expected hyperparameters (their __init__
    passes its arguments as `hparams`): the train shards, val_shards, val_split, batch_size, val_batch_size,
    num_workers, shuffle_buffer, resampled, samples_per_epoch, seed, drop_last, pin_memory, prefetch_factor,
    max_empty_draws, rank, world_size, log_stats, trigger, sources.
    Drop counts: `data_stats()`, logged as data/skipped_corrupt, data/tar_errors, data/dropped_<reason>.
    """

    train_key = "train_shards"

    def __init__(self, hparams: Mapping):
        super().__init__()
        # Plain containers (not OmegaConf nodes) in the hparams: checkpoints then load with weights_only=True.
        self.save_hyperparameters({k: plain(v) for k, v in hparams.items() if k not in ("self", "__class__")})
        hp = self.hparams
        self.batch_size = _batch_size(hp.batch_size)
        self.val_batch_size = self.batch_size if hp.val_batch_size is None else _batch_size(hp.val_batch_size)
        if hp.max_empty_draws is not None and int(hp.max_empty_draws) < 1:
            raise DataConfigError(f"data.max_empty_draws={hp.max_empty_draws}: expected an integer >= 1 or null")
        self.trigger = check_trigger(hp.get("trigger"), "data.trigger")
        self.buckets: tuple[Bucket, ...] = ()
        self.mixture: tuple[Source, ...] | None = None  # data.sources, resolved at setup
        self.train_set: ShardSet | None = None
        self.val_set: ShardSet | None = None
        self._train_loader: ClipLoader | None = None
        self._warned_uneven = False

    @property
    def train_setting(self) -> str:
        return f"data.{self.train_key}"

    # ---- what subclasses provide ----------------------------------------------------------------------------
    def build_dataset(self, shards: ShardSet, *, train: bool, resampled: bool, rank: int, world_size: int,
                      context: StarveContext) -> ClipDataset:
        """The per-pass pipeline over `shards` (one-shape batches; `context` names the shards in errors)."""
        raise NotImplementedError

    def head(self, train: bool, rank: int, world_size: int):
        """The first stages of a training pipeline over `data.sources` (None: the plain shard list)."""
        if not train or self.mixture is None:
            return None
        hp = self.hparams
        return partial(mixed_stages, self.mixture, seed=hp.seed, shuffle_buffer=hp.shuffle_buffer, rank=rank,
                       world_size=world_size, max_empty_draws=hp.max_empty_draws)

    def drop_fixes(self, setting: str) -> dict[str, str]:
        """What to change per drop reason when no sample survives (see vidgen.data.starvation)."""
        return clip_fixes(setting)

    # ---- shards ---------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Resolve the shard lists (a missing folder stops here with one line naming the setting)."""
        hp = self.hparams
        if hp.get("sources"):
            if hp[self.train_key] is not None:
                raise DataConfigError(f"data.sources and {self.train_setting} are both set: list every shard set "
                                      f"in data.sources and set {self.train_setting}=null")
            self.mixture = parse_sources(hp.sources)
            train = union(self.mixture)
        else:
            train = resolve_shards(hp[self.train_key], self.train_setting)
        if hp.val_shards is not None:
            self.train_set, self.val_set = train, resolve_shards(hp.val_shards, "data.val_shards")
        elif self.mixture is not None:
            if hp.val_split:
                log.warning("data.val_split=%s is not used with data.sources (no validation); set data.val_shards "
                            "to validate", hp.val_split)
            self.train_set, self.val_set = train, None
        else:
            self.train_set, self.val_set = split_validation(train, hp.val_split, "data.val_split")
        if self.trainer is not None and hp.log_stats:
            if not any(isinstance(c, DataStatsCallback) for c in self.trainer.callbacks):
                self.trainer.callbacks.append(DataStatsCallback())

    def batch_sizes(self, train: bool = True) -> dict[Bucket, int]:
        """Batch size per bucket for the train (or validation) loader."""
        return batch_sizes_per_bucket(self.batch_size if train else self.val_batch_size, self.buckets)

    def num_workers_for(self, shards: ShardSet, rank: int, world: int, train: bool, setting: str) -> int:
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
        resampled = (bool(hp.resampled) or self.mixture is not None) and train  # a mixture is endless
        if train and not resampled and world > 1 and not self._warned_uneven:
            self._warned_uneven = True
            log.warning("data.resampled=false with world_size=%d: ranks read disjoint shards and may end their epochs "
                        "at different steps; pace the run by max_steps, or set data.resampled=true", world)
        context = StarveContext(setting, describe_shards(shards.urls), self.drop_fixes(setting),
                                role="train" if train else "validation")
        dataset = self.build_dataset(shards, train=train, resampled=resampled, rank=rank, world_size=world,
                                     context=context)
        held_out = not train and self.hparams.val_shards is None
        workers = self.num_workers_for(shards, rank, world, train,
                                       f"{setting} (held out by data.val_split)" if held_out else setting)
        epoch_fn = (lambda: self.trainer.current_epoch) if (train and self.trainer is not None) else None
        loader = ClipLoader(dataset, num_workers=workers, pin_memory=hp.pin_memory, prefetch_factor=hp.prefetch_factor,
                            epoch_fn=epoch_fn)
        if resampled:
            loader.with_epoch(self.epoch_batches(shards, world))
        return loader

    def epoch_batches(self, shards: ShardSet, world_size: int) -> int:
        """Resampled epoch length per rank: num_samples // (mean batch size * world_size), at least 1."""
        return resampled_epoch_batches(self.hparams.samples_per_epoch or shards.num_samples,
                                       self.batch_sizes(train=True).values(), world_size,
                                       "the shards have no manifest.json with sample counts")

    def train_dataloader(self) -> ClipLoader:
        if self.train_set is None:
            self.setup("fit")
        self._train_loader = self._loader(self.train_set, train=True, setting=self.train_setting)
        self.apply_resume_position(self._train_loader)
        return self._train_loader

    def val_dataloader(self) -> ClipLoader | list:
        if self.train_set is None:
            self.setup("validate")
        if self.val_set is None:
            return []
        setting = "data.val_shards" if self.hparams.val_shards is not None else self.train_setting  # held out
        return self._loader(self.val_set, train=False, setting=setting)

    # ---- counters -------------------------------------------------------------------------------------------
    def data_stats(self) -> dict[str, int]:
        """Train-loader drop counts on this rank as metrics: data/skipped_corrupt, data/dropped_<reason>."""
        return self._train_loader.stats.metrics() if self._train_loader is not None else {}
