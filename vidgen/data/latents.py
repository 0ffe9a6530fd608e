"""LatentDataModule: latent shards (data_prep/encode_latents.py) -> one-shape batches for DiT training.

Batches {"latent" [B, C, t, h, w], "text_emb" [B, L, D], "text_mask" [B, L], "caption", "key", "fps" [B]}
hold one latent shape; text is zero-padded to the batch's longest caption. The latent is a posterior sample
`mean + exp(logvar / 2) * eps` with eps seeded by (seed, epoch, key) (training), or the mean (validation, or
`sample_posterior=false`). Shard reading, node/worker split, shuffling, resampling and drop counting are the
clip pipeline's own stages (vidgen.data.pipeline); the sample format and the fingerprint check live in
vidgen.data.latent_shards (re-exported here).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Iterator

import lightning.pytorch as pl
import torch
import webdataset as wds

from vidgen.data.buckets import batch_sizes_per_bucket, parse_buckets
from vidgen.data.latent_shards import (FORMAT_VERSION, LATENT_MEMBER, MANIFEST_NAME, NULL_TEXT_NAME,  # noqa: F401
                                       SHARD_PATTERN, check_fingerprints, load_null_text, pack_sample,
                                       read_latent_manifest, save_null_text, unpack_sample)
from vidgen.data.pipeline import (ClipDataset, ClipLoader, NodeSplit, PipelineState, SampleShuffle, ShardSource,
                                  TarSamples)
from vidgen.data.shards import (DataConfigError, ShardSet, resampled_epoch_batches, resolve_shards,
                                 split_validation)
from vidgen.data.position import DataPositionMixin
from vidgen.data.stats import STATS_KEY, WorkerCounts
from vidgen.diffusion.flow import pad_tokens

log = logging.getLogger(__name__)


# ---- pipeline stages --------------------------------------------------------------------------------------------
def key_generator(seed: int, epoch: int, key: str) -> torch.Generator:
    """CPU generator fixed by (seed, epoch, key): a sample draws the same eps whichever worker reads it."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2 ** 63 - 1))


class LatentDecode:
    """Raw tar sample -> {"latent" [C, t, h, w], ["text_emb" [L, D], "text_mask" [L]], "caption", "key", "fps",
    "bucket"}; an unreadable sample is counted as `corrupt` and skipped."""

    def __init__(self, counts: WorkerCounts, state: PipelineState, *, sample_posterior: bool, seed: int,
                 use_text: bool = True):
        self.counts, self.state, self.sample_posterior, self.seed = counts, state, sample_posterior, seed
        self.use_text = use_text

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        for raw in src:
            key = raw.get("__key__", "?")
            try:
                tensors, meta = unpack_sample(raw)
            except Exception as e:  # safetensors raises its own error types for a damaged blob
                self.counts.add("corrupt", key, e)
                continue
            mean = tensors["mean"].float()
            z = mean
            if self.sample_posterior:  # q(z|x) sample, as the VAE-in-the-loop pipeline would draw it
                eps = torch.randn(mean.shape, generator=key_generator(self.seed, self.state.epoch, key))
                z = mean + torch.exp(0.5 * tensors["logvar"].float()) * eps
            out = {"latent": z, "caption": str(meta.get("caption") or ""), "key": key,
                   "fps": float(meta.get("fps") or 0.0), "bucket": "x".join(map(str, meta.get("bucket", ())))}
            if self.use_text and "text_emb" in tensors:
                out["text_emb"], out["text_mask"] = tensors["text_emb"].float(), tensors["text_mask"].bool()
            yield out


def collate_latents(samples: list[dict], text_pad_to: int | None = None) -> dict:
    """Samples of one latent shape -> batch (text zero-padded to the longest caption, or to `text_pad_to`)."""
    batch = {"latent": torch.stack([s["latent"] for s in samples]),
             "caption": [s["caption"] for s in samples], "key": [s["key"] for s in samples],
             "fps": torch.tensor([s["fps"] for s in samples], dtype=torch.float32)}
    if all("text_emb" in s for s in samples):
        length = max([s["text_emb"].shape[0] for s in samples] + [text_pad_to or 0])
        embs, masks = zip(*(pad_tokens(s["text_emb"][None], s["text_mask"][None], length) for s in samples))
        batch["text_emb"], batch["text_mask"] = torch.cat(embs), torch.cat(masks)
    return batch


class LatentBatcher:
    """Per-shape accumulators: a batch is yielded when a shape holds its bucket's batch size (as BucketBatcher)."""

    def __init__(self, batch_sizes: Mapping[str, int], counts: WorkerCounts, drop_last: bool = False,
                 text_pad_to: int | None = None):
        self.batch_sizes, self.counts, self.drop_last, self.text_pad_to = dict(batch_sizes), counts, drop_last, text_pad_to

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        self.counts.reset()
        pending: dict[tuple, list[dict]] = {}
        for sample in src:
            shape = tuple(sample["latent"].shape)
            group = pending.setdefault(shape, [])
            group.append(sample)
            if len(group) >= self.batch_sizes.get(sample["bucket"], self.batch_sizes["default"]):
                yield {**collate_latents(group, self.text_pad_to), STATS_KEY: self.counts.snapshot()}
                group.clear()
        if not self.drop_last:
            for shape in sorted(pending):
                if pending[shape]:
                    yield {**collate_latents(pending[shape], self.text_pad_to), STATS_KEY: self.counts.snapshot()}
        yield {STATS_KEY: self.counts.snapshot()}


def build_latent_dataset(urls: Sequence[str], *, batch_sizes: Mapping[str, int], train: bool, seed: int = 0,
                         sample_posterior: bool = True, use_text: bool = True, shuffle_buffer: int = 0,
                         resampled: bool = False, drop_last: bool = False, text_pad_to: int | None = None,
                         rank: int | None = None, world_size: int | None = None) -> ClipDataset:
    """Latent shard paths -> dataset of one-shape batches; batch_sizes {"TxHxW": n, "default": n}."""
    state, counts = PipelineState(), WorkerCounts()
    stages: list = [ShardSource(urls, state, shuffle=train, resampled=resampled, seed=seed, rank=rank,
                                world_size=world_size)]
    if not resampled:
        stages += [NodeSplit(rank, world_size), wds.split_by_worker]
    stages.append(TarSamples(counts))
    if shuffle_buffer > 1:
        stages.append(SampleShuffle(shuffle_buffer, state, seed, rank, world_size))
    stages.append(LatentDecode(counts, state, sample_posterior=sample_posterior and train, seed=seed,
                               use_text=use_text))
    stages.append(LatentBatcher(batch_sizes, counts, drop_last, text_pad_to))
    return ClipDataset(*stages, state=state, counts=counts)


# ---- the data module --------------------------------------------------------------------------------------------
class LatentDataModule(DataPositionMixin, pl.LightningDataModule):
    """Lightning data module over latent shards; checks at setup that they were made by the run's VAE.

    shards / val_shards / val_split: as ClipDataModule's train_shards / val_shards / val_split.
    expected_vae: the VAE export folder the DiT run uses; expected_text_encoder: the text encoder folder (byte
    export or HF) when the run trains on the precomputed text embeddings. check_fingerprint=false skips both.
    batch_size: int or {"TxHxW": n, "default": n} over the pixel buckets the latents were made from.
    sample_posterior: train on `mean + std * eps` (seeded per (seed, epoch, key)) instead of the mean.
    use_text_emb: yield text_emb / text_mask when the shards hold them; text_pad_to: pad them to >= this length.
    """

    def __init__(self, shards: str | Sequence[str], val_shards: str | Sequence[str] | None = None,
                 val_split: int | float | None = None, expected_vae: str | None = None,
                 expected_text_encoder: str | None = None, check_fingerprint: bool = True,
                 batch_size: int | Mapping = 8, val_batch_size: int | Mapping | None = None, num_workers: int = 0,
                 shuffle_buffer: int = 256, resampled: bool = False, samples_per_epoch: int | None = None,
                 seed: int = 0, sample_posterior: bool = True, use_text_emb: bool = True,
                 text_pad_to: int | None = None, drop_last: bool = False, pin_memory: bool = False,
                 prefetch_factor: int = 2, rank: int | None = None, world_size: int | None = None):
        from vidgen.data.datamodule import _plain

        hparams = {k: _plain(v) for k, v in locals().items() if k not in ("self", "__class__", "_plain")}
        super().__init__()
        self.save_hyperparameters(hparams)
        self.batch_size = _plain(batch_size)
        self.val_batch_size = self.batch_size if val_batch_size is None else _plain(val_batch_size)
        self.train_set: ShardSet | None = None
        self.val_set: ShardSet | None = None
        self.manifests: dict[str, dict] = {}
        self._checked = False
        self._train_loader: ClipLoader | None = None

    # ---- setup ----------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Resolve shards, read their manifests, check the VAE / text-encoder fingerprints (once)."""
        hp = self.hparams
        train = resolve_shards(hp.shards, "data.shards")
        val = resolve_shards(hp.val_shards, "data.val_shards") if hp.val_shards is not None else None
        self.manifests = {folder: read_latent_manifest(folder, "data.shards")
                          for folder in sorted({str(Path(u).parent) for u in train.urls + (val.urls if val else ())})}
        if val is None:
            train, val = split_validation(train, hp.val_split, "data.val_split")
        self.train_set, self.val_set = train, val
        buckets = parse_buckets(b for m in self.manifests.values() for b in m["options"]["buckets"])
        self._sizes = {name: self._sizes_for(bs, buckets) for name, bs in
                       (("train", self.batch_size), ("val", self.val_batch_size))}
        if not self._checked:
            self._check()
            self._checked = True
        if self.trainer is not None:  # log skip counts, as ClipDataModule does
            from vidgen.data.callbacks import DataStatsCallback

            if not any(isinstance(c, DataStatsCallback) for c in self.trainer.callbacks):
                self.trainer.callbacks.append(DataStatsCallback())

    @staticmethod
    def _sizes_for(batch_size, buckets) -> dict[str, int]:
        sizes = {b.key: n for b, n in batch_sizes_per_bucket(batch_size, buckets).items()}
        return {**sizes, "default": max(sizes.values())}

    def _check(self) -> None:
        hp = self.hparams
        if not hp.check_fingerprint:
            log.warning("data.check_fingerprint=false: not checking which VAE made %s", hp.shards)
            return
        if hp.expected_vae is None:
            raise DataConfigError("data.expected_vae is not set: set it to the VAE folder this DiT run decodes with "
                                  "(task.module.vae_path), or data.check_fingerprint=false to skip the check")
        text_in_shards = any(m.get("text_encoder") for m in self.manifests.values())
        if hp.use_text_emb and text_in_shards and hp.expected_text_encoder is None:
            log.warning("data.shards hold precomputed text embeddings but data.expected_text_encoder is not set: "
                        "their text encoder is not checked")
        check_fingerprints(self.manifests, hp.expected_vae,
                           hp.expected_text_encoder if hp.use_text_emb else None, "data.shards")

    def null_text(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The "" caption's embedding (emb [L0, D], mask [L0]) for CFG dropout, or None without text embeddings."""
        if not self.manifests:
            self.setup()
        for folder in self.manifests:
            found = load_null_text(folder)
            if found is not None:
                return found
        return None

    # ---- loaders --------------------------------------------------------------------------------------------
    def _loader(self, shards: ShardSet, train: bool, setting: str) -> ClipLoader:
        hp = self.hparams
        rank, world = self._rank_world()
        resampled = bool(hp.resampled) and train
        workers = int(hp.num_workers)
        if not resampled:  # each worker reads whole shards: more workers than this rank's shards would idle
            mine = len(range(rank, len(shards.urls), world))
            if mine == 0 and train:
                raise DataConfigError(f"{setting}: {len(shards.urls)} shard(s) for world_size={world}: rank {rank} "
                                      "gets none; encode into more shards or set data.resampled=true")
            workers = min(workers, mine)
        dataset = build_latent_dataset(
            shards.urls, batch_sizes=self._sizes["train" if train else "val"], train=train, seed=hp.seed,
            sample_posterior=hp.sample_posterior, use_text=hp.use_text_emb,
            shuffle_buffer=hp.shuffle_buffer if train else 0, resampled=resampled,
            drop_last=hp.drop_last if train else False, text_pad_to=hp.text_pad_to, rank=rank, world_size=world)
        epoch_fn = (lambda: self.trainer.current_epoch) if (train and self.trainer is not None) else None
        loader = ClipLoader(dataset, num_workers=workers, pin_memory=hp.pin_memory,
                            prefetch_factor=hp.prefetch_factor, epoch_fn=epoch_fn)
        if resampled:
            loader.with_epoch(self.epoch_batches(shards, world))
        return loader

    def epoch_batches(self, shards: ShardSet, world_size: int) -> int:
        """Resampled epoch length per rank: num_samples // (mean batch size * world_size), at least 1."""
        sizes = [v for k, v in self._sizes["train"].items() if k != "default"]
        return resampled_epoch_batches(self.hparams.samples_per_epoch or shards.num_samples, sizes, world_size,
                                       "the latent manifest has no sample counts")

    def train_dataloader(self) -> ClipLoader:
        if self.train_set is None:
            self.setup("fit")
        self._train_loader = self._loader(self.train_set, True, "data.shards")
        self.apply_resume_position(self._train_loader)
        return self._train_loader

    def val_dataloader(self) -> ClipLoader | list:
        if self.train_set is None:
            self.setup("validate")
        return [] if self.val_set is None else self._loader(self.val_set, False, "data.val_shards")

    def data_stats(self) -> dict[str, int]:
        """Train-loader skip counts on this rank as metrics (data/skipped_corrupt, ...)."""
        return self._train_loader.stats.metrics() if self._train_loader is not None else {}
