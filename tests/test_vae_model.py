"""Causal video VAE: shapes, the 1 + 4k frame rule, causality, latent normalisation, and parity with
diffusers' AutoencoderKLWan (parameter count of the wan21 config, and equal outputs on copied weights)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from vidgen.models.vae import DiagonalGaussian, VideoVAE

ROOT = Path(__file__).resolve().parents[1]


def vae_config(name: str) -> dict:
    cfg = yaml.safe_load((ROOT / "configs" / "model" / "vae" / f"{name}.yaml").read_text())
    assert cfg.pop("_target_") == "vidgen.models.vae.VideoVAE"
    return cfg


@pytest.fixture(scope="module")
def tiny() -> VideoVAE:
    torch.manual_seed(0)
    return VideoVAE(**vae_config("tiny")).eval()


def test_config_sizes():
    with torch.device("meta"):
        sizes = {n: sum(p.numel() for p in VideoVAE(**vae_config(n)).parameters()) for n in ("tiny", "small", "wan21")}
    assert sizes["tiny"] < 1_000_000
    assert 2_000_000 <= sizes["small"] <= 5_000_000
    assert sizes["wan21"] == 126_892_531


@pytest.mark.parametrize("frames", [1, 5, 9, 17])
def test_shapes(tiny, frames):
    x = torch.rand(2, 3, frames, 32, 48) * 2 - 1
    with torch.no_grad():
        posterior = tiny.encode(x)
        assert posterior.mean.shape == (2, 4, 1 + (frames - 1) // 4, 4, 6)
        assert posterior.logvar.shape == posterior.mean.shape
        recon = tiny.decode(posterior.sample(torch.Generator().manual_seed(0)))
    assert recon.shape == x.shape
    assert recon.abs().max() <= 1.0
    assert tiny.latent_frames(frames) == posterior.mean.shape[2] and tiny.pixel_frames(posterior.mean.shape[2]) == frames


def test_bad_frame_count_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match=r"got 10 frames.*1 \+ 4k.*use 9 or 13 frames"):
        tiny.encode(torch.zeros(1, 3, 10, 32, 32))
    with pytest.raises(ValueError, match=r"30x32.*multiples of 8"):
        tiny.encode(torch.zeros(1, 3, 9, 30, 32))
    with pytest.raises(ValueError, match=r"expects z \[B, 4"):
        tiny.decode(torch.zeros(1, 3, 3, 4, 4))


def test_encoder_and_decoder_are_causal(tiny):
    """Changing frames after 4j leaves latent frames <= j unchanged; changing latents after j leaves pixels <= 4j."""
    torch.manual_seed(1)
    x = torch.rand(1, 3, 17, 32, 32) * 2 - 1
    x2 = x.clone()
    x2[:, :, 9:] = torch.rand_like(x2[:, :, 9:])  # frames 9.. differ -> latent frames 0..2 (pixels 0..8) fixed
    with torch.no_grad():
        z, z2 = tiny.encode(x).mean, tiny.encode(x2).mean
        assert torch.equal(z[:, :, :3], z2[:, :, :3])
        assert not torch.allclose(z[:, :, 3:], z2[:, :, 3:])
        z3 = z.clone()
        z3[:, :, 3:] += 1.0
        y, y3 = tiny.decode(z, clamp=False), tiny.decode(z3, clamp=False)
    assert torch.equal(y[:, :, :9], y3[:, :, :9])
    assert not torch.allclose(y[:, :, 9:], y3[:, :, 9:])


def test_latent_normalisation_round_trip(tiny):
    vae = VideoVAE(**vae_config("tiny")).eval()
    vae.load_state_dict(tiny.state_dict())
    x = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad(), pytest.warns(UserWarning, match="no latent statistics"):
        vae.encode(x, normalize=True)
    mean, std = torch.tensor([0.5, -1.0, 2.0, 0.0]), torch.tensor([2.0, 0.5, 1.0, 3.0])
    vae.set_latent_stats(mean, std)
    with torch.no_grad():
        raw, norm = vae.encode(x), vae.encode(x, normalize=True)
        view = (1, -1, 1, 1, 1)
        torch.testing.assert_close(norm.mean, (raw.mean - mean.view(view)) / std.view(view))
        torch.testing.assert_close(norm.std, raw.std / std.view(view))
        torch.testing.assert_close(vae.decode(norm.mean, normalized=True), vae.decode(raw.mean), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="need 4 values"):
        vae.set_latent_stats([0.0], [1.0])


def test_diagonal_gaussian():
    mean, logvar = torch.zeros(2, 3, 1, 2, 2), torch.zeros(2, 3, 1, 2, 2)
    d = DiagonalGaussian(mean, logvar)
    assert torch.equal(d.kl(), torch.zeros(2))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(d.sample(g1), d.sample(g2))
    assert torch.equal(d.mode(), mean)


# ----------------------------------------------------------------------------------- diffusers parity
def test_wan21_matches_diffusers_parameters_and_keys():
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        ours, ref = VideoVAE(**vae_config("wan21")), AutoencoderKLWan()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) == 126_892_531
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert set(ours_sd) - set(ref_sd) == {"latent_mean", "latent_std"} and set(ref_sd) <= set(ours_sd)
    assert all(ours_sd[k].shape == v.shape for k, v in ref_sd.items())


def test_import_from_diffusers_gives_identical_outputs(tmp_path):
    """A random small AutoencoderKLWan saved by diffusers, imported through our converter, encodes/decodes the same."""
    from diffusers import AutoencoderKLWan

    from vidgen.io.convert_wan_vae import load_wan_vae_from_diffusers

    torch.manual_seed(0)
    ref = AutoencoderKLWan(base_dim=8, z_dim=4, num_res_blocks=1, latents_mean=[0.1, -0.2, 0.3, 0.0],
                           latents_std=[1.5, 2.0, 0.5, 1.0]).eval()
    with torch.no_grad():
        for p in ref.parameters():  # non-trivial norms/attention (defaults are ones/zeros)
            p.add_(torch.randn_like(p) * 0.05)
    ref.save_pretrained(tmp_path / "wan_vae")
    ours = load_wan_vae_from_diffusers(tmp_path / "wan_vae").eval()
    torch.testing.assert_close(ours.latent_std, torch.tensor([1.5, 2.0, 0.5, 1.0]))
    x = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    with torch.no_grad():
        ref_post = ref.encode(x).latent_dist  # diffusers encodes frame 0, then 4-frame chunks with its cache
        post = ours.encode(x)  # we encode the whole clip in one pass
        torch.testing.assert_close(post.mean, ref_post.mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(post.logvar, ref_post.logvar, atol=1e-5, rtol=1e-5)
        ref_x = ref.decode(ref_post.mean).sample  # diffusers decodes latent frame by latent frame
        torch.testing.assert_close(ours.decode(post.mean), ref_x, atol=1e-5, rtol=1e-5)


def test_patched_vae_folds_pixels_and_keeps_every_rule():
    """patch_size 2 (Wan 2.2's fold) with one 2x downsampling: 4x space, 2x time; chunked/tiled passes still agree."""
    torch.manual_seed(0)
    vae = VideoVAE(latent_channels=4, base_channels=8, channel_mult=[1, 2], num_res_blocks=1,
                   temporal_downsample=[True], patch_size=2).eval()
    assert (vae.temporal_factor, vae.spatial_factor) == (2, 4)
    assert vae.encoder.conv_in.in_channels == 12 and vae.decoder.conv_out.out_channels == 12
    x = torch.rand(1, 3, 9, 16, 24) * 2 - 1
    folded = vae._fold(x)
    assert folded.shape == (1, 12, 9, 8, 12) and torch.equal(vae._unfold(folded), x)
    assert torch.equal(folded[0, :4, 0, 0, 0], torch.stack([x[0, 0, 0, 0, 0], x[0, 0, 0, 0, 1],
                                                            x[0, 0, 0, 1, 0], x[0, 0, 0, 1, 1]]))
    with torch.no_grad():
        post = vae.encode(x)
        assert post.mean.shape == (1, 4, 5, 4, 6) and vae.latent_frames(9) == 5 and vae.pixel_frames(5) == 9
        recon = vae.decode(post.mean)
        assert recon.shape == x.shape
        assert (vae.encode(x, chunk_size=2).mean - post.mean).abs().max() <= 1e-4
        assert (vae.decode(post.mean, chunk_size=2) - recon).abs().max() <= 1e-4
    with pytest.raises(ValueError, match=r"1 \+ 2k.*use 9 or 11 frames"):
        vae.encode(torch.zeros(1, 3, 10, 16, 16))
    with pytest.raises(ValueError, match=r"multiples of 4"):
        vae.encode(torch.zeros(1, 3, 9, 18, 16))
    with pytest.raises(ValueError, match="patch_size must be >= 1"):
        VideoVAE(latent_channels=4, base_channels=8, channel_mult=[1, 2], temporal_downsample=[True], patch_size=0)
