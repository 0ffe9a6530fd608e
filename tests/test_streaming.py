"""Causal DiT, KV cache and the streaming sampler: the cached rollout equals recomputing every chunk over the
whole past; windows, prompt switches, flat memory; remix (SDEdit) ends."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from vidgen.diffusion.denoiser import Denoiser
from vidgen.diffusion.flow import RectifiedFlow
from vidgen.diffusion.guidance import ClassifierFreeGuidance
from vidgen.diffusion.sampling import generate, sample_euler, seeded_noise, timesteps
from vidgen.diffusion.streaming import PromptSegment, chunk_seeds, stream_chunks
from vidgen.io.convert_wan_dit import diffusers_config_from_dit
from vidgen.io.pretrained import WeightsError
from vidgen.models.causal_attention import block_causal_mask
from vidgen.models.dit import DiT

C, H, W, TEXT = 4, 4, 6, 16


def tiny_dit(seed: int = 0, **kw) -> DiT:
    torch.manual_seed(seed)
    dit = DiT(in_channels=C, dim=32, depth=2, num_heads=2, ffn_dim=64, text_dim=TEXT, freq_dim=32,
              abs_pos=True, **{"attention": "causal", **kw})
    with torch.no_grad():  # the zero-initialised output projection would make every velocity 0
        dit.proj_out.weight.normal_(0, 0.2)
    return dit.eval()


def text(seed: int, batch: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"context": torch.randn(batch, 5, TEXT, generator=g), "context_mask": torch.ones(batch, 5, dtype=torch.bool)}


def rollout(dit, segments, chunks, batch=1, steps=4, guidance=3.0, seed=7):
    den = Denoiser(dit, RectifiedFlow())
    shape = (batch, C, dit.chunk_frames, H, W)
    return [z for _, z in stream_chunks(den, segments, chunks, shape, steps=steps,
                                        guider=ClassifierFreeGuidance(guidance), shift=1.0, seed=seed)]


def recomputed(dit, cond, uncond, chunks, batch=1, steps=4, guidance=3.0, seed=7):
    """Reference: chunk c from its noise with full block-causal attention over [clean past, chunk] (no cache):
    the clean past pinned at t = 0 by the Denoiser's clean-frame rule, as in training."""
    den, cf = Denoiser(dit, RectifiedFlow()), dit.chunk_frames
    guider, past = ClassifierFreeGuidance(guidance), torch.zeros(batch, C, 0, H, W)
    for c in range(chunks):
        x = seeded_noise((batch, C, cf, H, W), chunk_seeds(seed, batch, c))
        mask = (torch.arange((c + 1) * cf) < c * cf)[None]

        def fn(x_, t_):
            full = torch.cat([past, x_], dim=2)
            clean = torch.cat([past, torch.zeros_like(x_)], dim=2)
            return den(full, t_, cond, clean=clean, clean_mask=mask, uncond=uncond, guider=guider)[:, :, -cf:]

        past = torch.cat([past, sample_euler(fn, x, timesteps(steps, 1.0))], dim=2)
    return list(past.split(cf, dim=2))


def test_block_causal_mask_window_and_sink():
    m = block_causal_mask(5, 1, window_chunks=2, sink_chunks=1).int()
    assert m.tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 1, 1, 0], [1, 0, 0, 1, 1]]
    assert block_causal_mask(2, 3).shape == (6, 6) and block_causal_mask(2, 3)[:3, 3:].sum() == 0


@pytest.mark.parametrize("chunk_frames, window, sink", [(1, None, 0), (2, None, 0), (1, 2, 1)])
def test_cached_rollout_equals_recomputing_over_the_whole_past(chunk_frames, window, sink):
    dit = tiny_dit(chunk_frames=chunk_frames, window_chunks=window, sink_chunks=sink)
    cond, uncond = text(1, 2), text(2)
    cached = rollout(dit, [PromptSegment(0, cond, uncond)], 5, batch=2)
    reference = recomputed(dit, cond, uncond, 5, batch=2)
    diffs = [(a - b).abs().max().item() for a, b in zip(cached, reference)]
    print(f"cached vs recomputed, per chunk (chunk_frames={chunk_frames}, window={window}, sink={sink}): "
          + ", ".join(f"{d:.1e}" for d in diffs))
    assert max(diffs) < 1e-5
    assert all(z.abs().mean() > 0.1 for z in cached)  # real samples, not zeros


def test_within_the_window_sliding_equals_unbounded():
    cond, uncond = text(1), text(2)
    windowed = rollout(tiny_dit(window_chunks=3, sink_chunks=1), [PromptSegment(0, cond, uncond)], 5)
    unbounded = rollout(tiny_dit(), [PromptSegment(0, cond, uncond)], 5)
    for c in range(3):  # chunks 0-2 see all of their past in both
        assert torch.allclose(windowed[c], unbounded[c], atol=1e-6, rtol=0)
    assert not torch.allclose(windowed[4], unbounded[4], atol=1e-3)  # chunk 4 no longer sees chunk 1 in the window


def test_cache_stays_flat_in_length():
    dit = tiny_dit(window_chunks=3, sink_chunks=1)
    den, cache = Denoiser(dit, RectifiedFlow()), dit.new_kv_cache()
    sizes = []
    for _ in stream_chunks(den, [PromptSegment(0, text(1))], 12, (1, C, 1, H, W), steps=2, cache=cache):
        sizes.append((cache.cached_chunks, cache.nbytes()))
    assert sizes[-1][0] == [0, 10, 11]  # the sink chunk + the window's 2 latest
    assert len({n for _, n in sizes[3:]}) == 1  # bytes constant once the window is full


def test_prompt_switch_keeps_the_chunks_before_it():
    dit, uncond = tiny_dit(window_chunks=3, sink_chunks=1), text(9)
    plain = rollout(dit, [PromptSegment(0, text(1), uncond)], 6)
    switched = rollout(dit, [PromptSegment(0, text(1), uncond), PromptSegment(3, text(2), uncond)], 6)
    for c in range(3):
        assert torch.equal(plain[c], switched[c])
    assert not torch.allclose(plain[3], switched[3], atol=1e-3)


def test_extension_context_equals_the_stream_that_made_it():
    """Streaming 2 chunks after a clip's latents = chunks 2.. of one stream whose first 2 chunks were those."""
    dit, cond, uncond = tiny_dit(), text(1), text(2)
    whole = rollout(dit, [PromptSegment(0, cond, uncond)], 4)
    den = Denoiser(dit, RectifiedFlow())
    cont = [z for _, z in stream_chunks(den, [PromptSegment(0, cond, uncond)], 2, (1, C, 1, H, W), steps=4,
                                        guider=ClassifierFreeGuidance(3.0), shift=1.0, seed=7,
                                        context=torch.cat(whole[:2], dim=2))]
    for a, b in zip(cont, whole[2:]):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_causal_mode_is_refused_where_it_cannot_run():
    full = DiT(in_channels=C, dim=32, depth=1, num_heads=2, text_dim=TEXT, freq_dim=32)
    with pytest.raises(ValueError, match="streaming needs a causal DiT"):
        next(stream_chunks(Denoiser(full, RectifiedFlow()), [PromptSegment(0, text(1))], 1, (1, C, 1, H, W)))
    with pytest.raises(ValueError, match="kv_cache given to a DiT with attention=full"):
        full(torch.zeros(1, C, 1, H, W), torch.zeros(1), **text(1), kv_cache=tiny_dit().new_kv_cache())
    with pytest.raises(WeightsError, match="attention='causal' does not map to diffusers"):
        diffusers_config_from_dit({**tiny_dit().config, "text_mask": False, "abs_pos": False})
    with pytest.raises(ValueError, match="one chunk of 1 latent frame"):
        dit = tiny_dit()
        dit(torch.zeros(1, C, 2, H, W), torch.zeros(1), **text(1), kv_cache=dit.new_kv_cache())


def test_remix_ends():
    """strength 0 returns the clip's latents; strength 1 is text-to-video from the same seed."""
    dit = tiny_dit(attention="full")
    den, cond, shape = Denoiser(dit, RectifiedFlow()), text(1), (1, C, 3, H, W)
    start = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    assert torch.equal(generate(den, cond, shape, steps=6, start=start, strength=0.0, shift=1.0), start)
    t2v = generate(den, cond, shape, steps=6, seed=4, shift=1.0)
    assert torch.equal(generate(den, cond, shape, steps=6, seed=4, shift=1.0, start=start, strength=1.0), t2v)
    half = generate(den, cond, shape, steps=6, seed=4, shift=1.0, start=start, strength=0.5)
    assert (half - start).abs().mean() < (t2v - start).abs().mean()  # closer to the clip than a new video is


MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys, tempfile
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from test_streaming import tiny_dit, text, C, H, W
    from vidgen.diffusion.denoiser import Denoiser
    from vidgen.diffusion.flow import RectifiedFlow
    from vidgen.diffusion.streaming import PromptSegment, stream_chunks
    from vidgen.io.video import VideoWriter, to_uint8_video
    from vidgen.models.vae import VideoVAE
    torch.manual_seed(0)
    vae = VideoVAE(latent_channels=C, base_channels=8, channel_mult=(1, 2), temporal_downsample=(True,)).eval()
    dit = tiny_dit(window_chunks=3, sink_chunks=1)
    segs = [PromptSegment(0, text(1))]
    zs = (z for _, z in stream_chunks(Denoiser(dit, RectifiedFlow()), segs, int(sys.argv[1]), (1, C, 1, 8, 8), steps=2))
    with torch.no_grad(), VideoWriter(tempfile.mkdtemp() + "/s.mp4", fps=8) as out:
        for x in vae.decode_stream(zs):
            out.write(to_uint8_video(x[0]))
    print(json.dumps({{"rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "frames": out.frames}}))
""")


def test_peak_memory_is_flat_in_length(tmp_path):
    """Separate processes stream 10 and 40 chunks (DiT + VAE decode + mp4 writer): peak RSS within 10%."""
    script = tmp_path / "stream_mem.py"
    script.write_text(MEMORY_SCRIPT.format(tests=str(__import__("pathlib").Path(__file__).parent)))
    runs = {}
    for n in (10, 40):
        out = subprocess.run([sys.executable, str(script), str(n)], capture_output=True, text=True, timeout=240)
        assert out.returncode == 0, out.stderr[-2000:]
        runs[n] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"peak RSS: 10 chunks {runs[10]['rss_kb'] / 1024:.0f} MiB ({runs[10]['frames']} frames), "
          f"40 chunks {runs[40]['rss_kb'] / 1024:.0f} MiB ({runs[40]['frames']} frames)")
    assert runs[40]["frames"] == 1 + 2 * 39 and runs[10]["frames"] == 1 + 2 * 9  # this VAE is 2x in time
    assert runs[40]["rss_kb"] <= 1.10 * runs[10]["rss_kb"]
