"""Causal audio VAE: chunked = whole, causality, clear errors, the audio/video latent ratio, the metrics on known
signals, and AudioVAEModule on CPU (loss falls, masked clips do not count, exact resume, checkpoint -> export ->
rebuild)."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from omegaconf import OmegaConf

from vidgen.eval.audio import log_mel, log_mel_l1, mel_filterbank, snr_db, stft_spectral_convergence
from vidgen.io.checkpoint import load_checkpoint, read_parts, write_export
from vidgen.io.pretrained import load_pretrained
from vidgen.models.audio_vae import AudioVAE, CausalSTFT, audio_latents_per_video_latent, griffin_lim
from vidgen.models.causal_conv import CausalCache
from vidgen.training.audio_vae_module import AudioVAEModule, store_latent_stats
from vidgen.training.callbacks import EMA, FinalCheckpoint

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model" / "audio_vae"


def build(name: str, seed: int = 0) -> AudioVAE:
    """The AudioVAE of configs/model/audio_vae/NAME.yaml, randomly initialised from `seed`."""
    kwargs = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{name}.yaml")).items()
              if not k.startswith("_")}
    torch.manual_seed(seed)
    return AudioVAE(**kwargs).eval()


def waveforms(batch: int, samples: int, rate: int, seed: int = 0) -> torch.Tensor:
    """Sines of random pitch and amplitude plus a few clicks: [batch, 1, samples] in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(samples) / rate
    freq = 100 + (rate / 4 - 100) * torch.rand(batch, 1, 1, generator=g)
    amp = 0.2 + 0.5 * torch.rand(batch, 1, 1, generator=g)
    x = amp * torch.sin(2 * math.pi * freq * t + 6.28 * torch.rand(batch, 1, 1, generator=g))
    clicks = torch.randint(0, samples, (batch, 3), generator=g)
    x[torch.arange(batch)[:, None], 0, clicks] += 0.3
    return x.clamp(-1, 1)


# ---------------------------------------------------------------------------------------------- the model
@pytest.mark.parametrize("name", ["tiny", "quickstart"])
def test_chunked_encode_and_decode_equal_whole(name):
    vae = build(name)
    latents = 23
    x = waveforms(2, latents * vae.hop, vae.sample_rate)
    with torch.no_grad():
        whole = vae.encode(x)
        feats = vae.decode_features(whole.mean)
        assert feats.shape == (2, vae.bins, latents * vae.frames_per_latent)
        recon = vae.decode(whole.mean, clamp=False)
        assert recon.shape == x.shape
        for chunk in (1, 4, 7):
            part = vae.encode(x, chunk_size=chunk)
            assert (part.mean - whole.mean).abs().max() < 1e-5 and (part.logvar - whole.logvar).abs().max() < 1e-5
            assert (vae.decode_features(whole.mean, chunk_size=chunk) - feats).abs().max() < 1e-5
        # The vocoder runs on the whole decoded spectrogram: a chunked decode gives the same samples.
        assert (vae.decode(whole.mean, chunk_size=4, clamp=False) - recon).abs().max() < 1e-3
        sizes = [3, 1, 11, 8]  # unequal pieces of one stream, each through the same explicit cache
        enc_cache, bounds = CausalCache(), [0, *torch.tensor(sizes).cumsum(0).tolist()]
        pieces = [vae.encode(x[..., a * vae.hop:b * vae.hop], cache=enc_cache).mean for a, b in zip(bounds, bounds[1:])]
        assert (torch.cat(pieces, dim=-1) - whole.mean).abs().max() < 1e-5
        assert len(enc_cache) > 0 and enc_cache.nbytes() > 0
        dec_cache = CausalCache()
        streamed = torch.cat([vae.decode_features(z, cache=dec_cache) for z in whole.mean.split(sizes, dim=-1)], dim=-1)
        assert (streamed - feats).abs().max() < 1e-5


@pytest.mark.parametrize("name", ["tiny", "quickstart"])
def test_encoder_and_decoder_are_causal(name):
    vae = build(name)
    hop, latents, per = vae.hop, 12, vae.frames_per_latent
    x = waveforms(1, latents * hop, vae.sample_rate)
    s = 5 * hop + hop // 2  # a sample inside latent 5
    changed = x.clone()
    changed[..., s:] = torch.rand_like(changed[..., s:]) * 2 - 1
    with torch.no_grad():
        z, z_changed = vae.encode(x).mean, vae.encode(changed).mean
        assert torch.equal(z[..., : s // hop], z_changed[..., : s // hop])  # latents before the one covering s
        assert not torch.allclose(z[..., s // hop], z_changed[..., s // hop])  # ... which itself sees the change
        j = 7
        z2 = z.clone()
        z2[..., j:] += 1.0
        f, f2 = vae.decode_features(z), vae.decode_features(z2)
        assert torch.equal(f[..., : j * per], f2[..., : j * per])  # spectrogram frames before latent j's
        assert not torch.allclose(f[..., j * per:], f2[..., j * per:])


def test_stft_inverts_streams_and_griffin_lim_recovers_a_signal():
    stft = CausalSTFT(64, 16)
    x = waveforms(2, 640, 8000, seed=3)
    spec = stft(x)
    assert spec.shape == (2, 1, 33, 40)
    back = stft.inverse(spec)
    assert (back[..., :-16] - x[..., :-16]).abs().max() < 1e-5  # all but the last hop (one window tail covers it)
    cache = CausalCache()  # the STFT of pieces through one cache equals the whole's
    pieces = torch.cat([stft(p, cache) for p in x.split([160, 16, 464], dim=-1)], dim=-1)
    assert (pieces - spec).abs().max() < 1e-5
    sine = 0.5 * torch.sin(2 * math.pi * 1000 * torch.arange(800) / 8000)[None, None]
    assert abs(stft(sine).abs()[0, 0, 8, 10:].mean().item() - 0.5) < 0.02  # 1 kHz = bin 8; full scale ~ amplitude
    # Griffin-Lim: from magnitudes alone, a signal whose magnitudes match (the phase differs, so not the samples).
    t = torch.arange(2048) / 8000
    chirp = (0.4 * torch.sin(2 * math.pi * (300 * t + 900 * t * t)) + 0.2 * torch.sin(2 * math.pi * 1800 * t))[None, None]
    mag = stft(chirp).abs()
    sc = {it: ((stft(griffin_lim(mag, stft, iters=it)).abs() - mag).norm() / mag.norm()).item() for it in (0, 8, 64)}
    print(f"Griffin-Lim on a chirp + a tone, spectral convergence by iterations: {sc}")  # measured .65 .17 .036
    assert sc[0] > 0.5 and sc[8] < 0.25 and sc[64] < 0.06  # random phase -> converged
    assert torch.equal(griffin_lim(mag, stft, iters=8), griffin_lim(mag, stft, iters=8))  # seeded: the same every time


def test_shape_and_length_errors_are_clear():
    vae = build("tiny")  # hop 8
    with pytest.raises(ValueError, match=r"AudioVAE got 100 samples.*hop is 8.*multiple of 8 \(e.g. 96 or 104"):
        vae.encode(torch.zeros(1, 1, 100))
    with pytest.raises(ValueError, match=r"expects x \[B, 1, S\], got \(1, 2, 64\)"):
        vae.encode(torch.zeros(1, 2, 64))
    with pytest.raises(ValueError, match=r"expects x \[B, 1, S\]"):
        vae.encode(torch.zeros(64))
    with pytest.raises(ValueError, match=r"decode expects z \[B, 4, L >= 1\], got \(1, 3, 5\)"):
        vae.decode(torch.zeros(1, 3, 5))
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        vae.encode(torch.zeros(1, 1, 64), chunk_size=0)
    with pytest.raises(ValueError, match="one entry per stride"):
        AudioVAE(channel_mult=[2, 4], strides=[2, 4, 5])


def test_audio_latents_per_video_latent():
    assert audio_latents_per_video_latent(24000, 400, 15, 2) == 8
    assert audio_latents_per_video_latent(24000, 400, 15.0, 4) == 16
    assert audio_latents_per_video_latent(16000, 320, 25, 4) == 8
    assert audio_latents_per_video_latent(48000, 1001, 48000 / 1001, 1) == 1  # NTSC-style rates stay exact
    with pytest.raises(ValueError, match=r"^24000 Hz / hop 400 = 60 audio latents/s against 16 fps / 2 = 8 video "
                                         r"latents/s gives 7.5 audio latents per video latent, not an integer$"):
        audio_latents_per_video_latent(24000, 400, 16, 2)
    with pytest.raises(ValueError, match="29.97 fps"):
        audio_latents_per_video_latent(24000, 400, 29.97, 4)
    with pytest.raises(ValueError, match="positive"):
        audio_latents_per_video_latent(24000, 0, 15, 2)


# ---------------------------------------------------------------------------------------------- the metrics
def test_metrics_on_identical_signals():
    x = waveforms(3, 4800, 24000)
    assert torch.isinf(snr_db(x, x)).all() and (snr_db(x, x) > 0).all()
    assert torch.equal(log_mel_l1(x, x, 24000), torch.zeros(3))
    assert torch.equal(stft_spectral_convergence(x, x), torch.zeros(3))


def test_metrics_on_known_signals():
    rate, g = 24000, torch.Generator().manual_seed(0)
    t = torch.arange(rate) / rate
    sine = (0.5 * torch.sin(2 * math.pi * 440 * t))[None, None]  # power 0.125
    for target in (0.0, 10.0, 30.0):
        noise = torch.randn(sine.shape, generator=g) * math.sqrt(0.125 / 10 ** (target / 10))
        assert abs(snr_db(sine, sine + noise).item() - target) < 0.1
    noise = 0.5 * torch.randn(2, 1, rate, generator=g)  # loud white noise: every mel bin far above the log floor
    assert torch.allclose(stft_spectral_convergence(noise, 0.5 * noise), torch.full((2,), 0.5), atol=1e-4)
    assert torch.allclose(log_mel_l1(noise, 0.1 * noise, rate), torch.ones(2), atol=1e-4)  # log10 of 10x
    peak = log_mel(torch.sin(2 * math.pi * 1000 * t)[None, None], rate).mean(-1).argmax().item()
    fb = mel_filterbank(1024, 80, rate)
    centre = fb[peak].argmax().item() * rate / 1024  # the peak filter's centre frequency
    assert abs(centre - 1000) < 60, centre


# ---------------------------------------------------------------------------------------------- training
TINY_HP = dict(kl_weight=1e-4)


def make_module(**kw) -> AudioVAEModule:
    torch.manual_seed(0)
    kw.setdefault("optimizer", partial(torch.optim.AdamW, lr=3e-3, betas=(0.9, 0.99)))
    return AudioVAEModule(vae=build("tiny").train(), **{**TINY_HP, **kw})


def batch_of(x: torch.Tensor, valid: list[bool] | None = None) -> dict:
    valid = torch.ones(len(x), dtype=torch.bool) if valid is None else torch.tensor(valid)
    return {"audio": x, "audio_valid": valid, "key": [f"k{i}" for i in range(len(x))]}


def loader(*batches: dict) -> torch.utils.data.DataLoader:
    """A DataLoader yielding the given ready-made batches in order (the same order every epoch)."""
    return torch.utils.data.DataLoader(list(batches), batch_size=None)


def make_trainer(root, steps: int, **kw) -> pl.Trainer:
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(accelerator="cpu", max_steps=steps, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=root, log_every_n_steps=1, num_sanity_val_steps=0, **kw)


class LossLog(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if outputs is not None:
            self.losses.append(float(trainer.callback_metrics["train/loss"]))


TRAIN = [batch_of(waveforms(4, 1024, 8000, seed=i)) for i in range(4)]  # 4 batches of 4 clips, 128 latents each


def test_training_loss_falls_and_val_metrics(tmp_path):
    module, losses = make_module(), LossLog()
    trainer = make_trainer(tmp_path, 120, callbacks=[losses])
    trainer.fit(module, train_dataloaders=loader(*TRAIN))
    trainer.validate(module, loader(TRAIN[0]), verbose=False)
    first, last = sum(losses.losses[:4]) / 4, sum(losses.losses[-4:]) / 4
    print(f"tiny audio VAE: loss {first:.3f} -> {last:.3f} in 120 steps; val {dict(trainer.callback_metrics)}")
    assert len(losses.losses) == 120 and last < 0.75 * first  # measured: 1.40 -> 0.63
    for key in ("val/snr_db", "val/mel_l1", "val/stft_sc", "val/l1"):
        assert math.isfinite(float(trainer.callback_metrics[key])), key


def test_invalid_clips_do_not_count_and_empty_batches_are_skipped(tmp_path):
    module = make_module(sample_posterior=False)
    good = waveforms(2, 1024, 8000)
    garbage = torch.full((1, 1, 1024), float("nan"))
    terms = {}
    for name, batch in (("masked", batch_of(torch.cat([good[:1], garbage, good[1:]]), [True, False, True])),
                        ("valid only", batch_of(good))):
        module.zero_grad()
        out = module.reconstruction_losses(*module.prepare_batch(batch))
        out["loss"].backward()
        terms[name] = (out["loss"].detach(), [p.grad.clone() for p in module.vae.parameters()])
    (loss_a, grads_a), (loss_b, grads_b) = terms["masked"], terms["valid only"]
    assert torch.isfinite(loss_a) and torch.allclose(loss_a, loss_b, rtol=1e-5)
    assert max((a - b).abs().max().item() for a, b in zip(grads_a, grads_b)) < 1e-6

    none_valid = batch_of(garbage.expand(2, 1, 1024), [False, False])
    trainer = make_trainer(tmp_path, 2)
    trainer.fit(module, train_dataloaders=loader(TRAIN[0], none_valid, TRAIN[1]))
    assert trainer.global_step == 2 and module.skipped_batches == 1
    assert all(torch.isfinite(p).all() for p in module.parameters())


def _fit(root: Path, steps: int, resume: str | None = None) -> AudioVAEModule:
    """The tiny VAE with the discriminator from step 2, EMA and checkpoints every 2 steps, to `steps`."""
    pl.seed_everything(0)
    module = make_module(disc_start=2, disc_channels=4, disc_layers=2, disc_scales=2)
    ckpt = FinalCheckpoint(dirpath=root / "ckpt", filename="step{step:03d}", every_n_train_steps=2, save_last=True,
                           save_top_k=-1, enable_version_counter=False)
    trainer = make_trainer(root, steps, callbacks=[ckpt, EMA(decay=0.9)], enable_checkpointing=True)
    trainer.fit(module, train_dataloaders=loader(*TRAIN), ckpt_path=resume)
    return module


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """An 8-step run (2 epochs of 4 batches), and the same run stopped at step 4 then resumed to 8."""
    ref, cut = tmp_path_factory.mktemp("ref"), tmp_path_factory.mktemp("cut")
    _fit(ref, 8)
    _fit(cut, 4)  # the end of epoch 1: a plain in-memory loader cannot resume mid-epoch (Lightning replays it)
    assert load_checkpoint(cut / "ckpt" / "last.ckpt")["global_step"] == 4
    _fit(cut, 8, resume=str(cut / "ckpt" / "last.ckpt"))
    return {"ref": ref / "ckpt" / "last.ckpt", "resumed": cut / "ckpt" / "last.ckpt"}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a.values(), b.values()))


def test_resume_from_mid_run_checkpoint_equals_uninterrupted(runs):
    a, b = load_checkpoint(runs["ref"]), load_checkpoint(runs["resumed"])
    assert a["global_step"] == b["global_step"] == 8 and a["epoch"] == b["epoch"]
    assert any(k.startswith("discriminator.") for k in a["state_dict"])  # both optimizers were resumed
    d_params = _max_diff(a["state_dict"], b["state_dict"])
    d_ema = _max_diff(a["callbacks"]["EMA"]["shadow"], b["callbacks"]["EMA"]["shadow"])
    print(f"audio VAE resume vs uninterrupted after 8 steps: max |dw| = {d_params:.3g}, max |d ema| = {d_ema:.3g}")
    assert d_params <= 1e-6 and d_ema <= 1e-6
    for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"]):
        assert max((opt_a["state"][k]["exp_avg_sq"] - opt_b["state"][k]["exp_avg_sq"]).abs().max().item()
                   for k in opt_a["state"]) <= 1e-9


def test_checkpoint_export_rebuild_same_output(runs, tmp_path):
    raw = torch.load(runs["ref"], weights_only=True)  # no pickled objects in the checkpoint
    assert raw["vidgen"]["kind"] == "audio_vae"
    assert raw["vidgen"]["parts"]["audio_vae"]["config"]["strides"] == [2]
    parts = read_parts(runs["ref"], kind="audio_vae")
    assert parts.info["ema_used"]
    out = write_export(parts, tmp_path / "export")
    folder = out  # an audio VAE exports as the bare model folder, as the video VAE does
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    from_ckpt = parts.build("audio_vae").eval()
    rebuilt = load_pretrained(folder, AudioVAE).eval()
    assert torch.equal(rebuilt.encoder.conv_in.weight, raw["callbacks"]["EMA"]["shadow"]["vae.encoder.conv_in.weight"])
    x = waveforms(2, 512, 8000, seed=9)
    with torch.no_grad():
        assert torch.equal(from_ckpt.decode(from_ckpt.encode(x).mode()), rebuilt.decode(rebuilt.encode(x).mode()))
        assert torch.equal(read_parts(out).build("audio_vae").encode(x).mean, rebuilt.encode(x).mean)

    # Latent statistics measured into the export: normalised latents of those clips are ~zero-mean, unit-std.
    vae = store_latent_stats(folder, TRAIN, clips=16)
    loaded = load_pretrained(folder, AudioVAE).eval()
    assert loaded.has_latent_stats and torch.equal(loaded.latent_std, vae.latent_std)
    with torch.no_grad():
        z = torch.cat([loaded.encode(b["audio"], normalize=True).mean for b in TRAIN]).transpose(0, 1).flatten(1)
        assert z.mean(1).abs().max() < 1e-3 and (z.std(1) - 1).abs().max() < 1e-2
        assert torch.allclose(loaded.decode(z[None, :, :128].contiguous(), normalized=True),
                              vae.decode(z[None, :, :128].contiguous(), normalized=True))
