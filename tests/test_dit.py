"""DiT: shapes over buckets, per-frame t, zero init, relative RoPE, checkpointing, configs, diffusers parity."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from vidgen.io.convert_wan_dit import convert_wan_state_dict, dit_config_from_diffusers
from vidgen.models.dit import DiT, spatial_position_embedding
from vidgen.models.layers import RotaryEmbedding3D, apply_rope
from vidgen.io.pretrained import load_pretrained, save_pretrained

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"
TINY = dict(in_channels=4, dim=32, depth=2, num_heads=2, ffn_dim=64, text_dim=24, freq_dim=32)
WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6)


def tiny_dit(seed: int = 0, **overrides) -> DiT:
    """Tiny DiT with a random (non-zero) output projection so outputs depend on everything."""
    torch.manual_seed(seed)
    model = DiT(**{**TINY, **overrides}).eval()
    with torch.no_grad():
        model.proj_out.weight.normal_(0, 0.2)
        model.condition_embedder.time_proj.weight.normal_(0, 0.2)
    return model


def inputs(b=2, c=4, t=3, h=8, w=8, length=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, t, h, w, generator=g), torch.randn(b, length, 24, generator=g)


@pytest.mark.parametrize("bucket", [(1, 8, 8), (3, 8, 12), (5, 4, 16)])
def test_output_shapes_over_buckets(bucket):
    model = tiny_dit()
    z, ctx = inputs(t=bucket[0], h=bucket[1], w=bucket[2])
    with torch.no_grad():
        assert model(z, torch.rand(2), ctx).shape == z.shape
        assert model(z, torch.rand(2, bucket[0]), ctx).shape == z.shape  # per-frame t


def test_temporal_patch_and_bad_shapes():
    model = tiny_dit(patch_size=(2, 2, 2), out_channels=6)
    z, ctx = inputs(t=4)
    with torch.no_grad():
        assert model(z, torch.rand(2, 4), ctx).shape == (2, 6, 4, 8, 8)
        with pytest.raises(ValueError, match="patch"):
            model(z[:, :, :3], torch.rand(2), ctx)
        with pytest.raises(ValueError, match=r"\[B, T\]"):
            model(z, torch.rand(2, 3), ctx)


def test_output_is_zero_at_init():
    model = DiT(**TINY)
    z, ctx = inputs()
    with torch.no_grad():
        assert torch.count_nonzero(model(z, torch.rand(2), ctx)) == 0


def test_per_frame_t_constant_equals_scalar_t_and_frames_follow_their_t():
    model = tiny_dit()
    z, ctx = inputs(t=3)
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        v_scalar = model(z, t, ctx)
        v_frames = model(z, t[:, None].expand(2, 3), ctx)
        torch.testing.assert_close(v_frames, v_scalar, atol=1e-6, rtol=1e-5)
        t2 = t[:, None].expand(2, 3).clone()
        t2[:, 0] = 0.0  # frame 0 clean: the output changes
        assert not torch.allclose(model(z, t2, ctx), v_scalar, atol=1e-4)


def test_rope_is_relative():
    rope = RotaryEmbedding3D(head_dim=16)
    q, k = torch.randn(2, 2, 3 * 4 * 5, 16), torch.randn(2, 2, 3 * 4 * 5, 16)
    scores = apply_rope(q, *rope(3, 4, 5)) @ apply_rope(k, *rope(3, 4, 5)).transpose(-1, -2)
    shifted = rope(3, 4, 5, offset=(7, 11, 13))
    scores_shifted = apply_rope(q, *shifted) @ apply_rope(k, *shifted).transpose(-1, -2)
    torch.testing.assert_close(scores_shifted, scores, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(apply_rope(q, *shifted), apply_rope(q, *rope(3, 4, 5)))
    # The whole DiT has no absolute position: a temporal RoPE offset leaves its output unchanged.
    model = tiny_dit()
    z, ctx = inputs()
    t = torch.tensor([0.2, 0.6])
    with torch.no_grad():
        torch.testing.assert_close(model(z, t, ctx, frame_offset=9), model(z, t, ctx), atol=1e-5, rtol=1e-4)


def test_abs_pos_tells_tokens_where_they_are():
    """RoPE is relative: a constant latent gives the same output at every position; abs_pos breaks that symmetry."""
    emb = spatial_position_embedding(2, 3, 4, 32)
    assert emb.shape == (2 * 3 * 4, 32) and torch.equal(emb[:12], emb[12:])  # the same for every frame
    assert len({tuple(row.tolist()) for row in emb[:12]}) == 12  # every (row, column) distinct
    assert torch.equal(emb[5, :16], emb[6, :16]) and not torch.equal(emb[5, 16:], emb[6, 16:])  # same row
    z = torch.ones(1, 4, 2, 6, 8)  # patch (1, 2, 2): 2 x 3 x 4 tokens, all equal
    ctx = torch.randn(1, 5, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = tiny_dit()(z, torch.tensor([0.5]), ctx)
        placed = tiny_dit(abs_pos=True)(z, torch.tensor([0.5]), ctx)
    patches = plain.unfold(3, 2, 2).unfold(4, 2, 2)  # [1, C, T, 3, 4, 2, 2]: one entry per token
    assert (patches - patches[:, :, :, :1, :1]).abs().max() < 1e-5
    placed_patches = placed.unfold(3, 2, 2).unfold(4, 2, 2)
    assert (placed_patches[:, :, :, 1:, 1:] - placed_patches[:, :, :, :1, :1]).abs().amin() > 0


def test_context_mask_ignores_padding():
    model = tiny_dit()
    z, ctx = inputs(length=4)
    padded = torch.cat([ctx, torch.randn(2, 3, 24)], dim=1)
    mask = torch.tensor([[True] * 4 + [False] * 3] * 2)
    t = torch.tensor([0.4, 0.9])
    with torch.no_grad():
        torch.testing.assert_close(model(z, t, padded, mask), model(z, t, ctx), atol=1e-5, rtol=1e-4)
        assert not torch.allclose(model(z, t, padded), model(z, t, ctx), atol=1e-4)


def test_gradient_checkpointing_same_outputs_and_grads():
    z, ctx = inputs()
    t = torch.tensor([0.25, 0.75])
    results = []
    for ckpt in (False, True):
        model = tiny_dit(gradient_checkpointing=ckpt).train()
        out = model(z, t, ctx)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], atol=0, rtol=0)
    for name, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_save_and_load_pretrained(tmp_path):
    model = tiny_dit()
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path, DiT).eval()
    z, ctx = inputs()
    t = torch.tensor([0.5, 0.1])
    with torch.no_grad():
        torch.testing.assert_close(loaded(z, t, ctx), model(z, t, ctx), atol=0, rtol=0)


def test_wan21_1_3b_parameter_count_and_names_match_diffusers():
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        ref = WanTransformer3DModel(**WAN_1_3B)
        ours = DiT(**dit_config_from_diffusers(WAN_1_3B))
        yaml_cfg = OmegaConf.to_container(OmegaConf.load(CONFIGS / "dit" / "wan21_1.3b.yaml"))
        from_yaml = DiT(**{k: v for k, v in yaml_cfg.items() if k != "_target_"})
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in ref.parameters()) == 1_418_996_800
    assert sum(p.numel() for p in from_yaml.parameters()) == count
    ref_shapes = {k: tuple(v.shape) for k, v in convert_wan_state_dict(ref.state_dict()).items()}
    assert ref_shapes == {k: tuple(v.shape) for k, v in ours.state_dict().items()}


def test_matches_diffusers_wan_with_imported_weights():
    from diffusers import WanTransformer3DModel

    cfg = dict(WAN_1_3B, num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=24,
               freq_dim=32, ffn_dim=64, num_layers=2)
    torch.manual_seed(0)
    ref = WanTransformer3DModel(**cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
    ours = DiT(**dit_config_from_diffusers(cfg)).eval()
    ours.load_state_dict(convert_wan_state_dict(ref.state_dict()), strict=True)
    z, ctx = inputs(t=3, h=8, w=12, length=7)
    t = torch.tensor([250.0, 750.0])  # Wan's 0..1000 timesteps; exactly representable after / 1000
    t_frames = torch.tensor([[250.0, 500.0, 1000.0], [0.0, 750.0, 125.0]])
    with torch.no_grad():
        torch.testing.assert_close(ours(z, t / 1000, ctx), ref(z, t, ctx, return_dict=False)[0], atol=1e-5, rtol=0)
        # diffusers' per-token timesteps (Wan 2.2 TI2V path) = our per-frame t broadcast over each frame's tokens.
        ref_frames = ref(z, t_frames.repeat_interleave(4 * 6, dim=1), ctx, return_dict=False)[0]
        torch.testing.assert_close(ours(z, t_frames / 1000, ctx), ref_frames, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["tiny", "S", "B", "L", "XL", "wan21_1.3b"])
def test_configs_instantiate(name):
    from hydra.utils import instantiate

    cfg = OmegaConf.create({"model": {"dit": OmegaConf.load(CONFIGS / "dit" / f"{name}.yaml"),
                                      "text": OmegaConf.load(CONFIGS / "text" / "byte.yaml")}})
    with torch.device("meta"):
        model = instantiate(cfg.model.dit)
    assert isinstance(model, DiT)
    expected = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}.get(name)
    if expected:
        assert (model.dim, len(model.blocks), model.num_heads) == expected
    if name != "wan21_1.3b":
        assert model.condition_embedder.text_embedder.linear_1.in_features == cfg.model.text.dim
