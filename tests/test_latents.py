"""Latent shards: encode_latents on the demo clip shards, = direct VAE encode, DiT loss on latents = on the fly,
resume = uninterrupted, two ranks cover every sample once, and a run on another VAE's latents stops clearly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from functools import partial
from pathlib import Path

import pytest
import torch

from data_prep.encode_latents import main as encode_main
from vidgen.data.latents import LatentDataModule, load_null_text, unpack_sample
from vidgen.data.pipeline import build_clip_dataset
from vidgen.data.shards import DataConfigError, resolve_shards
from vidgen.io.fingerprint import fingerprint_folder, fingerprint_module
from vidgen.models.dit import DiT
from vidgen.models.text import ByteTextEncoder
from vidgen.models.vae import VideoVAE
from vidgen.io.pretrained import load_pretrained, save_pretrained

ROOT = Path(__file__).resolve().parents[1]
BUCKETS = ["9x32x32", "9x32x64", "1x32x32"]  # small square and wide buckets (latents 4x4, 4x8: DiT patch 2)
TEXT = dict(dim=24, depth=1, num_heads=2, max_length=64)


def _vae(folder: Path, seed: int) -> Path:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    torch.manual_seed(seed)
    vae = instantiate(OmegaConf.load(ROOT / "configs" / "model" / "vae" / "tiny.yaml"))
    vae.set_latent_stats(torch.rand(4) * 0.2 - 0.1, torch.rand(4) * 0.5 + 0.75)  # the normalisation must show
    return save_pretrained(vae, folder)


def _text(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    return save_pretrained(ByteTextEncoder(**TEXT), folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"vae": _vae(root / "vae", 0), "vae_other": _vae(root / "vae_other", 1),
            "text": _text(root / "text", 0), "text_other": _text(root / "text_other", 1)}


def _args(shards: Path, models: dict, out: Path, *extra: str) -> list[str]:
    return ["--shards", str(shards), "--vae", str(models["vae"]), "--text-encoder", "byte", str(models["text"]),
            "--output", str(out), "--buckets", *BUCKETS, "--target-fps", "15", "--batch-size", "2",
            "--num-workers", "0", "--device", "cpu", "--no-progress", *extra]


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, demo_shards, models) -> Path:
    out = tmp_path_factory.mktemp("latents")
    assert encode_main(_args(demo_shards, models, out)) == 0
    return out


@pytest.fixture(scope="module")
def clips(demo_shards) -> dict[str, dict]:
    """The clips the loader makes in validation mode (centred clip + crop): {key: {"video" [3,T,H,W], "caption"}}."""
    urls = resolve_shards(str(demo_shards)).urls
    ds = build_clip_dataset(urls, buckets=[b.split("x") for b in BUCKETS], batch_size=1, train=False,
                            target_fps=15, rank=0, world_size=1)
    return {b["key"][0]: {"video": b["video"][0], "caption": b["caption"][0]} for b in ds if "video" in b}


def _samples(folder: Path) -> dict[str, tuple[dict, dict]]:
    """{key: (tensors, json)} over every latent tar of a folder."""
    out = {}
    for tar in sorted(folder.glob("latents-*.tar")):
        with tarfile.open(tar) as f:
            members = {m.name: f.extractfile(m).read() for m in f.getmembers()}
        for name in members:
            if name.endswith(".json"):
                key = name[:-len(".json")]
                assert key not in out, f"{key} written twice"
                out[key] = unpack_sample({"latent.safetensors": members[f"{key}.latent.safetensors"],
                                          "json": members[name]})
    return out


# ---- encode_latents ---------------------------------------------------------------------------------------------
def test_counts_manifest_and_fingerprints(encoded, clips, models):
    manifest = json.loads((encoded / "manifest.json").read_text())
    assert clips and manifest["num_samples"] == len(clips) == len(_samples(encoded))
    assert sum(manifest["dropped"].values()) == 0  # every demo clip fits a bucket
    assert [s["name"] for s in manifest["shards"]] == [f"latents-r00-{i:06d}.tar" for i in range(4)]
    # The same fingerprint from the folder (encoder side) and from the built module (a training run).
    vae_fp = fingerprint_folder(models["vae"])
    assert manifest["vae"]["fingerprint"] == vae_fp == fingerprint_module(load_pretrained(models["vae"], VideoVAE))
    assert manifest["vae"]["fingerprint"] != fingerprint_folder(models["vae_other"])
    assert manifest["text_encoder"]["fingerprint"] == fingerprint_folder(models["text"])
    null_emb, null_mask = load_null_text(encoded)
    assert null_emb.shape == (2, TEXT["dim"]) and null_mask.all()  # BOS + EOS


def test_latents_equal_direct_vae_encode(encoded, clips, models):
    vae = load_pretrained(models["vae"], VideoVAE).eval()
    text = load_pretrained(models["text"], ByteTextEncoder).eval()
    stored = _samples(encoded)
    by_shape: dict[tuple, list[str]] = {}
    for key in sorted(stored):
        by_shape.setdefault(tuple(clips[key]["video"].shape), []).append(key)
    for keys in by_shape.values():  # one direct encode per bucket (batching does not change a sample's latent)
        with torch.no_grad():
            post = vae.encode(torch.stack([clips[k]["video"] for k in keys]), normalize=True)
        for j, key in enumerate(keys):
            tensors, meta = stored[key]
            with torch.no_grad():
                emb, mask = text([clips[key]["caption"]])
            assert meta["caption"] == clips[key]["caption"] and meta["bucket"] == list(clips[key]["video"].shape[1:])
            torch.testing.assert_close(tensors["mean"], post.mean[j], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(tensors["logvar"], post.logvar[j], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(tensors["text_emb"], emb[0], atol=1e-5, rtol=1e-4)
            assert tensors["text_mask"].all() and tensors["text_mask"].shape == mask[0].shape
    assert sum(map(len, by_shape.values())) == len(clips)


def _latent_dm(shards: Path, expected_vae: Path | None, **kw) -> LatentDataModule:
    kw = {"batch_size": 2, "shuffle_buffer": 0, "num_workers": 0, "rank": 0, "world_size": 1, **kw}
    manifest = json.loads((Path(shards) / "manifest.json").read_text()) if (Path(shards) / "manifest.json").is_file() \
        else {}
    if (manifest.get("text_encoder") or {}).get("path") and kw.get("use_text_emb", True):
        kw.setdefault("expected_text_encoder", manifest["text_encoder"]["path"])  # the encoder that made them
    return LatentDataModule(shards=str(shards), expected_vae=str(expected_vae) if expected_vae else None, **kw)


def _dit_module(models: dict):
    from vidgen.conditioning import Conditioner, TextCondition
    from vidgen.training.dit_module import DiTModule

    torch.manual_seed(0)
    dit = DiT(in_channels=4, dim=32, depth=2, num_heads=2, ffn_dim=64, text_dim=TEXT["dim"], freq_dim=32)
    with torch.no_grad():
        dit.proj_out.weight.normal_(0, 0.2)  # non-zero output, so the loss depends on the input
    encoder = load_pretrained(models["text"], ByteTextEncoder)
    encoder.trainable = False  # the encoder that made the shards' embeddings, frozen
    text = TextCondition(encoder, dropout=0.0)
    return DiTModule(dit, Conditioner(text=text), vae_path=str(models["vae"]),
                     optimizer=partial(torch.optim.AdamW, lr=1e-3))


def test_dit_loss_on_latent_batch_equals_on_the_fly(encoded, clips, models):
    """DiTModule: a latent-shard batch and the same clips as pixels (VAE + text encoder run here) give one loss."""
    module = _dit_module(models).eval()
    dm = _latent_dm(encoded, models["vae"], sample_posterior=False)
    dm.setup("fit")
    checked = 0
    for batch in dm.train_dataloader():
        pixels = {"video": torch.stack([clips[k]["video"] for k in batch["key"]]), "caption": batch["caption"]}
        gen = torch.Generator().manual_seed(checked)
        z = module.latents(batch, sample=False)
        t, noise = torch.rand(z.shape[0], generator=gen), torch.randn(z.shape, generator=gen)
        with torch.no_grad():
            on_latents = module.denoiser.loss(z, module.conditioner(batch), t=t, noise=noise)
            on_the_fly = module.denoiser.loss(module.latents(pixels, sample=False), module.conditioner(pixels),
                                              t=t, noise=noise)
        assert batch["latent"].shape[0] == len(batch["key"]) and batch["text_mask"].shape == batch["text_emb"].shape[:2]
        torch.testing.assert_close(on_latents, on_the_fly, rtol=1e-4, atol=1e-6)
        checked += 1
    assert checked >= 4


def test_posterior_sample_is_seeded(encoded, models):
    def first(seed: int) -> dict:
        dm = _latent_dm(encoded, models["vae"], seed=seed)
        dm.setup("fit")
        return {k: z for b in dm.train_dataloader() for k, z in zip(b["key"], b["latent"])}

    a, b, other = first(0), first(0), first(1)
    assert len(a) == 15
    mean = {k: s[0]["mean"] for k, s in _samples(encoded).items()}
    key = sorted(a)[0]
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], other[key])
    assert not torch.allclose(a[key], mean[key]) and (a[key] - mean[key]).abs().max() < 10  # mean + std * eps


def test_resampled_epoch_length(encoded, models):
    dm = _latent_dm(encoded, models["vae"], resampled=True, shuffle_buffer=4)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == 15 // 2 and len(list(loader)) == 15 // 2


def test_hf_text_encoder(demo_shards, models, tmp_path):
    """--text-encoder hf: embeddings = the frozen HF encoder's, fingerprinted over the folder's files."""
    pytest.importorskip("transformers")
    from test_text import _save_model, _tokenizer

    from vidgen.io.fingerprint import fingerprint_hf_folder
    from vidgen.models.text import HFTextEncoder

    hf = tmp_path / "t5"
    tokenizer = _tokenizer()
    tokenizer.save_pretrained(hf)
    _save_model("t5", hf, len(tokenizer))
    out = tmp_path / "latents"
    args = _args(demo_shards / "clips-000000.tar", models, out, "--text-max-length", "16")
    args[args.index("byte"):args.index("byte") + 2] = ["hf", str(hf)]
    assert encode_main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["text_encoder"]["kind"] == "hf" and manifest["text_encoder"]["fingerprint"] == fingerprint_hf_folder(hf)
    encoder = HFTextEncoder(str(hf), max_length=16)
    for tensors, meta in _samples(out).values():
        emb, mask = encoder([meta["caption"]])
        torch.testing.assert_close(tensors["text_emb"], emb[0][mask[0]], atol=1e-5, rtol=1e-4)
    _latent_dm(out, models["vae"], expected_text_encoder=str(hf)).setup("fit")
    with pytest.raises(DataConfigError, match="text embeddings were made by text encoder"):
        _latent_dm(out, models["vae"], expected_text_encoder=str(models["text"])).setup("fit")


# ---- resume and ranks ------------------------------------------------------------------------------------------
def _tar_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("latents-*.tar"))}


def test_resume_rewrites_only_the_missing_shard_identically(encoded, demo_shards, models, tmp_path):
    out = tmp_path / "latents"
    shutil.copytree(encoded, out)
    before = _tar_bytes(out)
    last = sorted(out.glob("latents-*.tar"))[-1]
    # What a kill during the last shard leaves: no marker, no final tar, a temp file, no manifest.
    last.unlink()
    (out / ".done" / "000003.json").unlink()
    (out / "manifest.json").unlink()
    (out / f".{last.name}.abc123.tmp").write_bytes(b"partial")
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("latents-*.tar")}
    assert encode_main(_args(demo_shards, models, out)) == 0
    assert _tar_bytes(out) == before
    assert all(p.stat().st_mtime_ns == mtimes[p.name] for p in out.glob("latents-*.tar") if p.name in mtimes)
    assert not list(out.glob(".*.tmp"))
    assert json.loads((out / "manifest.json").read_text()) == json.loads((encoded / "manifest.json").read_text())


def test_other_settings_in_the_same_output_are_refused(encoded, demo_shards, models, capsys):
    assert encode_main(_args(demo_shards, {**models, "vae": models["vae_other"]}, encoded)) == 2
    assert "other settings" in capsys.readouterr().err


def test_two_ranks_write_disjoint_shard_sets_covering_every_sample(encoded, demo_shards, models, tmp_path):
    out = tmp_path / "latents2"
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"}
        args = _args(demo_shards, models, out, "--num-workers", str(2 * rank))  # output independent of workers
        procs.append(subprocess.Popen([sys.executable, "data_prep/encode_latents.py", *args],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    names = sorted((p.name for p in out.glob("latents-*.tar")), key=lambda n: n[-10:])  # by input shard
    assert names == ["latents-r00-000000.tar", "latents-r01-000001.tar", "latents-r00-000002.tar",
                     "latents-r01-000003.tar"]
    single, split = _samples(encoded), _samples(out)  # _samples asserts no key is written twice
    assert sorted(split) == sorted(single)
    for key, (tensors, meta) in split.items():
        torch.testing.assert_close(tensors["mean"], single[key][0]["mean"], atol=1e-5, rtol=1e-4)
        assert meta == single[key][1]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == len(single) and [s["name"] for s in manifest["shards"]] == names


# ---- the fingerprint check -------------------------------------------------------------------------------------
def test_latents_of_another_vae_stop_with_one_clear_line(encoded, models):
    with pytest.raises(DataConfigError, match=r"latents were made by VAE \w+ .* but data.expected_vae=.* is \w+; "
                                              r"re-run data_prep/encode_latents.py"):
        _latent_dm(encoded, models["vae_other"]).setup("fit")
    with pytest.raises(DataConfigError, match="text embeddings were made by text encoder"):
        _latent_dm(encoded, models["vae"], expected_text_encoder=str(models["text_other"])).setup("fit")
    with pytest.raises(DataConfigError, match="data.expected_vae is not set"):
        _latent_dm(encoded, None).setup("fit")
    _latent_dm(encoded, models["vae"], expected_text_encoder=str(models["text"])).setup("fit")  # the right ones pass


def test_training_run_on_latents(encoded, models, tmp_path):
    """Lightning fit: one step on latent shards with the matching VAE; the other VAE stops before any step."""
    import lightning.pytorch as pl

    def fit(vae: Path):
        trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                             limit_val_batches=0)
        module = _dit_module(models)
        trainer.fit(module, datamodule=_latent_dm(encoded, vae))
        return trainer

    assert fit(models["vae"]).global_step == 1
    with pytest.raises(DataConfigError, match="latents were made by VAE"):
        fit(models["vae_other"])


# ---- batches, buckets, the README's latent command ------------------------------------------------------------
def test_latent_batches_carry_the_shards_null_text(encoded, models):
    """Every batch with text embeddings also holds the shards' own "" embedding (unbatched), for CFG dropout."""
    null_emb, null_mask = load_null_text(encoded)
    dm = _latent_dm(encoded, models["vae"])
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert batches and not hasattr(dm, "null_text")
    for b in batches:
        assert set(b) == {"latent", "caption", "key", "fps", "text_emb", "text_mask", "text_null_emb", "text_null_mask"}
        assert torch.equal(b["text_null_emb"], null_emb) and torch.equal(b["text_null_mask"], null_mask)
        assert b["text_null_emb"].shape == (2, TEXT["dim"]) and b["text_null_mask"].dtype == torch.bool
    dm = _latent_dm(encoded, models["vae"], use_text_emb=False)
    dm.setup("fit")
    assert all(set(b) == {"latent", "caption", "key", "fps"} for b in dm.train_dataloader())


def test_buckets_come_from_the_manifest(encoded, models, caplog):
    """An experiment's clip buckets (data.buckets) do not apply to latents: warned, the shards' buckets are used."""
    dm = _latent_dm(encoded, models["vae"], buckets=[[49, 320, 576], [1, 416, 416]])
    with caplog.at_level("WARNING", logger="vidgen.data.latents"):
        dm.setup("fit")
    assert sorted(b.key for b in dm.buckets) == sorted(BUCKETS)
    assert "data.buckets=['1x416x416', '49x320x576'] is not used with latent shards" in caplog.text
    assert len(list(dm.train_dataloader())) > 0
    with pytest.raises(DataConfigError, match=r"data.batch_size: keys \['49x320x576'\] name no bucket"):
        _latent_dm(encoded, models["vae"], batch_size={"49x320x576": 2, "default": 4}).setup("fit")


@pytest.mark.timeout(300)
def test_readme_latent_command_trains(encoded, models, tmp_path):
    """README: `train.py experiment=dit_pretrain data=latents data.shards=... task.module.vae_path=...` composes
    (dit_pretrain sets data.buckets) and trains; the rest shrinks the model / run to seconds on a CPU."""
    from runs import train

    readme = ["experiment=dit_pretrain", "data=latents", f"data.shards={encoded}",
              f"task.module.vae_path={models['vae']}"]
    tiny = ["trainer=cpu", "logger=none", "~callbacks.sample_logging", "trainer.max_steps=2",
            "trainer.enable_progress_bar=false", "data.num_workers=1", "model.dit.dim=32", "model.dit.depth=2",
            "model.dit.num_heads=2", "model.dit.ffn_dim=64", "model.dit.freq_dim=32", f"model.text.dim={TEXT['dim']}",
            "model.text.depth=1", "model.text.num_heads=2"]
    refused = train(readme + tiny, tmp_path, timeout=240, check=False)  # byte-encoder embeddings, fresh encoder
    errors = [ln for ln in refused.stderr.splitlines() if ln.startswith("error: ")]
    assert refused.returncode == 2 and len(errors) == 1 and "data.use_text_emb=false" in errors[0], refused.stderr
    out = train(readme + tiny + ["data.use_text_emb=false"], tmp_path, timeout=240)
    assert "max_steps=2` reached" in out.stdout + out.stderr
    assert "is not used with latent shards" in out.stdout + out.stderr
    assert (tmp_path / "runs" / "dit_pretrain" / "checkpoints" / "last.ckpt").is_file()
