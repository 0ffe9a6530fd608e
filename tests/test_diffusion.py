"""Diffusion core: convention, loss with clean frames, t sampling, schedule = diffusers, ODE accuracy, CFG, i2v."""

from __future__ import annotations

import pytest
import torch

from vidgen.conditioning import drop_captions, drop_embeddings
from vidgen.diffusion import (ClassifierFreeGuidance, Denoiser, RectifiedFlow, generate, sample_euler, sample_heun,
                              seeded_noise, timesteps)
from vidgen.models.dit import DiT

TINY = dict(in_channels=4, dim=32, depth=2, num_heads=2, ffn_dim=64, text_dim=24, freq_dim=32)


def tiny_dit(seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    model = DiT(**TINY).eval()
    with torch.no_grad():  # a non-zero output projection, so predictions are not trivially 0
        model.proj_out.weight.normal_(0, 0.2)
    return model


def text(b: int, length: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"context": torch.randn(b, length, 24, generator=g), "context_mask": torch.ones(b, length, dtype=torch.bool)}


# ------------------------------------------------------------------------------------------ the objective


def test_convention_roundtrip():
    flow = RectifiedFlow()
    x0, eps = torch.randn(2, 4, 3, 4, 4), torch.randn(2, 4, 3, 4, 4)
    for t in (torch.tensor([0.3, 0.9]), torch.rand(2, 3)):
        x_t = flow.add_noise(x0, eps, t)
        v = flow.target(x0, eps)
        torch.testing.assert_close(flow.predict_x0(x_t, t, v), x0)
        torch.testing.assert_close(flow.predict_noise(x_t, t, v), eps)
    torch.testing.assert_close(flow.add_noise(x0, eps, torch.zeros(2)), x0)
    torch.testing.assert_close(flow.add_noise(x0, eps, torch.ones(2)), eps)


def test_loss_with_clean_frames_ignores_them():
    flow = RectifiedFlow()
    x0, eps = torch.randn(2, 4, 5, 4, 4), torch.randn(2, 4, 5, 4, 4)
    t = torch.tensor([0.4, 0.7])
    seen = {}

    def model(x_t, t, garbage=0.0):
        seen.update(x_t=x_t, t=t)
        v = flow.target(x0, eps) + 0.1  # error 0.1 on every noisy element ...
        v[:, :, :2] += garbage          # ... and anything at all on frames 0, 1
        return v

    first2 = (torch.arange(5) < 2)[None].expand(2, 5)
    loss = Denoiser(model, flow).loss(x0, {"garbage": 0.0}, t=t, noise=eps, clean_mask=first2)
    assert torch.allclose(loss, torch.tensor(0.01))
    assert torch.equal(Denoiser(model, flow).loss(x0, {"garbage": 1e3}, t=t, noise=eps, clean_mask=first2), loss)
    assert torch.equal(seen["t"][:, :2], torch.zeros(2, 2)) and torch.equal(seen["t"][:, 2:], t[:, None].expand(2, 3))
    assert torch.equal(seen["x_t"][:, :, :2], x0[:, :, :2])  # clean frames are the conditioning, unnoised
    mask = torch.tensor([[True, True, False, False, True]] * 2)  # any bool [B, T] pattern
    loss_mask = Denoiser(model, flow).loss(x0, {"garbage": 0.0}, t=t, noise=eps, clean_mask=mask)
    assert torch.allclose(loss_mask, torch.tensor(0.01))


def test_loss_trains_the_dit_end_to_end():
    flow = RectifiedFlow(per_frame_t=True)
    model = DiT(**TINY).train()
    x0 = torch.randn(2, 4, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    loss = Denoiser(model, flow).loss(x0, text(2, 5, 0), clean_mask=(torch.arange(3) < 1)[None], generator=g)
    loss.backward()
    assert loss.isfinite() and model.proj_out.weight.grad.abs().sum() > 0  # zero-init layer still learns


def test_sample_t_is_logit_normal_shifted_by_token_count():
    flow = RectifiedFlow(base_tokens=256, max_shift=100.0)
    g = torch.Generator().manual_seed(0)
    small = flow.sample_t(4096, num_tokens=256, generator=g)
    large = flow.sample_t(4096, num_tokens=256 * 16, generator=g)
    assert small.shape == (4096,) and 0 < small.min() and small.max() < 1
    assert abs(small.median().item() - 0.5) < 0.03          # shift 1: logit-normal(0, 1) has median 1/2
    assert abs(large.median().item() - 0.8) < 0.03          # shift sqrt(16) = 4: median 4*.5 / (1 + 3*.5) = 0.8
    assert flow.shift_for(256 * 16) == 4.0 and RectifiedFlow(max_shift=3.0).shift_for(10**6) == 3.0
    per_frame = RectifiedFlow(per_frame_t=True).sample_t(8, frames=5, generator=g)
    assert per_frame.shape == (8, 5) and per_frame.std(dim=1).min() > 0  # independent per frame


def test_cfg_dropout_of_text():
    g = torch.Generator().manual_seed(0)
    assert drop_captions(["a", "b"], 1.0, g) == ["", ""]
    assert drop_captions(["a", "b"], 0.0, g) == ["a", "b"]
    ctx, mask = torch.randn(3, 4, 8), torch.ones(3, 4, dtype=torch.bool)
    null, null_mask = torch.randn(6, 8), torch.tensor([True, True, False, False, False, False])
    out, out_mask = drop_embeddings(ctx, mask, null, null_mask, 1.0, g)
    assert out.shape == (3, 6, 8) and torch.equal(out[1], null) and torch.equal(out_mask[2], null_mask)
    out, out_mask = drop_embeddings(ctx, mask, null, null_mask, 0.0, g)
    assert torch.equal(out[:, :4], ctx) and not out[:, 4:].any() and not out_mask[:, 4:].any()


# ------------------------------------------------------------------------------------------ the samplers


@pytest.mark.parametrize("shift", [1.0, 2.5, 3.0, 5.0, 7.0])
@pytest.mark.parametrize("steps", [1, 4, 20, 50])
def test_timesteps_equal_diffusers_flow_match_euler(shift, steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    ref.set_timesteps(steps)
    sigmas = timesteps(steps, shift)
    assert torch.equal(sigmas, ref.sigmas)
    assert torch.equal(sigmas[:-1] * 1000, ref.timesteps)


def gaussian_velocity(m: float, s: float):
    """Exact v(x_t, t) = E[eps - x0 | x_t] for x0 ~ N(m, s^2), eps ~ N(0, 1), x_t = (1-t) x0 + t eps."""

    def v(x, t):
        t = t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        a = 1 - t
        var = a * a * s * s + t * t  # Var[x_t]; Cov[x0, x_t] = a s^2, Cov[eps, x_t] = t
        return (t - a * s * s) / var * (x - a * m) - m

    return v


def test_euler_and_heun_reproduce_gaussian_data():
    m, s, steps = 1.5, 0.5, 24
    x1 = torch.randn(20000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = m + s * x1  # the 1D flow map is monotone, so the ODE must send x1 to m + s x1
    sigmas = timesteps(steps, shift=1.0)
    errors = {}
    for name, sampler in (("euler", sample_euler), ("heun", sample_heun)):
        x0 = sampler(gaussian_velocity(m, s), x1, sigmas)
        assert abs(x0.mean().item() - exact.mean().item()) < 0.01, name
        assert abs(x0.std().item() - exact.std().item()) < 0.05, name
        errors[name] = (x0 - exact).abs().max().item()
    assert errors["heun"] < 0.02 and errors["heun"] < errors["euler"] / 10, errors


def test_cfg_scale_one_equals_conditional_and_formula():
    model = tiny_dit()
    flow = RectifiedFlow()
    x, t = torch.randn(2, 4, 3, 8, 8), torch.tensor([0.5, 0.8])
    cond, uncond = text(2, 5, 1), text(1, 3, 2)  # different lengths, negative prompt broadcast to the batch
    fn = Denoiser(model, flow).velocity
    calls = []
    counted = lambda x_, t_, c_: calls.append(x_.shape[0]) or fn(x_, t_, c_)  # noqa: E731
    with torch.no_grad():
        v_c = fn(x, t, cond)
        torch.testing.assert_close(ClassifierFreeGuidance(1.0)(counted, x, t, cond, uncond), v_c, atol=1e-5, rtol=1e-5)
        assert calls == [4]  # one batched forward for both branches
        v_u = fn(x, t, {k: v.expand(2, *v.shape[1:]) for k, v in uncond.items()})
        torch.testing.assert_close(ClassifierFreeGuidance(4.0)(fn, x, t, cond, uncond), v_u + 4.0 * (v_c - v_u),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_image_to_video_keeps_clean_frames_exactly(sampler):
    denoiser = Denoiser(tiny_dit(), RectifiedFlow())
    clean = torch.randn(2, 4, 3, 8, 8)
    kwargs = dict(shape=(2, 4, 3, 8, 8), steps=3, guider=ClassifierFreeGuidance(3.0), shift=3.0, sampler=sampler,
                  seed=0)
    first = lambda k: (torch.arange(3) < k)[None]  # noqa: E731
    z0 = generate(denoiser, text(2, 5, 1), uncond=text(1, 2, 2), clean=clean, clean_mask=first(1), **kwargs)
    assert torch.equal(z0[:, :, :1], clean[:, :, :1])
    z_ext = generate(denoiser, text(2, 5, 1), clean=clean, clean_mask=first(2), **kwargs)
    assert torch.equal(z_ext[:, :, :2], clean[:, :, :2])  # video extension: the first k frames
    assert z0.isfinite().all() and not torch.equal(z0[:, :, 1:], z_ext[:, :, 1:])


def test_generate_is_seeded_per_sample():
    denoiser = Denoiser(tiny_dit(), RectifiedFlow())
    kwargs = dict(steps=2, guider=ClassifierFreeGuidance(2.0), shift=None)
    batch = generate(denoiser, text(1, 4, 0), (2, 4, 1, 8, 8), uncond=text(1, 1, 5), seed=[3, 4], **kwargs)
    single = generate(denoiser, text(1, 4, 0), (1, 4, 1, 8, 8), uncond=text(1, 1, 5), seed=4, **kwargs)
    torch.testing.assert_close(batch[1:], single, atol=1e-5, rtol=1e-5)
    assert torch.equal(seeded_noise((2, 3), 7)[1], seeded_noise((1, 3), 8)[0])
    with pytest.raises(ValueError, match="sampler"):
        generate(denoiser, text(1, 4, 0), (1, 4, 1, 8, 8), sampler="ddim")
    with pytest.raises(ValueError, match="guidance=-5"):
        ClassifierFreeGuidance(-5.0)


def test_training_and_sampling_feed_the_network_identical_tensors():
    """Same x0, noise, per-frame t and clean mask: Denoiser.loss and Denoiser.__call__ call the net identically."""
    calls = []

    class Recorder(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net, self.patch_size = net, net.patch_size

        def forward(self, x, t, **cond):
            calls.append((x.clone(), t.clone(), {k: v.clone() for k, v in cond.items()}))
            return self.net(x, t, **cond)

    denoiser = Denoiser(Recorder(tiny_dit()), RectifiedFlow())
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 3, 8, 8, generator=g), torch.randn(2, 4, 3, 8, 8, generator=g)
    t = torch.rand(2, 3, generator=g)
    mask = torch.tensor([[True, False, False], [True, True, False]])
    cond = text(2, 5, 1)
    with torch.no_grad():
        denoiser.loss(x0, cond, t=t, noise=noise, clean_mask=mask)
        x_t = RectifiedFlow.add_noise(x0, noise, t)  # what a sampler holds at these noise levels
        v = denoiser(x_t, t, cond, clean=x0, clean_mask=mask)
    (xa, ta, ca), (xb, tb, cb) = calls
    assert torch.equal(xa, xb) and torch.equal(ta, tb) and ca.keys() == cb.keys()
    assert all(torch.equal(ca[k], cb[k]) for k in ca)
    assert torch.equal(ta[mask], torch.zeros(int(mask.sum()))) and torch.equal(xa[:, :, 0], x0[:, :, 0])
    assert not v[:, :, 0].any() and not v[1, :, 1].any()  # clean frames get zero velocity
