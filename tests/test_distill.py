"""DMD2 distillation (task=distill): the student's schedule and sampler, the DMD gradient, settings errors, and real
train.py runs (teacher -> 2-step student) on tiny latent shards: closer to the teacher's 50-step CFG samples, exact
resume, and a DiT export that samples with its recorded defaults alone."""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import pytest
import torch

from data_prep.encode_latents import main as encode_main
from runs import train
from sample import sampling_settings
from vidgen.conditioning import Conditioner, TextCondition
from vidgen.diffusion.denoiser import Denoiser
from vidgen.diffusion.distill import CriticHead, DistributionMatching, dmd_gradient, student_rollout, student_timesteps
from vidgen.diffusion.flow import RectifiedFlow, time_shift
from vidgen.diffusion.guidance import ClassifierFreeGuidance
from vidgen.diffusion.sampling import generate, sampler_start, seeded_noise
from vidgen.diffusion.streaming import PromptSegment, chunk_seeds, self_forcing_rollout, stream_chunks
from vidgen.errors import UserError
from vidgen.io.checkpoint import Part, load_checkpoint, read_parts, write_export
from vidgen.models.dit import DiT
from vidgen.models.text import ByteTextEncoder
from vidgen.pipeline import DiTPipeline
from vidgen.training.distill_module import DistillModule
from vidgen.training.recipe import ConfigError, check_checkpoint_kind

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [json.loads(line)["caption"] for line in (ROOT / "data_prep" / "demo_captions.jsonl").read_text().splitlines()
           if line.strip()][:3]
SIZE = dict(num_frames=9, height=32, width=32)  # tiny VAE: latents [4, 3, 4, 4]
GUIDANCE = 3.0
SEEDS = 16  # per prompt
SMALL = ["model.dit.dim=32", "model.dit.depth=2", "model.dit.num_heads=2", "model.dit.ffn_dim=64",
         "model.dit.freq_dim=32", "model.text.dim=16", "model.text.depth=1", "logger=none",
         "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false", "data.batch_size=6"]


def _tiny_dit(seed: int = 0, **causal) -> DiT:
    torch.manual_seed(seed)
    return DiT(in_channels=4, dim=32, depth=2, num_heads=2, ffn_dim=64, text_dim=16, freq_dim=32, **causal).eval()


CAUSAL = dict(attention="causal", chunk_frames=1, window_chunks=2, sink_chunks=1)


def _cond(batch: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"context": torch.randn(batch, 5, 16, generator=g), "context_mask": torch.ones(batch, 5, dtype=torch.bool)}


# ---------------------------------------------------------------------------------------------- pure torch
def test_student_timesteps_are_the_shifted_uniform_schedule():
    assert torch.allclose(student_timesteps(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    shifted = student_timesteps(4, shift=3.0)
    assert torch.allclose(shifted[:-1], time_shift(torch.tensor([1.0, 0.75, 0.5, 0.25]), 3.0)) and shifted[-1] == 0
    with pytest.raises(ValueError, match="steps=0"):
        student_timesteps(0)


@torch.no_grad()
def test_dmd_sampler_equals_training_time_student_sampling():
    """sample.py's sampler="dmd" (seeded noise + re-noising) = the student's backward simulation in training."""
    dit, cond, shape, steps, shift = _tiny_dit(), _cond(2), (2, 4, 3, 4, 4), 3, 2.0
    den = Denoiser(dit, RectifiedFlow())
    z = generate(den, cond, shape, steps=steps, sampler="dmd", shift=shift, seed=[5, 9])
    noise = seeded_noise(shape, [5, 9], draws=steps)  # [steps, B, ...]: start noise, then the re-noising
    assert torch.equal(noise[0], seeded_noise(shape, [5, 9]))
    trained = student_rollout(lambda x, t: den(x, t, cond), noise[0], student_timesteps(steps, shift), noise[1:],
                              exit_step=steps - 1)
    assert torch.allclose(z, trained, atol=1e-6, rtol=0)


def test_self_forcing_rollout_is_the_streaming_student_sampler():
    """The training rollout of a streaming student (Self-Forcing: chunk by chunk on its own cached output), with the
    last step as every chunk's exit, = `stream_chunks(sampler="dmd")` on the same noises; gradients reach the
    student through each chunk's exit step, and a chunk depends on the chunks the student generated before it."""
    dit, cond, steps, shift, seeds = _tiny_dit(**CAUSAL), _cond(2), 3, 2.0, [5, 9]
    with torch.no_grad():  # an output layer that is not zero (as at init), so each chunk depends on its context
        dit.proj_out.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(2))
    den, chunks, chunk_shape = Denoiser(dit, RectifiedFlow()), 4, (2, 4, 1, 4, 4)
    streamed = torch.cat([z for _, z in stream_chunks(den, [PromptSegment(0, cond)], chunks, chunk_shape, steps=steps,
                                                      shift=shift, sampler="dmd", seed=seeds)], dim=2)
    starts = [sampler_start("dmd", steps, shift, chunk_shape, chunk_seeds(seeds, 2, c)) for c in range(chunks)]
    noise = torch.cat([x for x, _, _ in starts], dim=2)                         # [B, C, T, h, w]
    renoise = torch.cat([extra["renoise"] for _, _, extra in starts], dim=3)    # [steps - 1, B, C, T, h, w]
    sigmas = starts[0][1]
    with torch.no_grad():
        rolled = self_forcing_rollout(den, cond, noise, sigmas, renoise, [steps - 1] * chunks)
    assert torch.allclose(rolled, streamed, atol=1e-5, rtol=0), (rolled - streamed).abs().max()

    x = self_forcing_rollout(den, cond, noise, sigmas, renoise, [0, 2, 1, 0])  # a random exit step per chunk
    x.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in dit.parameters() if p.requires_grad)
    assert dit.blocks[0].attn1.to_q.weight.grad.abs().sum() > 0
    with torch.no_grad():  # other noise for chunk 0 only: chunk 0 changes, and so does chunk 1 (its context)
        other = noise.clone()
        other[:, :, 0] = torch.randn(other[:, :, 0].shape, generator=torch.Generator().manual_seed(3))
        moved = self_forcing_rollout(den, cond, other, sigmas, renoise, [steps - 1] * chunks)
    assert (moved[:, :, 1] - rolled[:, :, 1]).abs().max() > 1e-4


def test_gan_term_learns_real_from_fake_and_pushes_the_student():
    """DMD2's GAN term: the critic + head learn to tell real latents (here shifted by +1) from student samples
    (the loss falls from log 4, chance), and the student's GAN loss sends a gradient to its samples."""
    torch.manual_seed(0)
    critic, teacher = _tiny_dit(1), _tiny_dit(2)
    dmd = DistributionMatching(Denoiser(teacher, RectifiedFlow()), Denoiser(critic, RectifiedFlow()), 1.0,
                               head=CriticHead(critic.dim))
    cond, g = _cond(4), torch.Generator().manual_seed(0)
    real, fake = torch.randn(4, 4, 3, 4, 4, generator=g) + 1.0, torch.randn(4, 4, 3, 4, 4, generator=g)
    opt = torch.optim.Adam([*critic.parameters(), *dmd.head.parameters()], lr=3e-3)
    losses = []
    for step in range(40):
        loss = dmd.gan_critic_loss(real, fake, cond, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"GAN critic loss {losses[0]:.3f} -> {losses[-1]:.3f} (chance: log 4 = 1.386)")
    assert abs(losses[0] - 1.386) < 0.2 and max(losses[-5:]) < 0.8
    x = fake.clone().requires_grad_()
    dmd.gan_student_loss(x, cond, generator=torch.Generator().manual_seed(0)).backward()
    assert x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()


def test_dmd_loss_gradient_is_the_normalised_score_difference():
    """d/dx of 0.5 ||x - (x - grad).detach()||^2 (mean) is grad / numel (DMD eq. 7-8)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 4, 4, generator=g).requires_grad_()
    real, fake = torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g)
    grad = dmd_gradient(x.detach(), real, fake)
    expected = (fake - real) / (x.detach() - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    assert torch.allclose(grad, expected)
    loss = 0.5 * torch.nn.functional.mse_loss(x, (x - grad).detach())
    loss.backward()
    assert torch.allclose(x.grad, grad / x.numel(), atol=1e-7)


@pytest.mark.parametrize("setting", [{"student_every": 0}, {"steps": 0}, {"real_guidance": 0.5}, {"t_min": 0.9, "t_max": 0.1},
                                     {"rollout": "chunks"}, {"rollout": "stream"}])
def test_bad_setting_is_one_clear_error(setting):
    """Each bad setting stops with one line naming it (rollout=stream with a bidirectional DiT: it cannot stream)."""
    text = TextCondition(ByteTextEncoder(dim=16, depth=1, num_heads=2), dropout=0.0)
    with pytest.raises(UserError, match=next(iter(setting))):
        DistillModule(_tiny_dit(), Conditioner(text=text), None, partial(torch.optim.AdamW), **setting)


# ---------------------------------------------------------------------------------------------- train.py runs
@pytest.fixture(scope="module")
def latents(tmp_path_factory, demo_shards, tiny_vae_export) -> Path:
    """Latent shards of the demo clips (9x32x32) with the tiny VAE; captions only (no stored text embeddings)."""
    out = tmp_path_factory.mktemp("distill_latents")
    assert encode_main(["--shards", str(demo_shards), "--vae", str(tiny_vae_export), "--output", str(out),
                        "--buckets", "9x32x32", "--target-fps", "15", "--batch-size", "4", "--num-workers", "0",
                        "--device", "cpu", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, latents, tiny_vae_export) -> Path:
    """A tiny demo-style DiT (byte text encoder) trained briefly on the latents, exported."""
    root = tmp_path_factory.mktemp("teacher")
    train(["experiment=demo_dit", f"task.module.vae_path={tiny_vae_export}", f"data.shards={latents}",
           "data.val_shards=null", *SMALL, "~callbacks.sample_logging", "trainer.max_steps=150",
           "task.module.scheduler.warmup_steps=10", "callbacks.ema.decay=0.9"], root)
    return write_export(read_parts(root / "runs" / "demo_dit" / "checkpoints" / "last.ckpt"), root / "export")


def _distill(root: Path, teacher: Path, vae: Path, shards: Path, steps: int, *extra: str):
    return train(["experiment=distill_demo", f"task.module.init_from={teacher}", f"task.module.vae_path={vae}",
                  f"data.shards={shards}", *SMALL, "task.module.steps=2", f"task.module.real_guidance={GUIDANCE}",
                  "task.module.student_every=2", "task.module.optimizer.lr=1e-3", f"trainer.max_steps={steps}",
                  "callbacks.ema.decay=0.9", *extra], root)


@torch.no_grad()
def _latents(pipe: DiTPipeline, steps: int, guidance: float, sampler: str, seeds: int = SEEDS) -> torch.Tensor:
    """Latents `[seeds * P, C, t, h, w]` of the demo prompts, seeds 0..seeds-1 each."""
    prompts = [p for p in PROMPTS for _ in range(seeds)]
    t, h, w = pipe.latent_size(**SIZE)
    cond, uncond = pipe.encode_prompts(prompts), pipe.encode_prompts([""])
    guider = ClassifierFreeGuidance(guidance) if guidance != 1 else None
    return generate(pipe.denoiser, cond, (len(prompts), pipe.dit.in_channels, t, h, w), steps=steps, guider=guider,
                    uncond=uncond, sampler=sampler, shift=pipe.defaults.get("shift"),
                    seed=[s for _ in PROMPTS for s in range(seeds)])


def _spread(z: torch.Tensor) -> torch.Tensor:
    """Per-prompt spread of samples `[P * SEEDS, C, t, h, w]` over the seeds: `[P, C, t, h, w]`."""
    return z.reshape(len(PROMPTS), SEEDS, *z.shape[1:]).std(dim=1)


def test_distilled_student_approaches_teacher_and_samples_with_its_defaults(teacher, latents, tiny_vae_export,
                                                                          tmp_path):
    """(a) the 2-step student's samples get closer to the teacher's 50-step CFG samples; (b) the critic's loss is
    finite; (d) the export samples through DiTPipeline with its recorded defaults (2 steps, dmd, guidance 1).

    The distance is distributional, as DMD's objective is: mean |spread over seeds| difference per prompt and latent
    element. The per-seed distance (same noise) is printed too but not asserted: backward simulation re-noises with
    fresh noise, so a DMD student does not keep the teacher ODE's noise -> sample pairing (it starts near the
    teacher's blurry posterior mean, whose per-seed distance is small although its spread is not the teacher's).
    """
    _distill(tmp_path, teacher, tiny_vae_export, latents, 150)
    ckpt = tmp_path / "runs" / "distill_demo" / "checkpoints" / "last.ckpt"
    state = load_checkpoint(ckpt)
    assert state["global_step"] == 150 and state["vidgen"]["task"] == "distill" and state["vidgen"]["kind"] == "dit"
    assert not any(k.startswith("teacher") for k in state["state_dict"])  # the frozen teacher is not saved
    export = write_export(read_parts(ckpt), tmp_path / "export")

    teacher_pipe, student_pipe = (DiTPipeline.from_pretrained(p, device="cpu") for p in (teacher, export))
    reference = _latents(teacher_pipe, 50, GUIDANCE, "euler")
    teacher_pipe.defaults = student_pipe.defaults  # the teacher run as the 2-step student it starts from
    before, after = _latents(teacher_pipe, 2, 1.0, "dmd"), _latents(student_pipe, 2, 1.0, "dmd")
    start, end = ((_spread(z) - _spread(reference)).abs().mean().item() for z in (before, after))
    start_seed, end_seed = ((z - reference).abs().mean().item() for z in (before, after))
    print(f"student (2 steps) vs teacher (50 steps, CFG {GUIDANCE}), {SEEDS} seeds x {len(PROMPTS)} prompts: spread "
          f"distance start {start:.4f} end {end:.4f}; per-seed mean |dz| start {start_seed:.4f} end {end_seed:.4f}")
    assert end < 0.95 * start

    # (b) the critic (not exported) on the student's samples: a finite flow-matching loss; no step was skipped.
    spec = state["vidgen"]["parts"]["dit"]
    critic = Part(spec["class"], spec["config"], {k[len("critic."):]: v for k, v in state["state_dict"].items()
                                                  if k.startswith("critic.")}).build()
    cond = student_pipe.encode_prompts([p for p in PROMPTS for _ in range(SEEDS)])
    with torch.no_grad():
        critic_loss = Denoiser(critic, student_pipe.flow).loss(after, cond, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(critic_loss) and state["callbacks"]["NonFiniteGuard"]["skipped"] == 0

    # (d) sampling with nothing but what the checkpoint records (sample.py's resolution of null settings).
    assert student_pipe.defaults == {"steps": 2, "sampler": "dmd", "guidance": 1.0, "shift": 1.0}
    settings = sampling_settings({k: None for k in ("steps", "guidance", "negative_prompt", "sampler", "shift",
                                                    "step_cache")}, student_pipe.defaults)
    sample = student_pipe(PROMPTS[:2], **SIZE, seed=0, **settings)
    assert sample.settings["steps"] == 2 and sample.settings["guidance"] == 1.0 and sample.settings["sampler"] == "dmd"
    assert sample.video.shape == (2, 3, 9, 32, 32) and torch.isfinite(sample.video).all()
    assert torch.allclose(sample.latents, after[[0, SEEDS + 1]], atol=1e-4)  # prompt i, seed i: as measured above


@torch.no_grad()
def _streamed(den: Denoiser, pipe: DiTPipeline, steps: int, guidance: float, sampler: str, seeds: int = 8
              ) -> torch.Tensor:
    """Streamed latents `[seeds * P, C, t, h, w]` (chunk by chunk, `stream_chunks`) of the demo prompts."""
    prompts = [p for p in PROMPTS for _ in range(seeds)]
    t, h, w = pipe.latent_size(**SIZE)
    guider = ClassifierFreeGuidance(guidance) if guidance != 1 else None
    seg = PromptSegment(0, pipe.encode_prompts(prompts), pipe.encode_prompts([""]) if guider else None)
    shape = (len(prompts), pipe.dit.in_channels, 1, h, w)
    return torch.cat([z for _, z in stream_chunks(den, [seg], t, shape, steps=steps, guider=guider, sampler=sampler,
                                                  seed=[s for _ in PROMPTS for s in range(seeds)])], dim=2)


def test_streaming_student_approaches_the_streamed_teacher(teacher, latents, tiny_vae_export, tmp_path):
    """rollout=stream (Self-Forcing) through train.py: a causal 2-step student, trained on its own streamed rollouts,
    streams closer to the teacher's 50-step CFG stream (the teacher's weights run block-causally, as the student
    and the real score do); its export streams through `DiTPipeline.stream` with its recorded defaults alone."""
    causal = [f"model.dit.{k}={v}" for k, v in CAUSAL.items()]
    _distill(tmp_path, teacher, tiny_vae_export, latents, 80, "task.module.rollout=stream", "task.module.student_every=1",
             *causal)
    ckpt = tmp_path / "runs" / "distill_demo" / "checkpoints" / "last.ckpt"
    assert load_checkpoint(ckpt)["vidgen"]["meta"]["distill"]["rollout"] == "stream"
    student = DiTPipeline.from_pretrained(write_export(read_parts(ckpt), tmp_path / "export"), device="cpu")
    assert student.dit.causal and student.defaults["sampler"] == "dmd" and student.defaults["steps"] == 2

    base = DiTPipeline.from_pretrained(teacher, device="cpu")
    teacher_dit = DiT(**{**base.dit.config, **CAUSAL}).eval()
    teacher_dit.load_state_dict(base.dit.state_dict())
    teacher_den = Denoiser(teacher_dit, base.flow)
    reference = _streamed(teacher_den, base, 50, GUIDANCE, "euler")
    before, after = _streamed(teacher_den, base, 2, 1.0, "dmd"), _streamed(student.denoiser, student, 2, 1.0, "dmd")
    spread = lambda z: z.reshape(len(PROMPTS), -1, *z.shape[1:]).std(dim=1)  # noqa: E731  [P, C, t, h, w]
    start, end = ((spread(z) - spread(reference)).abs().mean().item() for z in (before, after))
    print(f"streaming student (2 steps) vs the teacher's stream (50 steps, CFG {GUIDANCE}): spread distance start "
          f"{start:.4f} end {end:.4f}")
    assert end < 0.9 * start

    frames = [x for x, _ in student.stream([(0.0, PROMPTS[1])], seconds=1.0, fps=15, height=32, width=32, seed=0,
                                           **{k: student.defaults[k] for k in ("steps", "guidance", "sampler")})]
    video = torch.cat(frames, dim=2)
    assert video.shape[:2] == (1, 3) and video.shape[2] >= 15 and torch.isfinite(video).all()


def test_resuming_from_another_task_is_one_clear_error(teacher):
    """A teacher (task=dit) checkpoint given as resume= of a distillation run stops at start-up."""
    ckpt = teacher.parent / "runs" / "demo_dit" / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match="a 'dit' checkpoint, but this run is task=distill"):
        check_checkpoint_kind(str(ckpt), "distill")


def test_resume_equals_uninterrupted(teacher, latents, tiny_vae_export, tmp_path):
    """(c) 2N steps in one run = resume=auto from that run's step-N checkpoint to 2N: every tensor of the final
    checkpoints (student, critic and its GAN head, frozen encoder, EMA, both optimizers' moments)."""
    n = 5  # odd: the cut falls between a critic-only step and a student step (student_every=2)
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    ref.mkdir(), (cut / "runs" / "distill_demo" / "checkpoints").mkdir(parents=True)
    gan = ["task.module.gan_critic_weight=0.01", "task.module.gan_student_weight=0.003"]  # with DMD2's GAN term
    _distill(ref, teacher, tiny_vae_export, latents, 2 * n, f"callbacks.model_checkpoint.every_n_train_steps={n}", *gan)
    shutil.copy(ref / "runs" / "distill_demo" / "checkpoints" / f"step{n:07d}.ckpt",
                cut / "runs" / "distill_demo" / "checkpoints")
    _distill(cut, teacher, tiny_vae_export, latents, 2 * n, "resume=auto", *gan)
    a, b = (load_checkpoint(r / "runs" / "distill_demo" / "checkpoints" / "last.ckpt") for r in (ref, cut))
    assert a["global_step"] == b["global_step"] == 2 * n

    def max_diff(x: dict, y: dict) -> float:
        assert x.keys() == y.keys()
        return max((x[k].float() - y[k].float()).abs().max().item() for k in x)

    d_params = max_diff(a["state_dict"], b["state_dict"])
    d_ema = max_diff(a["callbacks"]["EMA"]["shadow"], b["callbacks"]["EMA"]["shadow"])
    d_opt = max(max_diff({f"{k}.{m}": s[m] for k, s in oa["state"].items() for m in ("exp_avg", "exp_avg_sq")},
                         {f"{k}.{m}": s[m] for k, s in ob["state"].items() for m in ("exp_avg", "exp_avg_sq")})
                for oa, ob in zip(a["optimizer_states"], b["optimizer_states"]))
    print(f"distill resume vs uninterrupted after {2 * n} steps: max |dw| {d_params:.3g}, |d ema| {d_ema:.3g}, "
          f"|d adam| {d_opt:.3g}")
    assert len(a["optimizer_states"]) == 2
    assert all(any(k.startswith(p) for k in a["state_dict"]) for p in ("critic.", "critic_head.", "dit."))
    assert d_params <= 1e-6 and d_ema <= 1e-6 and d_opt <= 1e-9
