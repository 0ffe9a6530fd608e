"""Bounded memory: chunked (CausalCache) encode/decode equal the whole pass; tiled blending is exact for
local maps (the VAE's own tiled-vs-whole tolerance is tested on a trained model in test_vae_training.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vidgen.models.causal_conv import CausalCache, CausalConv3d
from vidgen.models.tiling import ramp, tile_starts, tiled_map
from vidgen.models.vae import VideoVAE

TINY = dict(latent_channels=4, base_channels=8, channel_mult=[1, 2, 4, 4], num_res_blocks=1,
            temporal_downsample=[False, True, True])


@pytest.fixture(scope="module")
def vae() -> VideoVAE:
    torch.manual_seed(0)
    return VideoVAE(**TINY).eval()


def test_causal_conv_streams_exactly():
    torch.manual_seed(0)
    conv = CausalConv3d(3, 5, 3, padding=1)
    x = torch.randn(2, 3, 7, 6, 6)
    cache = CausalCache()
    chunks = [conv(x[:, :, a:b], cache) for a, b in [(0, 1), (1, 2), (2, 5), (5, 7)]]  # 1-frame chunks too
    torch.testing.assert_close(torch.cat(chunks, dim=2), conv(x), atol=1e-6, rtol=0)
    assert len(cache) == 1 and cache.nbytes() == 2 * 3 * 2 * 6 * 6 * 4  # only the last 2 input frames are kept


def test_chunked_encode_equals_whole(vae):
    x = torch.rand(1, 3, 17, 32, 32) * 2 - 1
    with torch.no_grad():
        whole = vae.encode(x)
        for chunk in (1, 3):  # 1: Wan's frame-0-then-4-frames schedule; 3: an uneven last chunk
            chunked = vae.encode(x, chunk_size=chunk)
            assert (whole.mean - chunked.mean).abs().max() <= 1e-4, chunk
            assert (whole.logvar - chunked.logvar).abs().max() <= 1e-4, chunk


def test_chunked_decode_equals_whole(vae):
    z = torch.randn(1, 4, 5, 4, 4)
    with torch.no_grad():
        whole = vae.decode(z, clamp=False)
        for chunk in (1, 2):
            chunked = vae.decode(z, chunk_size=chunk, clamp=False)
            assert chunked.shape == (1, 3, 17, 32, 32)
            assert (whole - chunked).abs().max() <= 1e-4, chunk


def test_tile_layout_and_ramps():
    assert tile_starts(100, 40, 30) == [0, 30, 60]
    assert tile_starts(32, 64, 48) == [0]
    w = ramp(8, 8, 16, 3)
    assert w.tolist() == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1, 1, 1])  # fades in, flush with the end
    assert ramp(8, 0, 8, 3).tolist() == [1.0] * 8  # no neighbour: no fade


@pytest.mark.parametrize("scale", [1 / 8, 8.0])
def test_tiled_map_blends_local_maps_exactly(scale):
    """For a map without spatial context (pointwise + resampling), tiling with blending changes nothing."""
    x = torch.randn(1, 2, 3, 48, 80) if scale < 1 else torch.randn(1, 2, 3, 6, 10)

    def fn(t: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(t) * 2 + 1
        if scale < 1:
            return F.avg_pool3d(y, (1, 8, 8))
        return F.interpolate(y, scale_factor=(1, 8, 8), mode="nearest")

    tile, overlap = (32, 16) if scale < 1 else (4, 2)
    torch.testing.assert_close(tiled_map(fn, x, tile, overlap, scale), fn(x), atol=1e-5, rtol=1e-5)


def test_vae_tiling_shapes_and_identity_when_one_tile(vae):
    x = torch.rand(1, 3, 5, 48, 48) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x, tile_size=32, tile_overlap=16, chunk_size=1).mean
        assert z.shape == (1, 4, 2, 6, 6)
        assert vae.decode(z, tile_size=32, tile_overlap=16).shape == x.shape
        torch.testing.assert_close(vae.encode(x, tile_size=128).mean, vae.encode(x).mean)  # one tile = whole
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(x, tile_size=36)
