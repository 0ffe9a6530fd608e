"""Wrapping for scale: per-block torch.compile without graph breaks, checkpointing, FSDP units."""

from __future__ import annotations

import torch

from vidgen.models.dit import DiT, DiTBlock
from vidgen.training.parallelize import fsdp_wrap_policy, parallelize


def _tiny_dit() -> DiT:
    torch.manual_seed(0)
    dit = DiT(in_channels=4, dim=32, depth=2, num_heads=2, text_dim=16, freq_dim=32)
    torch.nn.init.normal_(dit.proj_out.weight, std=0.02)  # a non-zero output so gradients flow everywhere
    return dit


def _inputs():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 4, 3, 8, 8, generator=g)
    t = torch.rand(2, 3, generator=g)  # per-frame t
    ctx = torch.randn(2, 5, 16, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    return z, t, ctx, mask


def test_block_compiles_fullgraph_and_matches_eager():
    """fullgraph=True raises on any graph break; aot_eager also traces the backward graph."""
    z, t, ctx, mask = _inputs()
    eager = _tiny_dit()
    compiled = _tiny_dit()
    parallelize(compiled, compile=True, compile_backend="aot_eager")
    out_e, out_c = eager(z, t, ctx, mask), compiled(z, t, ctx, mask)
    torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-5)
    out_e.square().mean().backward()
    out_c.square().mean().backward()
    for (name, pe), (_, pc) in zip(eager.named_parameters(), compiled.named_parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_activation_checkpointing_same_gradients():
    z, t, ctx, mask = _inputs()
    plain, ckpt = _tiny_dit(), parallelize(_tiny_dit(), activation_checkpointing=True)
    assert ckpt.gradient_checkpointing
    plain(z, t, ctx, mask).sum().backward()
    ckpt(z, t, ctx, mask).sum().backward()
    for pp, pc in zip(plain.parameters(), ckpt.parameters()):
        torch.testing.assert_close(pc.grad, pp.grad, atol=1e-6, rtol=1e-5)


def test_fsdp_policy_wraps_each_block():
    policy = fsdp_wrap_policy()
    dit = _tiny_dit()
    wrapped = [m for m in dit.modules() if policy._module_classes and isinstance(m, tuple(policy._module_classes))]
    assert len(wrapped) == 2 and all(isinstance(m, DiTBlock) for m in wrapped)
