"""Fine-tuning data: a caption trigger word, weighted mixing of shard sets (drawn at their weights, resumed exactly),
and the refusal of a trigger on latent shards whose text embeddings were computed without it."""

from __future__ import annotations

import json
import math
import random
from itertools import islice
from pathlib import Path

import pytest

from data_prep.encode_latents import main as encode_main
from vidgen.data import ClipDataModule, DataConfigError
from vidgen.data.latents import LatentDataModule
from vidgen.data.mixing import SourceMix, WeightedChoice, parse_sources
from vidgen.data.pipeline import TRIGGER_KEY, PipelineState, with_trigger
from vidgen.data.stats import WorkerCounts
from vidgen.io.pretrained import save_pretrained
from vidgen.models.text import ByteTextEncoder

BUCKETS = [[9, 32, 32]]


def _captions(shards: Path) -> set[str]:
    """Every caption in the shards' samples (read from the tars, as the loader would)."""
    import webdataset as wds

    urls = sorted(str(p) for p in shards.glob("*.tar"))
    return {json.loads(s["json"])["caption"] for s in wds.WebDataset(urls, shardshuffle=False)}


def _clip_dm(**kwargs) -> ClipDataModule:
    args = dict(buckets=BUCKETS, batch_size=2, target_fps=15, rank=0, world_size=1, log_stats=False,
                shuffle_buffer=4)
    return ClipDataModule(**{**args, **kwargs})


def test_sources_are_drawn_at_their_weights(demo_shards):
    """2000 draws from three sources weighted 3:1:1 land on each within 4 standard errors of its share."""
    spec = [{"shards": str(demo_shards), "weight": 3, "trigger": "a"},
            {"shards": str(demo_shards), "weight": 1, "trigger": "b"}, {"shards": str(demo_shards), "weight": 1}]
    sources = parse_sources(spec)
    mix = SourceMix(sources, PipelineState(), WorkerCounts(), seed=0, shuffle_buffer=0, rank=0, world_size=1)
    n = 2000
    tags = [raw.get(TRIGGER_KEY) for raw in islice(mix(), n)]
    for tag, weight in (("a", 3), ("b", 1), (None, 1)):
        p = weight / 5
        freq = tags.count(tag) / n
        assert abs(freq - p) < 4 * math.sqrt(p * (1 - p) / n), (tag, freq, p)
    # The picker alone, on a fixed stream of uniforms: the same shares.
    rng, choice = random.Random(1), WeightedChoice([3, 1, 1])
    picks = [choice.pick(rng) for _ in range(n)]
    assert [round(picks.count(i) / n, 1) for i in range(3)] == [0.6, 0.2, 0.2]


def test_trigger_goes_in_front_of_every_caption(demo_shards):
    assert with_trigger("a cat", "sks") == "sks a cat" and with_trigger("", "sks") == "sks"
    assert with_trigger("sks a cat", "sks") == "sks a cat" and with_trigger("a cat", None) == "a cat"
    originals = _captions(demo_shards)
    dm = _clip_dm(train_shards=str(demo_shards), trigger="sks")
    dm.setup("fit")
    captions = [c for b in dm.train_dataloader() for c in b["caption"]]
    assert captions and all(c.startswith("sks ") and c[4:] in originals for c in captions)


def test_mixed_style_and_prior_sets_resume_exactly(demo_shards):
    """A style set (trigger) mixed with a prior-preservation set: both reach the batches, and a loader restored
    at a data position yields exactly the batches an uninterrupted one yields after it."""
    sources = [{"shards": str(demo_shards), "weight": 1, "trigger": "sks"}, {"shards": str(demo_shards), "weight": 1}]
    dm = _clip_dm(train_shards=None, sources=sources, samples_per_epoch=12)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == 6  # an endless mixture: the epoch is samples_per_epoch / batch_size batches
    batches = [(b["key"], b["caption"]) for b in loader]
    captions = [c for _, caps in batches for c in caps]
    assert any(c.startswith("sks ") for c in captions) and any(not c.startswith("sks ") for c in captions)

    resumed = _clip_dm(train_shards=None, sources=sources, samples_per_epoch=12)
    resumed.load_state_dict({"epoch": 0, "consumed": 2, "world_size": 1})
    resumed.setup("fit")
    assert [(b["key"], b["caption"]) for b in resumed.train_dataloader()] == batches[2:]


def test_bad_sources_are_one_line(demo_shards, tmp_path):
    good = {"shards": str(demo_shards)}
    cases = [([{**good, "weight": 0}], r"data.sources\[0\].weight=0: expected a number > 0"),
             ([good, {**good, "weigth": 2}], r"data.sources\[1\]: unknown key\(s\) weigth"),
             ([{"shards": str(tmp_path / "nope")}], r"data.sources\[0\].shards=.*nope'?: no such folder"),
             ([{**good, "trigger": ""}], r"data.sources\[0\].trigger='': expected a non-empty word"),
             ([], r"data.sources=\[\]: expected a list")]
    for spec, message in cases:
        with pytest.raises(DataConfigError, match=message):
            parse_sources(spec)
    with pytest.raises(DataConfigError, match="data.sources and data.train_shards are both set"):
        _clip_dm(train_shards=str(demo_shards), sources=[good]).setup("fit")


def test_trigger_on_latent_shards_with_text_embeddings_is_refused(demo_shards, tiny_vae_export, tmp_path):
    """Stored text embeddings were computed without the trigger: refused in one line; with use_text_emb=false
    the captions (with the trigger) are encoded by the run instead."""
    text = save_pretrained(ByteTextEncoder(dim=16, depth=1, num_heads=2, max_length=64), tmp_path / "text")
    out = tmp_path / "latents"
    assert encode_main(["--shards", str(demo_shards), "--vae", str(tiny_vae_export), "--text-encoder", "byte",
                        str(text), "--output", str(out), "--buckets", "9x32x32", "--target-fps", "15",
                        "--batch-size", "2", "--num-workers", "0", "--device", "cpu", "--no-progress"]) == 0

    def dm(**kwargs):
        return LatentDataModule(str(out), expected_vae=str(tiny_vae_export), expected_text_encoder=str(text),
                                batch_size=2, num_workers=0, resampled=False, rank=0, world_size=1, log_stats=False,
                                **kwargs)

    refused = (rf"data.trigger=sks: the latent shards at {out} hold text embeddings of their captions without the "
               r"trigger word; set data.use_text_emb=false")
    with pytest.raises(DataConfigError, match=refused):
        dm(trigger="sks").setup("fit")
    mixed = LatentDataModule(None, sources=[{"shards": str(out), "trigger": "sks"}], expected_vae=str(tiny_vae_export),
                             expected_text_encoder=str(text), rank=0, world_size=1, log_stats=False)
    with pytest.raises(DataConfigError, match=r"data.sources\[0\].trigger=sks: the latent shards"):
        mixed.setup("fit")
    ok = dm(trigger="sks", use_text_emb=False)
    ok.setup("fit")
    batches = list(ok.train_dataloader())
    assert batches and all("text_emb" not in b and all(c.startswith("sks ") for c in b["caption"]) for b in batches)
