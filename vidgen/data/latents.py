"""LatentDataModule: latent shards (data_prep/encode_latents.py) -> one-shape LatentBatch dicts for DiT training.

Batches {"latent" [B, C, t, h, w], "caption", "key", "fps" [B], and with text embeddings in the shards "text_emb"
[B, L, D], "text_mask" [B, L], "text_null_emb" [L0, D], "text_null_mask" [L0]} hold one latent shape; text is
zero-padded to the batch's longest caption. The latent is a posterior sample `mean + exp(logvar / 2) * eps` with
eps seeded by (seed, epoch, key) (training), or the mean (validation, or `sample_posterior=false`). Shard reading,
node/worker split, shuffling, resampling and drop counting are the clip pipeline's own stages; shards, split,
workers and loaders are vidgen.data.base.ShardDataModule's; the sample format and the fingerprint check live in
vidgen.data.latent_shards.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from vidgen.data.base import ShardDataModule
from vidgen.data.batches import LatentBatch
from vidgen.data.buckets import parse_buckets
from vidgen.data.latent_shards import check_fingerprints, load_null_text, read_latent_manifest, unpack_sample
from vidgen.data.pipeline import (TRIGGER_KEY, Batcher, ClipDataset, Head, PipelineState, SampleDrop,
                                  SampleTransform, SkipKeys, source_stages, with_trigger, worker_counts)
from vidgen.io.fingerprint import short
from vidgen.data.shards import DataConfigError, ShardSet
from vidgen.data.starvation import StarveContext, describe_shards, latent_fixes
from vidgen.data.stats import WorkerCounts
from vidgen.diffusion.flow import pad_tokens

log = logging.getLogger(__name__)

NullText = tuple[torch.Tensor, torch.Tensor]  # ("" caption emb [L0, D], mask [L0])


# ---- pipeline stages --------------------------------------------------------------------------------------------
def key_generator(seed: int, epoch: int, key: str) -> torch.Generator:
    """CPU generator fixed by (seed, epoch, key): a sample draws the same eps whichever worker reads it."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2 ** 63 - 1))


class LatentDecode(SampleTransform):
    """Raw tar sample -> {"latent" [C, t, h, w], ["text_emb" [L, D], "text_mask" [L]], "caption", "key", "fps",
    "bucket"}; an unreadable sample is counted as `corrupt` and skipped."""

    def __init__(self, counts: WorkerCounts, state: PipelineState, *, sample_posterior: bool, seed: int,
                 use_text: bool = True):
        self.counts, self.state, self.sample_posterior, self.seed = counts, state, sample_posterior, seed
        self.use_text = use_text

    def transform(self, raw: dict, key: str) -> dict:
        tensors, meta = unpack_sample(raw)  # ValueError / safetensors errors: counted as corrupt
        mean = tensors["mean"].float()
        z = mean
        if self.sample_posterior:  # q(z|x) sample, as the VAE-in-the-loop pipeline would draw it
            eps = torch.randn(mean.shape, generator=key_generator(self.seed, self.state.epoch, key))
            z = mean + torch.exp(0.5 * tensors["logvar"].float()) * eps
        caption = with_trigger(str(meta.get("caption") or ""), raw.get(TRIGGER_KEY))  # a style set's trigger word
        out = {"latent": z, "caption": caption, "key": key,
               "fps": float(meta.get("fps") or 0.0), "bucket": "x".join(map(str, meta.get("bucket", ())))}
        if self.use_text and "text_emb" in tensors:
            if "text_mask" not in tensors:
                raise SampleDrop("corrupt", "latent.safetensors has text_emb but no text_mask")
            out["text_emb"], out["text_mask"] = tensors["text_emb"].float(), tensors["text_mask"].bool()
        return out


def collate_latents(samples: list[dict], text_pad_to: int | None = None,
                    null_text: NullText | None = None) -> LatentBatch:
    """Samples of one latent shape -> LatentBatch (text zero-padded to the longest caption, or to `text_pad_to`;
    the shards' null-caption embedding added alongside the text embeddings)."""
    batch: LatentBatch = {"latent": torch.stack([s["latent"] for s in samples]),
                          "caption": [s["caption"] for s in samples], "key": [s["key"] for s in samples],
                          "fps": torch.tensor([s["fps"] for s in samples], dtype=torch.float32)}
    if all("text_emb" in s for s in samples):
        length = max([s["text_emb"].shape[0] for s in samples] + [text_pad_to or 0])
        embs, masks = zip(*(pad_tokens(s["text_emb"][None], s["text_mask"][None], length) for s in samples))
        batch["text_emb"], batch["text_mask"] = torch.cat(embs), torch.cat(masks)
        if null_text is not None:
            batch["text_null_emb"], batch["text_null_mask"] = null_text
    return batch


class LatentBatcher(Batcher):
    """Latent samples grouped by latent shape; batch sizes {"TxHxW": n, "default": n} by the pixel bucket."""

    def __init__(self, batch_sizes: Mapping[str, int], counts: WorkerCounts, drop_last: bool = False,
                 text_pad_to: int | None = None, null_text: NullText | None = None):
        super().__init__(counts, drop_last)
        self.batch_sizes, self.text_pad_to, self.null_text = dict(batch_sizes), text_pad_to, null_text

    def group(self, sample: dict) -> tuple[int, ...]:
        return tuple(sample["latent"].shape)

    def size(self, sample: dict) -> int:
        return self.batch_sizes.get(sample["bucket"], self.batch_sizes["default"])

    def collate(self, samples: list[dict]) -> LatentBatch:
        return collate_latents(samples, self.text_pad_to, self.null_text)


def build_latent_dataset(urls: Sequence[str], *, batch_sizes: Mapping[str, int], train: bool, seed: int = 0,
                         sample_posterior: bool = True, use_text: bool = True, shuffle_buffer: int = 0,
                         resampled: bool = False, drop_last: bool = False, text_pad_to: int | None = None,
                         rank: int | None = None, world_size: int | None = None, null_text: NullText | None = None,
                         max_empty_draws: int | None = 50, context: StarveContext | None = None,
                         trigger: str | None = None, head: Head | None = None) -> ClipDataset:
    """Latent shard paths -> dataset of one-shape LatentBatch dicts; batch_sizes {"TxHxW": n, "default": n}.

    trigger / head: as `build_clip_dataset` (a caption trigger word; the stages up to raw samples)."""
    state = PipelineState()
    context = context or StarveContext("data.shards", describe_shards(urls), latent_fixes("data.shards"))
    counts = worker_counts(urls, resampled, max_empty_draws, context)
    stages = head(state, counts) if head is not None else source_stages(
        urls, state, counts, train=train, seed=seed, shuffle_buffer=shuffle_buffer, resampled=resampled, rank=rank,
        world_size=world_size, trigger=trigger)
    stages.append(SkipKeys(state))
    stages.append(LatentDecode(counts, state, sample_posterior=sample_posterior and train, seed=seed,
                               use_text=use_text))
    stages.append(LatentBatcher(batch_sizes, counts, drop_last, text_pad_to, null_text if use_text else None))
    return ClipDataset(*stages, state=state, counts=counts)


# ---- the data module --------------------------------------------------------------------------------------------
class LatentDataModule(ShardDataModule):
    """Lightning data module over latent shards; checks at setup that they were made by the run's VAE.

    shards / val_shards / val_split: as ClipDataModule's train_shards / val_shards / val_split.
    expected_vae: the VAE export folder the DiT run uses; expected_text_encoder: the text encoder folder (byte
    export or HF) when the run trains on the precomputed text embeddings. check_fingerprint=false skips both.
    batch_size: int, {"TxHxW": n, "default": n} or a token budget, over the pixel buckets the latents were made from.
    buckets: the shards' buckets come from their manifest (fixed at encoding); a different list here (e.g. an
    experiment's clip buckets) is not used, with a warning.
    sample_posterior: train on `mean + std * eps` (seeded per (seed, epoch, key)) instead of the mean.
    use_text_emb: yield text_emb / text_mask (and the shards' null text_null_emb / text_null_mask) when the shards
    hold them; text_pad_to: pad text_emb / text_mask to >= this length.
    trigger / sources: as ClipDataModule; a trigger word needs the captions encoded by the run (shards without text
    embeddings, or use_text_emb=false): embeddings stored without it are refused at setup.
    The rest: as ClipDataModule (vidgen.data.base).
    """

    train_key = "shards"

    def __init__(self, shards: str | Sequence[str], val_shards: str | Sequence[str] | None = None,
                 val_split: int | float | None = None, expected_vae: str | None = None,
                 expected_text_encoder: str | None = None, check_fingerprint: bool = True,
                 batch_size: int | Mapping = 8, val_batch_size: int | Mapping | None = None, num_workers: int = 0,
                 shuffle_buffer: int = 256, resampled: bool = False, samples_per_epoch: int | None = None,
                 seed: int = 0, sample_posterior: bool = True, use_text_emb: bool = True,
                 text_pad_to: int | None = None, drop_last: bool = False, pin_memory: bool = False,
                 prefetch_factor: int = 2, buckets: Sequence | None = None, max_empty_draws: int | None = 50,
                 rank: int | None = None, world_size: int | None = None, log_stats: bool = True,
                 trigger: str | None = None, sources: Sequence[Mapping] | None = None):
        super().__init__(locals())
        if buckets is not None:
            parse_buckets(self.hparams.buckets)  # a malformed list still fails at instantiation
        self.manifests: dict[str, dict] = {}
        self._null: NullText | None = None
        self._checked = False

    # ---- setup ----------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Resolve shards, read their manifests (buckets, null text), check VAE / text-encoder fingerprints (once)."""
        super().setup(stage)
        urls = self.train_set.urls + (self.val_set.urls if self.val_set is not None else ())
        self.manifests = {folder: read_latent_manifest(folder, self.train_setting)
                          for folder in sorted({str(Path(u).parent) for u in urls})}
        self.buckets = self._shard_buckets()
        for train in (True, False):
            try:
                self.batch_sizes(train)
            except ValueError as e:
                raise DataConfigError(f"data.{'' if train else 'val_'}{e}; those are the latent shards' buckets, "
                                      "fixed at encoding") from None
        self._null = self._null_text()
        self._check_trigger()
        if not self._checked:
            self._check()
            self._checked = True

    def _shard_buckets(self):
        try:
            found = parse_buckets(b for m in self.manifests.values() for b in m["options"]["buckets"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataConfigError(f"{self.train_setting}: a latent manifest.json lists no valid options.buckets "
                                  f"({type(e).__name__}: {e}); re-run data_prep/encode_latents.py") from None
        if self.hparams.buckets is not None and parse_buckets(self.hparams.buckets) != found:
            log.warning("data.buckets=%s is not used with latent shards: their shapes were fixed when they were "
                        "encoded (data_prep/encode_latents.py --buckets); training on their buckets %s",
                        [b.key for b in parse_buckets(self.hparams.buckets)], [b.key for b in found])
        return found

    def _null_text(self) -> NullText | None:
        """The shards' "" caption embedding (the same in every folder), or None without text embeddings."""
        if not self.hparams.use_text_emb:
            return None
        found = [(folder, null) for folder in self.manifests if (null := load_null_text(folder)) is not None]
        if not found:
            return None
        (first, (emb, mask)), rest = found[0], found[1:]
        for folder, (e, m) in rest:
            if e.shape != emb.shape or not torch.equal(e, emb) or not torch.equal(m, mask):
                raise DataConfigError(f"{self.train_setting}: {first} and {folder} hold different null-caption "
                                      "embeddings (null_text.safetensors), so their text embeddings come from "
                                      "different text encoders; train on shards of one text encoder")
        return emb, mask

    def _check_trigger(self) -> None:
        """A trigger word cannot enter captions whose text embeddings were computed without it: refuse those."""
        triggers = [(s.name + ".trigger", s.trigger) for s in self.mixture or () if s.trigger]
        if self.trigger:
            triggers.insert(0, ("data.trigger", self.trigger))
        stored = [folder for folder, m in self.manifests.items() if m.get("text_encoder")]
        if triggers and stored and self.hparams.use_text_emb:
            setting, word = triggers[0]
            raise DataConfigError(f"{setting}={word}: the latent shards at {stored[0]} hold text embeddings of "
                                  f"their captions without the trigger word; set data.use_text_emb=false to encode "
                                  f"the captions (with {word!r}) with the run's text encoder")

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
            made = next(m["text_encoder"] for m in self.manifests.values() if m.get("text_encoder"))
            raise DataConfigError(
                f"{self.train_setting}: the shards hold text embeddings of the text encoder at {made.get('path')} "
                f"({short(made.get('fingerprint'))}), but this run's text encoder is not that one (no "
                f"data.expected_text_encoder): train with it (model/text=hf model.text.path={made.get('path')}) or "
                f"set data.use_text_emb=false to encode the captions with the run's own encoder")
        check_fingerprints(self.manifests, hp.expected_vae,
                           hp.expected_text_encoder if hp.use_text_emb else None, self.train_setting)

    # ---- loaders --------------------------------------------------------------------------------------------
    def drop_fixes(self, setting: str) -> dict[str, str]:
        return latent_fixes(setting)

    def build_dataset(self, shards: ShardSet, *, train: bool, resampled: bool, rank: int, world_size: int,
                      context: StarveContext) -> ClipDataset:
        hp = self.hparams
        sizes = {b.key: n for b, n in self.batch_sizes(train).items()}
        return build_latent_dataset(
            shards.urls, batch_sizes={**sizes, "default": max(sizes.values())}, train=train, seed=hp.seed,
            sample_posterior=hp.sample_posterior, use_text=hp.use_text_emb,
            shuffle_buffer=hp.shuffle_buffer if train else 0, resampled=resampled,
            drop_last=hp.drop_last if train else False, text_pad_to=hp.text_pad_to, rank=rank, world_size=world_size,
            null_text=self._null, max_empty_draws=hp.max_empty_draws, context=context, trigger=self.trigger,
            head=self.head(train, rank, world_size))
