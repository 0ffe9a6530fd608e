"""Joint audio + video DiT: audio off = the video DiT, joint shapes and zero init, the common RoPE clock, a noise
level per modality, relative time, block-causal joint mask, step cache / checkpointing, and the refusals."""

from __future__ import annotations

import pytest
import torch

from vidgen.diffusion.step_cache import StepCache
from vidgen.models import joint_audio
from vidgen.models.dit import DiT
from vidgen.models.joint_audio import JointModulation, audio_latents, audio_positions

torch.set_num_threads(1)  # as tests/conftest.py: tiny CPU models run fastest on one thread

TINY = dict(in_channels=4, dim=32, depth=2, num_heads=2, ffn_dim=64, text_dim=24, freq_dim=32)
CA, A = 3, 4  # audio latent channels, audio latents per video latent frame


def joint_dit(seed: int = 0, random_heads: bool = True, **overrides) -> DiT:
    """Tiny joint DiT; with random (non-zero) output heads and time projection so outputs depend on everything."""
    torch.manual_seed(seed)
    model = DiT(**{**TINY, "audio_channels": CA, "audio_per_latent_frame": A, **overrides}).eval()
    if random_heads:
        with torch.no_grad():
            model.proj_out.weight.normal_(0, 0.2)
            model.audio_stream.proj_out.weight.normal_(0, 0.2)
            model.condition_embedder.time_proj.weight.normal_(0, 0.2)
    return model


def inputs(b=2, t=3, h=4, w=6, a=A, seed=1):
    """z `[B, 4, T, H, W]`, text `[B, 5, 24]`, audio `[B, CA, T * a]`."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 4, t, h, w, generator=g), torch.randn(b, 5, 24, generator=g),
            torch.randn(b, CA, t * a, generator=g))


def test_audio_off_is_exactly_the_video_dit():
    z, ctx, audio = inputs()
    t = torch.tensor([0.3, 0.8])
    torch.manual_seed(0)
    plain = DiT(**TINY).eval()
    torch.manual_seed(0)
    off = DiT(**TINY, audio_channels=0, audio_per_latent_frame=8).eval()
    assert off.audio_stream is None
    assert list(off.state_dict()) == list(plain.state_dict())
    assert all(torch.equal(p, off.state_dict()[k]) for k, p in plain.state_dict().items())
    with torch.no_grad():
        plain.proj_out.weight.normal_(0, 0.2)
        off.proj_out.weight.copy_(plain.proj_out.weight)
        assert torch.equal(off(z, t, ctx), plain(z, t, ctx))
    # Audio on: the video DiT's parameters plus audio_stream.*; a call without audio is the video DiT's call.
    on = joint_dit(random_heads=False)
    assert {k: p for k, p in on.state_dict().items() if not k.startswith("audio_stream.")}.keys() == \
        plain.state_dict().keys()
    on.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        out = on(z, t, ctx)
    assert isinstance(out, torch.Tensor) and torch.equal(out, plain(z, t, ctx))


def test_joint_shapes_zero_init_and_gradients():
    z, ctx, audio = inputs()
    model = joint_dit(random_heads=False).train()
    v, v_audio = model(z, torch.rand(2), ctx, audio=audio)
    assert v.shape == z.shape and v_audio.shape == audio.shape == (2, CA, 3 * A)
    assert torch.count_nonzero(v) == 0 and torch.count_nonzero(v_audio) == 0  # both heads zero at init
    (v.square().sum() + (v_audio - audio).square().sum()).backward()
    assert model.audio_stream.proj_out.weight.grad.abs().sum() > 0
    # With non-zero heads every audio parameter learns, and the video loss alone reaches them through attention.
    model = joint_dit().train()
    v, v_audio = model(z, torch.rand(2, 3), ctx, audio=audio, t_audio=torch.rand(2, 3 * A))
    v.square().sum().backward(retain_graph=True)
    stream = dict(model.audio_stream.named_parameters())
    assert all(stream[n].grad.abs().sum() > 0 for n in ("embedding.weight", "modality")), "video loss -> audio tokens"
    v_audio.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stream.values())
    # A temporal patch: T a multiple of pt, audio still T * a latents.
    model = joint_dit(patch_size=(2, 2, 2))
    z4, ctx4, audio4 = inputs(t=4)
    with torch.no_grad():
        v, v_audio = model(z4, torch.rand(2), ctx4, audio=audio4)
    assert v.shape == z4.shape and v_audio.shape == audio4.shape


def test_common_clock_positions():
    """p(j) from the VAE's frame rule (stride s): audio j ends with frame s*i exactly when it sits at video latent i."""
    assert audio_latents(3, 8) == 24
    p = audio_positions(24, 8)
    assert p[[0, 3, 7, 8, 15, 23]].tolist() == [-7 / 8, -1 / 2, 0.0, 1 / 8, 1.0, 2.0]
    for s, a in [(2, 8), (4, 8), (4, 4), (4, 1)]:
        frames = 3
        # Video: latent 0 = frame 0 alone, latent i >= 1 = frames s(i-1)+1 .. s*i; its RoPE position is i.
        last_frame = [0] + [s * i for i in range(1, frames)]
        # Audio: a latents per s frames (a/s per frame), starting s-1 frames before frame 0 (latent 0's padded window);
        # audio latent j ends at frame -s + (j + 1) * s / a. Its position on the video clock is that frame / s.
        ends = [-s + (j + 1) * s / a for j in range(frames * a)]
        p = audio_positions(frames * a, a)
        torch.testing.assert_close(p, torch.tensor(ends, dtype=torch.float64) / s, atol=1e-12, rtol=0)
        for i, n in enumerate(last_frame):  # the audio latent ending with video latent i's last frame: same position
            j = ends.index(n)
            assert j == a * i + a - 1 and p[j] == i


def test_common_clock_rope_rotations():
    """The joint RoPE tables the blocks see: an audio token and a video token at the same time rotate alike."""
    a, t, h, w = 8, 3, 4, 6
    model = joint_dit(audio_per_latent_frame=a)
    z, ctx, audio = inputs(t=t, h=h, w=w, a=a)
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda mod, args: seen.update(mod=args[3], cos=args[4], sin=args[5]))
    with torch.no_grad():
        model(z, torch.rand(2), ctx, audio=audio, t_audio=torch.rand(2))
    nv, per_frame = t * (h // 2) * (w // 2), (h // 2) * (w // 2)
    dt = model.rope.axis_dims[0] // 2  # the temporal channels of the (cos, sin) tables
    assert seen["cos"].shape == (nv + t * a, model.dim // model.num_heads // 2)
    assert isinstance(seen["mod"], JointModulation) and seen["mod"].num_video == nv
    for table in (seen["cos"], seen["sin"]):
        video, audio_rope = table[:nv], table[nv:]
        for i in (0, 2):  # latent 0 (frame 0 alone) and a later one
            j = a * i + a - 1  # the audio latent that ends with latent i's last frame
            assert torch.equal(audio_rope[j, :dt], video[i * per_frame, :dt])
            assert torch.equal(video[i * per_frame + 5, :dt], video[i * per_frame, :dt])  # any token of frame i
            assert not torch.allclose(audio_rope[j - 1, :dt], video[i * per_frame, :dt])  # 1/8 of a frame earlier
        # Spatially every audio token sits at the frame centre: the same (h, w) angles for all of them.
        assert torch.equal(audio_rope[:, dt:], audio_rope[:1, dt:].expand(t * a, -1))
    centre = model.rope.at(torch.tensor([[0.0, (h // 2 - 1) / 2, (w // 2 - 1) / 2]]))[0]
    torch.testing.assert_close(seen["cos"][nv:nv + 1, dt:], centre[:, dt:], atol=0, rtol=0)
    # RotaryEmbedding3D.at at integer positions = its grid call, bit for bit.
    grid = model.rope(2, 3, 2, offset=(5, 0, 0))
    pos = torch.tensor([[f + 5, y, x] for f in range(2) for y in range(3) for x in range(2)], dtype=torch.float64)
    assert all(torch.equal(u, v) for u, v in zip(model.rope.at(pos), grid))
    # A temporal patch pt = 2: video token k stamps latent 2k + 1, so audio ending with latent 1 sits at token 0.
    stream = model.audio_stream
    pos = stream.rope_positions(4 * a, h, w, patch_t=2, offset=3)
    assert pos[a * 1 + a - 1, 0] == 3 and pos[a * 3 + a - 1, 0] == 4


def no_token_mixing(model: DiT) -> DiT:
    """Self-attention output zeroed in every block: each token's output depends on its own input, t and the text."""
    with torch.no_grad():
        for block in model.blocks:
            block.attn1.to_out.weight.zero_()
            block.attn1.to_out.bias.zero_()
    return model


def test_noise_level_per_modality():
    """Video-to-audio (video t = 0, audio t = 1): t_audio modulates the audio tokens and only them, per audio latent."""
    z, ctx, audio = inputs()
    t0, t1 = torch.zeros(2), torch.ones(2)
    ta = 3 * A
    with torch.no_grad():
        model = no_token_mixing(joint_dit())  # the streams cannot talk: any effect is modulation
        v, v_audio = model(z, t0, ctx, audio=audio, t_audio=t1)
        v2, v_audio2 = model(z, t0, ctx, audio=audio, t_audio=torch.full((2,), 0.5))
        torch.testing.assert_close(v2, v, atol=0, rtol=0)  # t_audio does not reach the video tokens
        assert (v_audio2 - v_audio).abs().amin() > 0  # ... and does reach every audio token
        v3, v_audio3 = model(z, torch.full((2,), 0.5), ctx, audio=audio, t_audio=t1)
        torch.testing.assert_close(v_audio3, v_audio, atol=0, rtol=0)  # the video's t does not reach the audio
        assert (v3 - v).abs().amax() > 1e-3
        # Per audio latent: changing one latent's t_audio changes that latent's velocity only.
        # A [B, Ta] t_audio of ones is the [B] one broadcast (another matmul shape: equal up to float rounding, 2.4e-7
        # on some CPUs); against it, the per-latent comparison is exact.
        t_each = torch.ones(2, ta)
        v_each = model(z, t0, ctx, audio=audio, t_audio=t_each)[1]
        torch.testing.assert_close(v_each, v_audio, atol=1e-6, rtol=0)
        t_each[:, 5] = 0.0
        changed = (model(z, t0, ctx, audio=audio, t_audio=t_each)[1] - v_each).abs().amax(dim=1)  # [B, Ta]
        assert (changed[:, 5] > 0).all() and torch.count_nonzero(changed[:, torch.arange(ta) != 5]) == 0
        # With attention the streams talk: the audio's noise level changes the video's velocity too.
        model = joint_dit()
        v, v_audio = model(z, t0, ctx, audio=audio, t_audio=t1)
        assert (model(z, t0, ctx, audio=audio, t_audio=torch.full((2,), 0.5))[0] - v).abs().amax() > 1e-4
        # t_audio defaults to t when t is per sample.
        t = torch.tensor([0.3, 0.7])
        for a, b in zip(model(z, t, ctx, audio=audio), model(z, t, ctx, audio=audio, t_audio=t)):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_joint_attention_is_relative_in_time(monkeypatch):
    """Shifting both streams' RoPE origin by a latent frame changes nothing; shifting the audio alone does."""
    z, ctx, audio = inputs()
    model = joint_dit()
    t, t_audio = torch.tensor([0.2, 0.6]), torch.tensor([0.9, 0.4])
    with torch.no_grad():
        v, v_audio = model(z, t, ctx, audio=audio, t_audio=t_audio)
        v1, v_audio1 = model(z, t, ctx, audio=audio, t_audio=t_audio, frame_offset=1)
        torch.testing.assert_close(v1, v, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(v_audio1, v_audio, atol=1e-5, rtol=1e-4)
        shifted = joint_audio.audio_positions
        monkeypatch.setattr(joint_audio, "audio_positions", lambda *args, **kw: shifted(*args, **kw) + 1)
        v2, v_audio2 = model(z, t, ctx, audio=audio, t_audio=t_audio)
    assert (v2 - v).abs().amax() > 1e-3 and (v_audio2 - v_audio).abs().amax() > 1e-3


def test_causal_joint_mask_keeps_the_future_out():
    """Block-causal joint DiT: chunk c's video and audio see neither the video nor the audio of later chunks."""
    model = joint_dit(attention="causal", chunk_frames=1)
    z, ctx, audio = inputs()
    z2, audio2 = z.clone(), audio.clone()
    z2[:, :, -1] += 1.0
    audio2[:, :, -A:] += 1.0  # the last latent frame and its audio window
    t, t_audio = torch.tensor([0.3, 0.6]), torch.rand(2, 3 * A, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        v, v_audio = model(z, t, ctx, audio=audio, t_audio=t_audio)
        v2, v_audio2 = model(z2, t, ctx, audio=audio2, t_audio=t_audio)
        torch.testing.assert_close(v2[:, :, :-1], v[:, :, :-1], atol=1e-6, rtol=0)
        torch.testing.assert_close(v_audio2[:, :, :-A], v_audio[:, :, :-A], atol=1e-6, rtol=0)
        assert (v2[:, :, -1] - v[:, :, -1]).abs().amax() > 1e-3
        audio3 = audio.clone()
        audio3[:, :, :A] += 1.0  # frame 0's audio: frame 0's video sees it (same chunk)
        assert (model(z, t, ctx, audio=audio3, t_audio=t_audio)[0][:, :, 0] - v[:, :, 0]).abs().amax() > 1e-4


def test_step_cache_and_gradient_checkpointing_with_audio():
    z, ctx, audio = inputs()
    t, t_audio = torch.tensor([0.5, 0.5]), torch.tensor([0.7, 0.7])
    model = joint_dit()
    with torch.no_grad():
        bare = model(z, t, ctx, audio=audio, t_audio=t_audio)
        cached = StepCache(model, threshold=0.0)(z, t, context=ctx, audio=audio, t_audio=t_audio)
        assert all(torch.equal(a, b) for a, b in zip(cached, bare))
        cache = StepCache(model, threshold=1e9)
        cache(z, t, context=ctx, audio=audio, t_audio=t_audio)
        skipped = cache(z, t, context=ctx, audio=audio, t_audio=t_audio)  # blocks skipped: input + residual
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(skipped, bare))
    results, t_each = [], torch.rand(2, 3 * A, generator=torch.Generator().manual_seed(0))
    for ckpt in (False, True):
        model = joint_dit(gradient_checkpointing=ckpt).train()
        v, v_audio = model(z, t, ctx, audio=audio, t_audio=t_each)
        (v.square().mean() + v_audio.square().mean()).backward()
        results.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in results[0].items():
        torch.testing.assert_close(results[1][name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_refusals():
    z, ctx, audio = inputs()
    t = torch.rand(2)
    model = joint_dit()
    with torch.no_grad():
        with pytest.raises(ValueError, match="audio_channels=0"):
            DiT(**TINY)(z, t, ctx, audio=audio)
        with pytest.raises(ValueError, match="4 channels, the DiT's audio_channels=3"):
            model(z, t, ctx, audio=torch.randn(2, 4, 3 * A))
        with pytest.raises(ValueError, match=r"Ta=11 latents; 3 latent frames need Ta = T \* audio_per_latent_frame"):
            model(z, t, ctx, audio=audio[:, :, :-1])
        with pytest.raises(ValueError, match=r"\[B, Ca, Ta\]"):
            model(z, t, ctx, audio=audio[0])
        with pytest.raises(ValueError, match="pass t_audio"):
            model(z, torch.rand(2, 3), ctx, audio=audio)
        with pytest.raises(ValueError, match=r"t_audio must be \[B\]"):
            model(z, t, ctx, audio=audio, t_audio=torch.rand(2, 5))
        with pytest.raises(ValueError, match="t_audio given without audio"):
            model(z, t, ctx, t_audio=t)
        causal = joint_dit(attention="causal", chunk_frames=1)
        with pytest.raises(ValueError, match="audio does not stream"):
            causal(z[:, :, :1], t, ctx, audio=audio[:, :, :A], kv_cache=causal.new_kv_cache())
        model.sp = object()  # set by enable_sequence_parallel; the refusal comes before it is used
        with pytest.raises(ValueError, match="audio does not run sequence-parallel"):
            model(z, t, ctx, audio=audio)
    with pytest.raises(ValueError, match="audio_per_latent_frame=0"):
        DiT(**TINY, audio_channels=2, audio_per_latent_frame=0)
