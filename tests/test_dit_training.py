"""DiT training: the Lightning module on real demo batches, deterministic validation, the latent-batch path,
and memorisation of two real clips (train -> sample with the very pipeline sample.py uses)."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import pytest
import torch

from vidgen.data import Bucket, ClipDataModule, to_bucket
from vidgen.io.video import read_video
from vidgen.models.dit import DiT
from vidgen.models.text import ByteTextEncoder
from vidgen.models.vae import VideoVAE
from vidgen.conditioning import Conditioner, TextCondition
from vidgen.io.fingerprint import fingerprint_folder
from vidgen.pipeline import DiTPipeline
from vidgen.training.dit_module import DiTModule
from vidgen.training.schedule import warmup_schedule
from vidgen.io.pretrained import save_pretrained

LATENT_CHANNELS = 4
TINY_VAE = dict(latent_channels=LATENT_CHANNELS, base_channels=8, channel_mult=(1, 2, 2, 2), num_res_blocks=1)


def clip_frames(demo_clips_dir: Path, name: str, frames: int = 5, size: int = 32) -> torch.Tensor:
    """The first `frames` frames of a demo clip, cover-resized + centre-cropped: [3, T, size, size] in [-1, 1]."""
    video, _ = read_video(demo_clips_dir / name)
    return to_bucket(video[:frames], Bucket(frames, size, size))


def make_tiny_vae_export(folder: Path, clips: torch.Tensor) -> Path:
    """A random (untrained) tiny VideoVAE export with latent statistics measured on `clips` [B, 3, T, H, W]."""
    torch.manual_seed(0)
    vae = VideoVAE(**TINY_VAE).eval()
    with torch.no_grad():
        z = vae.encode(clips).mode()  # [B, C, t, h, w]
    vae.set_latent_stats(z.mean(dim=(0, 2, 3, 4)), z.std(dim=(0, 2, 3, 4)))
    return save_pretrained(vae, folder)


@pytest.fixture(scope="module")
def two_clips(demo_clips_dir) -> torch.Tensor:
    """bikes and bigbuckbunny, 5 frames at 32x32: [2, 3, 5, 32, 32]."""
    return torch.stack([clip_frames(demo_clips_dir, "bikes.mp4"), clip_frames(demo_clips_dir, "bigbuckbunny.mp4")])


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory, two_clips) -> Path:
    return make_tiny_vae_export(tmp_path_factory.mktemp("tiny_vae"), two_clips)


@pytest.fixture(scope="module")
def demo_batch(demo_shards) -> dict:
    dm = ClipDataModule(demo_shards, val_split=1, buckets=[[5, 32, 32]], batch_size=2, rank=0, world_size=1,
                        log_stats=False)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def make_module(vae_path, dim: int = 32, text_dim: int = 32, cfg_dropout: float = 0.1, **kwargs) -> DiTModule:
    torch.manual_seed(0)
    dit = DiT(in_channels=LATENT_CHANNELS, dim=dim, depth=2, num_heads=2, ffn_dim=2 * dim, text_dim=text_dim,
              freq_dim=32)
    text = ByteTextEncoder(dim=text_dim, depth=1, num_heads=2, max_length=32)
    return DiTModule(dit, Conditioner(text=TextCondition(text, dropout=cfg_dropout)), str(vae_path),
                     optimizer=partial(torch.optim.AdamW, lr=1e-3), **kwargs)


def test_training_step_on_demo_batch(tiny_vae_dir, demo_batch):
    module = make_module(tiny_vae_dir, cond_prob=0.5, max_cond_frames=1)
    assert demo_batch["video"].shape[1:] == (3, 5, 32, 32)
    opt = module.configure_optimizers()
    for _ in range(2):  # the DiT's output layer starts at zero: gradients reach the text encoder from step 2 on
        opt.zero_grad()
        loss = module.training_step(demo_batch, 0)
        assert torch.isfinite(loss) and loss.item() > 0
        loss.backward()
        opt.step()
    grads = {n: p.grad for n, p in module.named_parameters()}
    assert grads["dit.proj_out.weight"] is not None and grads["dit.proj_out.weight"].abs().sum() > 0
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("conditioner."))
    # The frozen VAE is neither trained nor saved: only DiT + text encoder weights are in the state dict.
    assert {k.split(".")[0] for k in module.state_dict()} == {"dit", "conditioner"}
    described = module.checkpoint_description()
    assert described["meta"]["vae"]["fingerprint"] == fingerprint_folder(tiny_vae_dir)
    assert set(described["parts"]) == {"dit", "cond.text"}


def test_hyperparameters_are_plain(tiny_vae_dir):
    from omegaconf import OmegaConf

    module = make_module(tiny_vae_dir, val_t=OmegaConf.create([0.25, 0.75]))
    hp = dict(module.hparams)
    assert hp["val_t"] == [0.25, 0.75] and type(hp["val_t"]) is list and type(hp["flow"]) is dict
    assert not any(isinstance(v, torch.nn.Module) or callable(v) for v in hp.values())


def test_validation_loss_is_deterministic(tiny_vae_dir, demo_batch):
    module = make_module(tiny_vae_dir).eval()
    with torch.no_grad():
        first, second = module.validation_step(demo_batch, 3), module.validation_step(demo_batch, 3)
        other = module.validation_step(demo_batch, 4)  # another batch index draws other noise
    assert set(first) == {"val/loss", "val/loss_t0.1", "val/loss_t0.3", "val/loss_t0.5", "val/loss_t0.7",
                          "val/loss_t0.9"}
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["val/loss"], other["val/loss"])


def test_latent_batch_equals_video_batch(tiny_vae_dir, demo_batch):
    """Latent-shard batches (latent + text embeddings) give the same loss as encoding on the fly."""
    module = make_module(tiny_vae_dir).eval()
    encoder = module.conditioner.entries["text"].encoder
    encoder.trainable = False  # precomputed embeddings come from a frozen encoder (the one that made them)
    module.conditioner.entries["text"] = TextCondition(encoder, dropout=0.1)
    with torch.no_grad():
        module.dit.proj_out.weight.normal_(0, 0.2)  # a non-zero output: the loss depends on latents and text
        z = module.vae.encode(demo_batch["video"], normalize=True).mode()
        text = module.conditioner.entries["text"].encode(demo_batch["caption"])
        ref = module.validation_step(demo_batch, 0)
        from_latent = module.validation_step({"latent": z, "caption": demo_batch["caption"]}, 0)
        from_emb = module.validation_step({"latent": z, "text_emb": text["context"],
                                           "text_mask": text["context_mask"]}, 0)
        other_text = module.validation_step({"latent": z, "caption": ["something else"] * z.shape[0]}, 0)
    for k in ref:
        torch.testing.assert_close(from_latent[k], ref[k], rtol=0, atol=0)
        torch.testing.assert_close(from_emb[k], ref[k], rtol=1e-6, atol=1e-7)
    assert not torch.equal(other_text["val/loss"], ref["val/loss"])  # the text does reach the loss
    trainable = make_module(tiny_vae_dir)  # a fresh trainable encoder must not train on another's embeddings
    with pytest.raises(ValueError, match="text encoder is trainable"):
        trainable.validation_step({"latent": z, "text_emb": text["context"], "text_mask": text["context_mask"]}, 0)


def test_clean_frame_mask_conditions_a_prefix(tiny_vae_dir):
    module = make_module(tiny_vae_dir, cond_prob=1.0, max_cond_frames=2)
    mask = module.clean_frame_mask(64, 4, torch.device("cpu"))
    k = mask.sum(1)
    assert mask.shape == (64, 4) and set(k.tolist()) == {1, 2}
    assert torch.equal(mask, torch.arange(4)[None] < k[:, None])  # always the first k frames
    assert make_module(tiny_vae_dir, cond_prob=0.0).clean_frame_mask(8, 4, torch.device("cpu")) is None


def test_warmup_then_cosine():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_schedule(opt, warmup_steps=4, decay="cosine", total_steps=14, min_lr_ratio=0.1)
    lrs = []
    for _ in range(16):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0) and lrs[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert lrs[14] == pytest.approx(0.1) and lrs[15] == pytest.approx(0.1)


def test_memorises_two_clips(tiny_vae_dir, two_clips):
    """Train on the latents of two real clips with captions "bikes" / "bunny"; each caption must sample a clip
    closer to its own clip than to the other, measured as MSE in (normalised) latent space."""
    module = make_module(tiny_vae_dir, dim=64, cfg_dropout=0.0)
    with torch.no_grad():
        z = module.vae.encode(two_clips, normalize=True).mode()  # [2, 4, 2, 4, 4]
    captions = ["bikes", "bunny"]
    batch = {"latent": z.repeat(8, 1, 1, 1, 1), "caption": captions * 8}  # 16 draws of t / noise per step
    opt = module.configure_optimizers()
    torch.manual_seed(0)
    for _ in range(400):
        loss = module.training_step(batch, 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    module.eval()
    pipe = DiTPipeline(module.dit, module.conditioner, module.vae, module.flow)
    out = pipe(captions, num_frames=5, height=32, width=32, steps=20, guidance=1.0, seed=[1, 2])
    mse = ((out.latents[:, None] - z[None]) ** 2).flatten(2).mean(-1)  # [generated, reference]
    print(f"final loss {loss.item():.4f}; latent MSE [generated x reference] {mse.tolist()}")
    assert mse[0, 0] < mse[0, 1] and mse[1, 1] < mse[1, 0]
    assert mse.diagonal().max() < 0.25 * torch.stack([mse[0, 1], mse[1, 0]]).min()
    assert out.video.shape == (2, 3, 5, 32, 32)


def test_micro_batches_of_one_step_draw_different_t_and_noise():
    from vidgen.training.rng import MicroBatchCounter

    counter = MicroBatchCounter()
    draws = [torch.randn(4, generator=counter.generator(step)) for step in (7, 7, 8, 8)]
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[2], draws[3])  # two micro-batches of a step
    again = MicroBatchCounter()  # a resumed run starts at a step boundary: the same draws again
    assert all(torch.equal(torch.randn(4, generator=again.generator(s)), d) for s, d in zip((7, 7, 8, 8), draws))


def test_cfg_dropout_on_precomputed_text_uses_the_shards_null():
    """Latent-shard batches: dropout swaps in the shards' own null embedding; the text encoder is never built."""
    def never_built(dim: int):
        raise AssertionError("the text encoder must not be loaded to train on precomputed embeddings")

    factory = partial(never_built, dim=8)  # what a Hydra `_partial_: true` HFTextEncoder gives
    entry = TextCondition(factory, dropout=0.999)
    emb, null = torch.randn(3, 5, 8), torch.randn(6, 8)
    null_mask = torch.tensor([True, True, True, False, False, False])
    batch = {"text_emb": emb, "text_mask": torch.ones(3, 5, dtype=torch.bool),
             "text_null_emb": null[None].expand(3, 6, 8), "text_null_mask": null_mask[None].expand(3, 6)}
    cond = Conditioner(text=entry)(batch, drop=True, generator=torch.Generator().manual_seed(0))
    assert cond["context"].shape == (3, 6, 8)
    assert all(torch.equal(cond["context"][i], null) and torch.equal(cond["context_mask"][i], null_mask)
               for i in range(3))
    kept = Conditioner(text=entry)(batch, drop=False)
    assert torch.equal(kept["context"], emb)
    with pytest.raises(ValueError, match="null embedding"):
        Conditioner(text=entry)({"text_emb": emb}, drop=True)


def test_frozen_encoder_weights_travel_with_the_checkpoint(tiny_vae_dir):
    """A frozen encoder that cannot reload itself (a byte encoder from an export) is stored for sampling, and
    resuming (strict state-dict load) is unaffected."""
    from vidgen.io.checkpoint import parts_from_checkpoint

    module = make_module(tiny_vae_dir)
    encoder = module.conditioner.entries["text"].encoder
    encoder.trainable = False
    module.conditioner.entries["text"] = TextCondition(encoder, dropout=0.1)
    ckpt = {"state_dict": dict(module.state_dict()), "global_step": 0}
    module.on_save_checkpoint(ckpt)
    assert any(k.startswith("conditioner.entries.text.encoder.") for k in ckpt["state_dict"])
    rebuilt = parts_from_checkpoint(ckpt, "in-memory").conditioner()
    with torch.no_grad():
        a, b = module.conditioner({"caption": ["bikes"]}), rebuilt({"caption": ["bikes"]})
    assert torch.equal(a["context"], b["context"])
    module.on_load_checkpoint(ckpt)
    module.load_state_dict(ckpt["state_dict"], strict=True)
