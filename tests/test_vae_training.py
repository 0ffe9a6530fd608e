"""VAEModule end to end on CPU: overfitting a real clip, the discriminator path, checkpoint -> export ->
from_pretrained, latent statistics, LPIPS from local weights, and the evaluation report / CLIs."""

from __future__ import annotations

import logging
import math
from functools import partial

import lightning.pytorch as pl
import pytest
import torch

from vidgen.eval.metrics import LPIPS, load_lpips, psnr, ssim
from vidgen.models.vae import VideoVAE
from vidgen.training.vae_module import VAEModule
from vidgen.io.pretrained import load_pretrained

TINY = dict(latent_channels=4, base_channels=8, channel_mult=[1, 2, 4, 4], num_res_blocks=1,
            temporal_downsample=[False, True, True])


@pytest.fixture(scope="module")
def clip(demo_clips_dir) -> torch.Tensor:
    """9 frames, 32x32 crop of the real carphone clip: [1, 3, 9, 32, 32] in [-1, 1]."""
    from vidgen.io.video import read_video

    frames, _ = read_video(demo_clips_dir / "carphone_pristine.mp4")
    x = torch.from_numpy(frames[:9, 56:88, 72:104].copy()).permute(3, 0, 1, 2).float() / 127.5 - 1
    return x[None]


def batch_of(x: torch.Tensor) -> dict:
    return {"video": x, "caption": ["a man in a car"] * len(x), "key": [f"k{i}" for i in range(len(x))],
            "fps": torch.full((len(x),), 30.0)}


def make_module(**kw) -> VAEModule:
    torch.manual_seed(0)
    kw.setdefault("optimizer", partial(torch.optim.AdamW, lr=2e-3, betas=(0.9, 0.99)))
    kw.setdefault("log_video_every", 0)
    return VAEModule(vae=VideoVAE(**TINY), **kw)


def loader(*batches: dict) -> torch.utils.data.DataLoader:
    """A DataLoader yielding the given ready-made batches in order."""
    return torch.utils.data.DataLoader(list(batches), batch_size=None)


def make_trainer(tmp_path, steps: int, **kw) -> pl.Trainer:
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(accelerator="cpu", max_steps=steps, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path, log_every_n_steps=1, num_sanity_val_steps=0, **kw)


def recon_psnr(vae: VideoVAE, x: torch.Tensor) -> float:
    was_training = vae.training
    vae.eval()
    with torch.no_grad():
        value = psnr(vae.decode(vae.encode(x).mode()), x).item()
    vae.train(was_training)
    return value


@pytest.fixture(scope="module")
def overfit(clip, tmp_path_factory) -> dict:
    """The tiny VAE trained for 40 steps on the one 9x32x32 clip through VAEModule + Trainer."""
    root = logging.getLogger()
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    root.addHandler(handler)
    try:
        module = make_module(lpips_weight=1.0)  # no weights: LPIPS off, said once
    finally:
        root.removeHandler(handler)
    before = recon_psnr(module.vae, clip)
    make_trainer(tmp_path_factory.mktemp("overfit"), 40).fit(module, train_dataloaders=loader(*[batch_of(clip)] * 40))
    return {"vae": module.vae.eval(), "before": before, "after": recon_psnr(module.vae, clip), "records": records}


def test_overfit_one_real_clip_gains_10db(overfit):
    assert sum("LPIPS disabled: no weights given" in r.getMessage() for r in overfit["records"]) == 1
    before, after = overfit["before"], overfit["after"]
    print(f"overfit PSNR {before:.2f} -> {after:.2f} dB")
    assert after - before >= 10.0, (before, after)


def test_tiled_close_to_whole_on_trained_vae(overfit, demo_clips_dir):
    """48x48 crop, 32 px tiles with 16 px overlap (2x2 tiles). Measured: tiled-vs-whole 36.1 dB PSNR, max abs
    pixel difference 0.13 (of range 2), reconstruction PSNR -0.3 dB; the bounds below leave margin."""
    from vidgen.io.video import read_video

    vae = overfit["vae"]
    frames, _ = read_video(demo_clips_dir / "carphone_pristine.mp4")
    x = torch.from_numpy(frames[:9, 48:96, 64:112].copy()).permute(3, 0, 1, 2).float()[None] / 127.5 - 1
    with torch.no_grad():
        whole = vae.decode(vae.encode(x).mode())
        tiled = vae.decode(vae.encode(x, tile_size=32, tile_overlap=16).mode(), tile_size=32, tile_overlap=16)
    print(f"tiled vs whole: {psnr(tiled, whole).item():.2f} dB, max abs {(tiled - whole).abs().max().item():.3f}, "
          f"recon {psnr(tiled, x).item():.2f} vs {psnr(whole, x).item():.2f} dB")
    assert psnr(tiled, whole).item() >= 28.0
    assert (tiled - whole).abs().max().item() <= 0.4
    assert psnr(tiled, x).item() >= psnr(whole, x).item() - 1.0


def test_discriminator_path_on_image_and_video_batches(clip, tmp_path):
    module = make_module(disc_start=1, disc_channels=8, disc_layers=2, lpips_weight=0.0)
    image = batch_of(clip[:, :, :1])  # 1-frame batch = image batch
    trainer = make_trainer(tmp_path, 3)
    trainer.fit(module, train_dataloaders=loader(batch_of(clip), image, batch_of(clip)))
    assert trainer.global_step == 3  # the discriminator step does not advance the step counter
    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/d_loss", "train/g_loss", "train/d_weight", "train/kl"):
        assert math.isfinite(float(metrics[key])), key
    assert any(p.grad is not None for p in module.discriminator.parameters())


def test_checkpoint_export_round_trip(clip, tmp_path):
    from safetensors.torch import load_file

    from vidgen.data.latent_stats import store_latent_stats
    from vidgen.io.checkpoint import CheckpointError, read_parts, write_export
    from vidgen.training.callbacks import EMA

    module = make_module(lpips_weight=0.0, log_video_every=2)
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=2)
    trainer = make_trainer(tmp_path, 2, callbacks=[ckpt_cb, EMA(decay=0.9)], enable_checkpointing=True)
    trainer.fit(module, train_dataloaders=loader(*[batch_of(clip)] * 2), val_dataloaders=loader(batch_of(clip)))
    assert {"val/psnr", "val/ssim"} <= set(trainer.callback_metrics)  # validated with the EMA weights...
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    raw = torch.load(ckpt, weights_only=True)  # no pickled objects in our checkpoints
    live = module.vae.encoder.conv_in.weight.detach()
    assert torch.equal(live, raw["state_dict"]["vae.encoder.conv_in.weight"])  # ...then swapped back
    assert raw["vidgen"]["kind"] == "vae" and raw["vidgen"]["parts"]["vae"]["config"]["channel_mult"] == [1, 2, 4, 4]
    assert (tmp_path / "recon" / "step0000002.png").is_file() and (tmp_path / "recon" / "step0000002.mp4").is_file()

    out = tmp_path / "export"
    write_export(read_parts(ckpt, kind="vae"), out)
    vae = store_latent_stats(out, [batch_of(clip)] * 2, clips=2)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    ema_w = raw["callbacks"]["EMA"]["shadow"]["vae.encoder.conv_in.weight"]
    torch.testing.assert_close(load_file(out / "model.safetensors")["encoder.conv_in.weight"], ema_w)
    assert not torch.equal(ema_w, raw["state_dict"]["vae.encoder.conv_in.weight"])
    loaded = load_pretrained(out, VideoVAE)
    assert loaded.has_latent_stats and torch.equal(loaded.latent_std, vae.latent_std)
    with torch.no_grad():
        z_a, z_b = vae.encode(clip, normalize=True).mean, loaded.encode(clip, normalize=True).mean
        assert torch.equal(z_a, z_b) and torch.equal(vae.decode(z_a, normalized=True), loaded.decode(z_b, normalized=True))
        assert abs(z_a.mean().item()) < 0.1 and abs(z_a.std().item() - 1) < 0.1  # measured on this very clip

    torch.save({"state_dict": {}, "vidgen": {"task": "dit"}}, tmp_path / "dit.ckpt")
    with pytest.raises(CheckpointError, match="a 'dit' checkpoint, expected a 'vae'"):
        read_parts(tmp_path / "dit.ckpt", kind="vae")


def test_lpips_from_local_weights_and_metrics(tmp_path):
    torch.manual_seed(0)
    ref = LPIPS()
    for p in ref.parameters():
        p.data.normal_(0, 0.05).abs_()
    sd = ref.state_dict()
    # the two released files: torchvision's VGG16 backbone and the lpips package's linear heads
    torch.save({k: v for k, v in sd.items() if k.startswith("features.")}, tmp_path / "vgg16-397923af.pth")
    torch.save({f"lin{i}.model.1.weight": sd[f"lins.{i}.weight"] for i in range(5)}, tmp_path / "vgg.pth")
    net = load_lpips(tmp_path)
    x = torch.rand(2, 3, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    assert torch.equal(net(x, x), torch.zeros(2)) and bool((net(x, y) > 0).all())
    torch.testing.assert_close(net(x, y), ref(x, y))
    assert psnr(x, x).min() >= 99 and torch.allclose(ssim(x, x), torch.ones(2))
    assert bool((ssim(x, y) < 1).all()) and bool((psnr(x, y) < 30).all())
    with pytest.raises(KeyError, match="missing"):
        (tmp_path / "vgg16-397923af.pth").unlink()
        load_lpips(tmp_path)


def test_eval_and_export_clis_on_demo_shards(tmp_path, demo_shards):
    from vidgen.eval.vae import main as eval_main
    from vidgen.data.latent_stats import main as stats_main
    from vidgen.io.checkpoint import main as export_main

    module = make_module(lpips_weight=0.0)
    trainer = make_trainer(tmp_path, 1)
    trainer.fit(module, train_dataloaders=loader(batch_of(torch.rand(1, 3, 9, 32, 32) * 2 - 1)))
    trainer.save_checkpoint(tmp_path / "vae.ckpt")
    out = tmp_path / "export"
    assert export_main([str(tmp_path / "vae.ckpt"), str(out)]) == 0
    assert stats_main([f"vae={out}", "clips=2", f"shards={demo_shards}", "frames=9", "size=64",
                       "decoder=pyav"]) == 0
    assert load_pretrained(out, VideoVAE).has_latent_stats
    summary = eval_main([f"vae={out}", f"shards={demo_shards}", "frames=9", "size=64", "clips=2", "chunk=1",
                         "decoder=pyav", f"out={tmp_path / 'eval'}"])
    assert summary["clips"] == 2 and 0 < summary["psnr"] < 60 and -1 <= summary["ssim"] <= 1
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "PSNR" in report and "SSIM" in report and (tmp_path / "eval" / "strip.png").is_file()
