"""Joint audio + video diffusion: the loss with a noise level per modality (clean modality out of its term, the
no-audio path unchanged), sampling both together, and a sync test: a tiny joint DiT trained on flash + click latents
puts the click on the flash's latent frame, in text-to-audio+video and in video-to-audio."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from vidgen.diffusion.denoiser import Denoiser, JointLayout, apply_clean_frames
from vidgen.diffusion.flow import RectifiedFlow
from vidgen.diffusion.guidance import ClassifierFreeGuidance
from vidgen.diffusion.sampling import generate, seeded_noise
from vidgen.models.dit import DiT
from vidgen.models.joint_audio import audio_positions
from vidgen.training.dit_module import audio_task_masks

torch.set_num_threads(1)  # as tests/conftest.py

C, T, H, W = 2, 6, 2, 2  # video latents
CA, A = 2, 2  # audio latent channels, audio latents per video latent frame
TEXT = 8


def joint_dit(seed: int = 0, random_heads: bool = False) -> DiT:
    torch.manual_seed(seed)
    model = DiT(in_channels=C, dim=32, depth=2, num_heads=2, ffn_dim=64, text_dim=TEXT, freq_dim=32,
                patch_size=(1, 1, 1), audio_channels=CA, audio_per_latent_frame=A)
    if random_heads:
        with torch.no_grad():
            model.proj_out.weight.normal_(0, 0.2)
            model.audio_stream.proj_out.weight.normal_(0, 0.2)
    return model


def context(b: int) -> dict[str, torch.Tensor]:
    return {"context": torch.zeros(b, 1, TEXT)}


def flash_click(frame: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents on the common clock: video `[B, C, T, H, W]` bright (+1) at latent frame `frame[b]`, dark (-1)
    elsewhere; audio `[B, CA, T * A]` a spike (+1, else -1) on the audio latents tiling that frame's window, those
    whose p(j) lies in (i - 1, i] (`audio_positions`)."""
    b = frame.shape[0]
    video = torch.where((torch.arange(T)[None] == frame[:, None])[:, None, :, None, None], 1.0, -1.0)
    video = video.expand(b, C, T, H, W).clone()
    p = audio_positions(T * A, A, dtype=torch.float32)  # [Ta]
    window = torch.ceil(p).long()  # the latent frame whose window each audio latent tiles
    audio = torch.where((window[None] == frame[:, None])[:, None, :], 1.0, -1.0).expand(b, CA, T * A).clone()
    return video, audio


def flash_frame(video: torch.Tensor) -> torch.Tensor:
    """Latent frame of the flash `[B]`: the brightest frame."""
    return video.mean(dim=(1, 3, 4)).argmax(dim=1)


def click_frame(audio: torch.Tensor) -> torch.Tensor:
    """Latent frame of the click `[B]`: the window of the loudest audio latents."""
    windows = audio.mean(dim=1).reshape(audio.shape[0], T, A).mean(dim=2)  # [B, T]
    return windows.argmax(dim=1)


# ---------------------------------------------------------------------------------------------------------- loss
def reference_video_loss(net, flow, x0, cond, t, noise, clean_mask):
    """The video loss as it was before audio (a copy of the formula), to check the no-audio path bit for bit."""
    b, c, frames, h, w = x0.shape
    x_t = flow.add_noise(x0, noise, t)
    x_in, t_in = apply_clean_frames(x_t, t, x0, clean_mask)
    err = (net(x_in, t_in, **cond).float() - flow.target(x0, noise).float()).pow(2)
    if clean_mask is None:
        return err.mean()
    keep = (~clean_mask.bool().expand(b, frames))[:, None, :, None, None].float()
    return (err * keep).sum() / (keep.sum() * c * h * w).clamp_min(1.0)


def test_no_audio_loss_is_unchanged_bit_for_bit():
    net, flow = joint_dit(random_heads=True), RectifiedFlow()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, C, T, H, W, generator=g), torch.randn(3, C, T, H, W, generator=g)
    t = torch.tensor([0.2, 0.5, 0.9])
    mask = (torch.arange(T) < 2)[None].expand(3, T)
    for clean_mask in (None, mask):
        loss = Denoiser(net, flow).loss(x0, context(3), t=t, noise=noise, clean_mask=clean_mask)
        assert torch.equal(loss, reference_video_loss(net, flow, x0, context(3), t, noise, clean_mask))
    # With the generator drawing noise and t, the same draws as before audio existed.
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    loss = Denoiser(net, flow).loss(x0, context(3), generator=g1)
    noise2 = torch.randn(x0.shape, generator=g2)
    t2 = flow.sample_t(3, T, T * H * W, generator=g2)
    assert torch.equal(loss, reference_video_loss(net, flow, x0, context(3), t2, noise2, None))


def test_clean_modality_is_out_of_its_loss_term():
    net, flow = joint_dit(random_heads=True), RectifiedFlow()
    g = torch.Generator().manual_seed(1)
    x0, a0 = torch.randn(2, C, T, H, W, generator=g), torch.randn(2, CA, T * A, generator=g)
    noise, a_noise = torch.randn_like(x0), torch.randn_like(a0)
    t, t_a = torch.tensor([0.4, 0.7]), torch.tensor([0.3, 0.6])
    den = Denoiser(net, flow)
    kw = dict(t=t, noise=noise, t_audio=t_a, audio_noise=a_noise)
    both = den.loss(x0, context(2), audio0=a0, audio_weight=0.0, **kw)
    # Video clean everywhere (video-to-audio) with audio_weight 0: nothing left to learn, the loss is exactly 0,
    # although the network's (random) velocity on clean video is far from the target.
    all_clean = torch.ones(2, T, dtype=torch.bool)
    assert den.loss(x0, context(2), audio0=a0, clean_mask=all_clean, audio_weight=0.0, **kw) == 0
    assert both > 0.1
    # Audio clean (audio-to-video): its term is out, so the audio weight no longer matters.
    a_clean = torch.ones(2, dtype=torch.bool)
    l1 = den.loss(x0, context(2), audio0=a0, audio_clean_mask=a_clean, audio_weight=1.0, **kw)
    l9 = den.loss(x0, context(2), audio0=a0, audio_clean_mask=a_clean, audio_weight=9.0, **kw)
    assert torch.equal(l1, l9)
    noisy9 = den.loss(x0, context(2), audio0=a0, audio_weight=9.0, **kw)
    assert noisy9 > both + 0.1  # with noisy audio the weight does count
    # A clip without sound: no audio term for it, whatever the weight.
    silent = torch.tensor([False, False])
    assert torch.equal(den.loss(x0, context(2), audio0=a0, audio_valid=silent, audio_weight=9.0, **kw),
                       den.loss(x0, context(2), audio0=a0, audio_valid=silent, audio_weight=0.0, **kw))
    # Per sample: the clean sample's audio term is out, the other's counts (alone, averaged over its latents).
    one = torch.tensor([True, False])
    with torch.no_grad():
        a_in = torch.where(one[:, None, None], a0, flow.add_noise(a0, a_noise, t_a))
        _, v_a = net(flow.add_noise(x0, noise, t), t, **context(2), audio=a_in,
                     t_audio=torch.stack([torch.zeros(T * A), t_a[1].expand(T * A)]))
    expect = (v_a[1] - (a_noise[1] - a0[1])).pow(2).mean()
    got = (den.loss(x0, context(2), audio0=a0, audio_clean_mask=one, audio_weight=1.0, **kw)
           - den.loss(x0, context(2), audio0=a0, audio_clean_mask=one, audio_weight=0.0, **kw))
    assert torch.allclose(got, expect, rtol=1e-4, atol=1e-6)


def test_joint_sampling_holds_the_clean_modality_and_cfg_one_is_conditional():
    net, flow = joint_dit(random_heads=True).eval(), RectifiedFlow()
    den = Denoiser(net, flow)
    video, audio = flash_click(torch.tensor([1, 4]))
    shape, a_shape = (2, C, T, H, W), (2, CA, T * A)
    z, a = generate(den, context(2), shape, steps=4, audio_shape=a_shape, seed=3,
                    clean=video, clean_mask=torch.ones(1, T, dtype=torch.bool))
    assert torch.equal(z, video) and a.shape == a_shape and not torch.equal(a, audio)
    z, a = generate(den, context(2), shape, steps=4, audio_shape=a_shape, seed=3, audio_clean=audio, sampler="heun")
    assert torch.equal(a, audio)
    # The same seed gives the same video noise with sound or without.
    captured: list[torch.Tensor] = []
    generate(den, context(2), shape, steps=1, audio_shape=a_shape, seed=3, callback=lambda d: captured.append(d["x"]))
    assert torch.equal(JointLayout.of(shape, a_shape).unpack(captured[0])[0], seeded_noise(shape, 3))
    # CFG at scale 1 (batched cond + uncond) equals the conditional branch alone, for both outputs.
    uncond = {"context": torch.ones(1, 1, TEXT)}
    cfg = generate(den, context(2), shape, steps=3, audio_shape=a_shape, uncond=uncond,
                   guider=ClassifierFreeGuidance(1.0), sampler="dpmpp_2m")
    plain = generate(den, context(2), shape, steps=3, audio_shape=a_shape, sampler="dpmpp_2m")
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(cfg, plain))
    with pytest.raises(ValueError, match="joint audio"):
        generate(den, context(2), shape, steps=2, audio_shape=a_shape, sampler="dmd")


# ---------------------------------------------------------------------------------------------------------- sync
SYNC_THRESHOLD = 0.7  # share of samples whose click lies within one latent frame of the flash


def train_flash_click(steps: int = 600, batch: int = 32, seed: int = 0) -> DiT:
    """A tiny joint DiT trained with the joint loss and task mix (joint .6, video-to-audio .2, audio-to-video .2)."""
    net, flow = joint_dit(seed), RectifiedFlow()
    den = Denoiser(net, flow)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    probs = {"joint": 0.6, "video_to_audio": 0.2, "audio_to_video": 0.2}
    for _ in range(steps):
        video, audio = flash_click(torch.randint(0, T, (batch,), generator=g))
        video_clean, audio_clean = audio_task_masks(batch, T, probs, generator=g)
        loss = den.loss(video, context(batch), audio0=audio, clean_mask=video_clean, audio_clean_mask=audio_clean,
                        generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval()


def test_flash_and_click_are_in_sync():
    start = time.perf_counter()
    net = train_flash_click()
    trained = time.perf_counter() - start
    den, n = Denoiser(net, RectifiedFlow()), 64
    shape, a_shape = (n, C, T, H, W), (n, CA, T * A)
    # (a) text-to-audio+video: both generated from noise.
    z, a = generate(den, context(n), shape, steps=20, audio_shape=a_shape, seed=100)
    joint = ((click_frame(a) - flash_frame(z)).abs() <= 1).float().mean().item()
    exact = (click_frame(a) == flash_frame(z)).float().mean().item()
    # (b) video-to-audio: the flash given as clean latents at frame i.
    frames = torch.arange(n) % T
    video, _ = flash_click(frames)
    _, a = generate(den, context(n), shape, steps=20, audio_shape=a_shape, seed=200, clean=video,
                    clean_mask=torch.ones(1, T, dtype=torch.bool))
    v2a = ((click_frame(a) - frames).abs() <= 1).float().mean().item()
    v2a_exact = (click_frame(a) == frames).float().mean().item()
    # (c) audio-to-video: the click given as clean audio latents at frame i.
    _, sound = flash_click(frames)
    z, _ = generate(den, context(n), shape, steps=20, audio_shape=a_shape, seed=300, audio_clean=sound)
    a2v = ((flash_frame(z) - frames).abs() <= 1).float().mean().item()
    print(f"\nsync: trained {trained:.1f}s; t2av within 1 latent frame {joint:.0%} (same frame {exact:.0%}); "
          f"v2a within 1 {v2a:.0%} (same frame {v2a_exact:.0%}); a2v within 1 {a2v:.0%}; threshold "
          f"{SYNC_THRESHOLD:.0%}; {n} samples")
    assert joint >= SYNC_THRESHOLD
    assert v2a >= SYNC_THRESHOLD
    assert a2v >= SYNC_THRESHOLD


# ---------------------------------------------------------------------------------------------------------- train.py
FPS, RATE = 10, 16000  # 16 kHz / hop 256 x 4 (the tiny VAE's time stride) / 10 fps = 25 audio latents per latent frame
TINY_AUDIO_VAE = dict(in_channels=1, latent_channels=4, base_channels=8, channel_mult=[1], strides=[4],
                      dilations=[1], n_fft=128, stft_hop=64, griffin_lim_iters=4, sample_rate=RATE)  # hop 256


def _write_clip(path, frames: int = 40, side: int = 64) -> None:
    """A synthetic mp4: grey frames with a white flash at frame 20, and an AAC track (48 kHz stereo) with a click
    at the same time over a quiet tone."""
    from fractions import Fraction

    import av
    import numpy as np

    sr = 48000
    t = np.arange(int(sr * frames / FPS)) / sr
    wave = 0.1 * np.sin(2 * np.pi * 220 * t)
    wave[20 * sr // FPS: 20 * sr // FPS + 200] = 0.9
    wave = np.stack([wave, wave]).astype(np.float32)
    with av.open(str(path), "w", format="mp4") as c:
        video = c.add_stream("libx264", rate=FPS)
        video.width = video.height = side
        video.pix_fmt = "yuv420p"
        audio = c.add_stream("aac", rate=sr)
        audio.layout = "stereo"
        fmt = audio.codec_context.format
        for k in range(0, wave.shape[1], 1024):
            chunk = wave[:, k:k + 1024]
            chunk = chunk if fmt.is_planar else np.ascontiguousarray(chunk.T).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format=fmt.name, layout="stereo")
            frame.sample_rate, frame.time_base, frame.pts = sr, Fraction(1, sr), k
            for packet in audio.encode(frame):
                c.mux(packet)
        for packet in audio.encode(None):
            c.mux(packet)
        for j in range(frames):
            grey = 255 if j == 20 else 40 + 3 * j
            frame = av.VideoFrame.from_ndarray(np.full((side, side, 3), grey, np.uint8), format="rgb24")
            frame.pts, frame.time_base = j, Fraction(1, FPS)
            for packet in video.encode(frame):
                c.mux(packet)
        for packet in video.encode(None):
            c.mux(packet)


@pytest.fixture(scope="module")
def audio_shards(tmp_path_factory):
    """Clip shards with sound (make_shards at RATE mono) from three synthetic mp4s with AAC tracks."""
    from data_prep.make_shards import build_shards

    src = tmp_path_factory.mktemp("joint_src")
    for name in ("a", "b", "c"):
        _write_clip(src / f"{name}.mp4")
        (src / f"{name}.txt").write_text(f"a flash and a click {name}")
    out = tmp_path_factory.mktemp("joint_shards")
    build_shards(src, out, max_side=64, min_side=32, min_frames=17, max_frames=40, shard_size=2, workers=1,
                 progress=False, audio_rate=RATE, audio_channels=1)
    return out


@pytest.fixture(scope="module")
def tiny_audio_vae_export(tmp_path_factory):
    """A tiny random AudioVAE export (hop 256 at RATE) with latent statistics, as the audio VAE task exports it."""
    from vidgen.io.pretrained import save_pretrained
    from vidgen.models.audio_vae import AudioVAE

    torch.manual_seed(0)
    vae = AudioVAE(**TINY_AUDIO_VAE)
    vae.set_latent_stats(torch.zeros(4), torch.full((4,), 0.5))
    return save_pretrained(vae, tmp_path_factory.mktemp("tiny_audio_vae") / "export")


def joint_overrides(vae: Path, audio_vae: Path, shards: Path) -> list[str]:
    """experiment=joint_audio_quickstart shrunk to a seconds-long CPU run."""
    return ["experiment=joint_audio_quickstart", f"task.module.vae_path={vae}", f"task.module.audio_vae_path={audio_vae}",
            f"data.train_shards={shards}", f"data.audio_rate={RATE}", f"data.target_fps={FPS}",
            "data.buckets=[[9,32,32]]", "data.decoder=pyav", "data.val_split=0", "model.dit.dim=32",
            "model.dit.depth=2", "model.dit.num_heads=2", "model.dit.ffn_dim=64", "model.dit.freq_dim=32",
            "model.text.dim=16", "model.text.depth=1", "~callbacks.sample_logging", "logger=none",
            "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false", "trainer.max_steps=3",
            "trainer.val_check_interval=null", "trainer.check_val_every_n_epoch=null"]


@pytest.fixture(scope="module")
def joint_run(tmp_path_factory, tiny_vae_export, tiny_audio_vae_export, audio_shards):
    """A tiny joint DiT trained for a few steps by the real train.py: (root, checkpoint path)."""
    from runs import train

    root = tmp_path_factory.mktemp("joint_run")
    train(joint_overrides(tiny_vae_export, tiny_audio_vae_export, audio_shards), root)
    ckpts = sorted((root / "runs" / "joint_audio_quickstart" / "checkpoints").glob("*.ckpt"))
    assert ckpts, "train.py wrote no checkpoint"
    return root, ckpts[-1]


def test_train_py_runs_a_joint_model(joint_run, tiny_audio_vae_export):
    from vidgen.io.checkpoint import load_checkpoint
    from vidgen.io.fingerprint import fingerprint_folder

    _, ckpt = joint_run
    state = load_checkpoint(ckpt)
    meta = state["vidgen"]["meta"]
    assert meta["audio_vae"]["fingerprint"] == fingerprint_folder(tiny_audio_vae_export)
    dit = state["vidgen"]["parts"]["dit"]["config"]
    assert (dit["audio_channels"], dit["audio_per_latent_frame"]) == (4, 25)
    # The audio head starts at zero: only gradients of the audio term move it.
    assert state["state_dict"]["dit.audio_stream.proj_out.weight"].abs().sum() > 0


def test_export_carries_the_audio_vae(joint_run, tmp_path):
    """The export folder holds a copy of the audio VAE (as of the video VAE) and rebuilds the joint pipeline."""
    from vidgen.io.checkpoint import read_parts, write_export
    from vidgen.io.fingerprint import fingerprint_folder
    from vidgen.pipeline import DiTPipeline

    _, ckpt = joint_run
    export = write_export(read_parts(ckpt), tmp_path / "export")
    assert (export / "audio_vae").is_dir() and (export / "vae").is_dir()
    meta = read_parts(export).meta
    assert meta["audio_vae"]["path"] == str((export / "audio_vae").resolve())
    assert fingerprint_folder(export / "audio_vae") == meta["audio_vae"]["fingerprint"]
    pipe = DiTPipeline.from_pretrained(export, device="cpu")
    assert pipe.audio_vae is not None and pipe.dit.config["audio_channels"] == 4


def run_sample(*overrides: str, fails: bool = False):
    """sample.py with these overrides; it must succeed (or, with `fails`, exit non-zero: then its output)."""
    import subprocess
    import sys

    from runs import ROOT

    out = subprocess.run([sys.executable, "sample.py", *overrides], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    if fails:
        assert out.returncode != 0, out.stdout[-2000:]
        return out.stdout + out.stderr
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


def test_sample_py_writes_video_with_sound_in_sync(joint_run, tmp_path):
    import json

    import numpy as np

    from vidgen.data.audio import read_audio
    from vidgen.io.video import read_video, stream_durations, write_video

    _, ckpt = joint_run
    run_sample(f"ckpt={ckpt}", "prompt=a flash and a click", "num_frames=9", "height=32", "width=32", "steps=2",
               f"out_dir={tmp_path / 't2av'}")
    mp4 = next((tmp_path / "t2av").glob("*.mp4"))
    assert mp4.with_suffix(".wav").is_file()
    settings = json.loads(mp4.with_suffix(".json").read_text())
    assert settings["fps"] == FPS and settings["audio_rate"] == RATE and settings["task"] == "text_to_audio_video"
    d = stream_durations(mp4)
    assert abs(d["video"] - 9 / FPS) < 1e-6 and abs(d["audio"] - d["video"]) <= 1 / FPS, d
    # video-to-audio: the generated clip given back as video= gets a new soundtrack, its frames held.
    run_sample(f"ckpt={ckpt}", "prompt=a flash and a click", f"video={mp4}", "height=32", "width=32", "steps=2",
               f"out_dir={tmp_path / 'v2a'}")
    v2a = next((tmp_path / "v2a").glob("*.mp4"))
    assert json.loads(v2a.with_suffix(".json").read_text())["task"] == "video_to_audio"
    d = stream_durations(v2a)
    assert abs(d["video"] - 9 / FPS) < 1e-6 and abs(d["audio"] - d["video"]) <= 1 / FPS, d
    # video-to-audio from a clip at another frame rate: taken at the checkpoint's clock, it keeps its real duration
    # (18 frames at 20 fps = 0.9 s -> 9 frames at 10 fps, not 17 frames slowed to 1.7 s).
    frames = read_video(mp4)[0]
    fast = write_video(tmp_path / "fast.mp4", np.repeat(frames, 2, axis=0), fps=2 * FPS)
    run_sample(f"ckpt={ckpt}", "prompt=a flash and a click", f"video={fast}", "height=32", "width=32", "steps=2",
               f"out_dir={tmp_path / 'v2a_fast'}")
    v2a_fast = next((tmp_path / "v2a_fast").glob("*.mp4"))
    assert json.loads(v2a_fast.with_suffix(".json").read_text())["video_fps"] == 2 * FPS
    d = stream_durations(v2a_fast)
    assert abs(d["video"] - 9 / FPS) < 1e-6 and abs(d["audio"] - d["video"]) <= 1 / FPS, d
    # audio-to-video: the WAV written beside the first sample given back as audio=: the sound is held (two seeds
    # give the same soundtrack), the picture is generated (and differs between them).
    wav = mp4.with_suffix(".wav")
    outs = []
    for seed in (1, 2):
        run_sample(f"ckpt={ckpt}", "prompt=a flash and a click", f"audio={wav}", "num_frames=9", "height=32",
                   "width=32", "steps=2", f"seed={seed}", f"out_dir={tmp_path / f'a2v{seed}'}")
        a2v = next((tmp_path / f"a2v{seed}").glob("*.mp4"))
        assert json.loads(a2v.with_suffix(".json").read_text())["task"] == "audio_to_video"
        d = stream_durations(a2v)
        assert abs(d["video"] - 9 / FPS) < 1e-6 and abs(d["audio"] - d["video"]) <= 1 / FPS, d
        outs.append((read_audio(a2v.with_suffix(".wav"), RATE, 1).pcm, read_video(a2v)[0]))
    assert np.array_equal(outs[0][0], outs[1][0]) and not np.array_equal(outs[0][1], outs[1][1])
    err = run_sample(f"ckpt={ckpt}", "prompt=x", f"audio={wav}", "num_frames=33", "height=32", "width=32",
                     f"out_dir={tmp_path / 'long'}", fails=True)
    assert "s of sound; num_frames=33 at 10 fps needs 3.30 s" in err, err


def test_module_pads_the_sound_to_the_common_clock_and_refuses_other_lengths(tiny_vae_export, tiny_audio_vae_export):
    from functools import partial

    from vidgen.conditioning import Conditioner, TextCondition
    from vidgen.errors import UserError
    from vidgen.models.text import ByteTextEncoder
    from vidgen.training.dit_module import DiTModule

    torch.manual_seed(0)
    dit = DiT(in_channels=4, dim=32, depth=1, num_heads=2, ffn_dim=64, text_dim=16, freq_dim=32, audio_channels=4,
              audio_per_latent_frame=25)
    text = ByteTextEncoder(dim=16, depth=1, num_heads=2, max_length=16)
    module = DiTModule(dit, Conditioner(text=TextCondition(text)), str(tiny_vae_export),
                       optimizer=partial(torch.optim.AdamW, lr=1e-3), audio_vae_path=str(tiny_audio_vae_export))
    wave = torch.rand(2, 1, 9 * RATE // FPS) * 2 - 1  # 9 frames of sound
    a = module.audio_latents({"audio": wave}, frames=3, sample=False)
    assert a.shape == (2, 4, 3 * 25)
    # (s - 1) = 3 frames of silence before frame 0: the latents are those of the padded waveform.
    padded = torch.cat([torch.zeros(2, 1, 3 * RATE // FPS), wave], dim=-1)
    assert torch.equal(a, module.audio_vae.encode(padded, normalize=True).mode())
    with pytest.raises(UserError, match="data.audio_rate"):  # e.g. the loader at 24 kHz
        module.audio_latents({"audio": torch.zeros(2, 1, 9 * 24000 // FPS)}, frames=3)
    with pytest.raises(UserError, match="audio_channels"):
        DiTModule(DiT(in_channels=4, dim=32, depth=1, num_heads=2, text_dim=16), Conditioner(text=TextCondition(text)),
                  str(tiny_vae_export), optimizer=partial(torch.optim.AdamW), audio_vae_path=str(tiny_audio_vae_export))
    with pytest.raises(UserError, match="audio_tasks"):
        DiTModule(dit, Conditioner(text=TextCondition(text)), str(tiny_vae_export), optimizer=partial(torch.optim.AdamW),
                  audio_vae_path=str(tiny_audio_vae_export), audio_tasks={"joint": 1, "audio_to_vidoe": 1})


def test_pipeline_audio_to_video_holds_the_sound(joint_run):
    from vidgen.pipeline import DiTPipeline, SamplingError, sound_on_clock

    _, ckpt = joint_run
    pipe = DiTPipeline.from_pretrained(ckpt, device="cpu")
    assert pipe.joint and pipe.fps == FPS
    sound = torch.rand(1, 9 * RATE // FPS) * 2 - 1  # [C, S]: 9 frames at 10 fps
    out = pipe(["a flash and a click"], 9, 32, 32, steps=2, guidance=1.0, audio=sound)
    held = pipe.audio_vae.encode(sound_on_clock(sound[None], 3, 25, 256, 4), normalize=True).mode()
    assert torch.equal(out.audio_latents, held) and out.settings["task"] == "audio_to_video"
    assert out.audio.shape == (1, 1, 9 * RATE // FPS) and out.video.shape == (1, 3, 9, 32, 32)
    with pytest.raises(SamplingError, match="audio samples for 9 frames"):
        pipe(["x"], 9, 32, 32, steps=1, audio=torch.zeros(1, 9 * 24000 // FPS))


def test_joint_dit_starts_from_a_video_only_base(tmp_path):
    """init_from a video-only DiT: every video weight loads, the audio stream starts fresh, and without audio the
    joint model computes exactly the base's function (sound added to a trained video model)."""
    from vidgen.conditioning import Conditioner, TextCondition
    from vidgen.io.pretrained import save_pretrained
    from vidgen.models.dit import DiT
    from vidgen.models.text import ByteTextEncoder
    from vidgen.training.adapters import load_base

    arch = dict(in_channels=4, dim=32, depth=1, num_heads=2, ffn_dim=64, text_dim=16, freq_dim=32)
    torch.manual_seed(0)
    video = DiT(**arch).eval()
    with torch.no_grad():
        video.proj_out.weight.normal_(0.0, 0.1)  # a trained-looking (non-zero) output layer
    save_pretrained(video, tmp_path / "base")
    joint = DiT(**arch, audio_channels=4, audio_per_latent_frame=2).eval()
    text = Conditioner(text=TextCondition(ByteTextEncoder(dim=16, depth=1, num_heads=2), dropout=0.0))
    info = load_base(joint, text, str(tmp_path / "base"))
    assert info["parts"] == ["dit"]
    assert all(torch.equal(v, joint.state_dict()[k]) for k, v in video.state_dict().items())
    z, ctx = torch.randn(1, 4, 3, 4, 4), torch.randn(1, 5, 16)
    with torch.no_grad():
        assert torch.equal(joint(z, torch.tensor([0.5]), ctx), video(z, torch.tensor([0.5]), ctx))
        v, v_audio = joint(z, torch.tensor([0.5]), ctx, audio=torch.randn(1, 4, 6))
    assert v.shape == z.shape and v_audio.abs().max() == 0  # the new audio head starts at zero
