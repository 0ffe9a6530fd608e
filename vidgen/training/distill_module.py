"""Lightning module that distils a trained DiT into a few-step student by distribution matching (DMD2).

DMD2 (Yin et al. 2024, "Improved Distribution Matching Distillation for Fast Image Synthesis"): the student (the
`dit`, started from the teacher at `init_from`) samples in `steps` steps by backward simulation; its samples are
moved along the DMD gradient, the difference of a fake score (the trainable `critic`, also started from the
teacher, trained by flow matching on the student's samples) and the real score (the frozen teacher with
classifier-free guidance `real_guidance` baked in). The losses live in `vidgen.diffusion.distill`.

Two-time-scale update rule (DMD2 Sec. 4.2), by manual optimisation with two optimizers: the critic steps on every
batch, the student on every `student_every`-th one, before the critic and on the same samples. `global_step` counts
batches (the critic's steps; the student's optimizer steps through the strategy, so Lightning does not count them
a second time): `max_steps`, checkpoint intervals and the per-step random generators keep their meaning.

A batch gives the latent shape and the conditioning (latent shards, or clips encoded by the VAE); DMD needs no data
samples beyond that. DMD2's optional GAN term (`gan_critic_weight`, `gan_student_weight`; 0: off) is the one use of
the batch's latents: a `CriticHead` on the critic's features, trained with the critic, tells them from the student's. The teacher is held outside the registered modules
(not in state_dict, optimizer, EMA or checkpoints: `init_from` is recorded by path and fingerprint, as a fine-tune's
base is); the text encoder is the teacher's, frozen. The EMA callback averages every trainable tensor (the student's
and the critic's); exports and samples read the `dit.` ones only. Checkpoints are DiT checkpoints whose `dit` part
is the student, with the sampling defaults (`sampler="dmd"`, the student's steps and shift, guidance 1) recorded, so
`python -m vidgen.io.checkpoint` exports it and `sample.py ckpt=...` samples it with no setting to tune.
"""

from __future__ import annotations

import copy
from functools import partial
from typing import Any

import torch
from torch import nn

from vidgen.conditioning import Conditioner
from vidgen.diffusion.denoiser import Denoiser
from vidgen.diffusion.distill import CriticHead, DistributionMatching, student_rollout, student_timesteps
from vidgen.diffusion.streaming import self_forcing_rollout
from vidgen.errors import UserError
from vidgen.training.dit_module import DiTModule, _plain, param_groups

ROLLOUTS = ("clip", "stream")


class DistillModule(DiTModule):
    """DMD2 distillation of the teacher at `init_from` into the `steps`-step student `dit` (same architecture).

    dit: the student network (built from the model config, its weights loaded from `init_from`; the critic is a
    copy); conditioner: the teacher's conditioner (frozen here); vae_path: the teacher's VAE export (recorded for
    sampling; needed only for clip batches); init_from / init_ema: the teacher checkpoint or export and whether its
    EMA weights are used; optimizer: a `functools.partial` completed once for the student and once for the critic;
    flow: `RectifiedFlow` arguments (the teacher's: the critic's loss and the DMD noise levels use them);
    steps / shift: the student's schedule `student_timesteps(steps, shift)`; real_guidance: the teacher's CFG scale
    in the real score; student_every: student updates per critic update (DMD2: 5); t_min / t_max: the DMD noise
    level range before the resolution shift; rollout: how the student makes the samples DMD scores: "clip" (the
    whole clip at once) or "stream" (a causal student chunk by chunk on its own KV-cached context, Self-Forcing,
    Huang et al. 2025: `vidgen.diffusion.streaming.self_forcing_rollout`; the teacher scores the whole clip under
    its block-causal mask, which is the function streaming computes); gan_critic_weight / gan_student_weight:
    DMD2's GAN term in the critic's and the student's loss (DMD2 uses 1e-2 and 3e-3; 0: off).
    """

    def __init__(self, dit: nn.Module, conditioner: Conditioner, vae_path: str | None, optimizer: partial,
                 init_from: str | None = None, init_ema: bool = True, flow: dict | None = None, steps: int = 4,
                 shift: float = 1.0, real_guidance: float = 5.0, student_every: int = 5, t_min: float = 0.02,
                 t_max: float = 0.98, sample_posterior: bool = True, rollout: str = "clip",
                 gan_critic_weight: float = 0.0, gan_student_weight: float = 0.0) -> None:
        flow = _plain(flow or {})  # hparams are read from this frame too: plain values, weights_only-loadable
        super().__init__(dit, conditioner, vae_path, optimizer, flow=flow, init_from=init_from, init_ema=init_ema,
                         sample_posterior=sample_posterior)
        self.automatic_optimization = False  # two optimizers, two time scales
        if int(student_every) < 1:
            raise UserError(f"task.module.student_every={student_every}: expected >= 1 critic steps per student step")
        if rollout not in ROLLOUTS:
            raise UserError(f"task.module.rollout={rollout}: expected one of {ROLLOUTS}")
        if rollout == "stream" and not getattr(dit, "causal", False):
            raise UserError("task.module.rollout=stream: the Self-Forcing rollout streams chunk by chunk, which needs "
                            "a causal DiT (model.dit.attention=causal, e.g. the quickstart_stream teacher)")
        if not real_guidance >= 1.0:
            raise UserError(f"task.module.real_guidance={real_guidance}: expected a CFG scale >= 1 (1 = none)")
        try:
            self.register_buffer("schedule", student_timesteps(int(steps), float(shift)), persistent=False)
            self.critic = copy.deepcopy(dit)  # the fake score, started from the teacher (DMD2 Sec. 3)
            self._frozen["teacher"] = copy.deepcopy(dit).requires_grad_(False).eval()
            if gan_critic_weight < 0 or gan_student_weight < 0:
                raise ValueError(f"gan_critic_weight={gan_critic_weight}, gan_student_weight={gan_student_weight}: "
                                 "expected weights >= 0 (0: no GAN term)")
            self.gan = gan_critic_weight > 0 or gan_student_weight > 0
            self.critic_head = CriticHead(dit.dim) if self.gan else None  # trained with the critic
            self.dmd = DistributionMatching(Denoiser(self._frozen["teacher"], self.flow),
                                            Denoiser(self.critic, self.flow), float(real_guidance), t_min, t_max,
                                            head=self.critic_head)
        except ValueError as e:
            raise UserError(f"task.module: {e}") from None
        self.conditioner.requires_grad_(False)  # the teacher's text encoder, as the teacher was trained with it

    def setup(self, stage: str) -> None:
        if self.base is None:
            raise UserError("task.module.init_from is not set: distillation starts the student and the critic from a "
                            "trained teacher; set it to the teacher's export folder or checkpoint")
        super().setup(stage)

    def on_fit_start(self) -> None:
        self._frozen["teacher"].to(self.device)  # not registered: it does not follow the module's moves

    def configure_model(self) -> None:
        if self.device_mesh is not None:
            raise UserError("trainer=fsdp: the distillation task does not shard its three DiTs yet; use trainer=ddp "
                            "or one device")

    # ------------------------------------------------------------------ steps
    def null_cond(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The unconditional branch `[1, ...]` of the teacher's CFG: the null caption, or the shards' null embedding
        when the batch holds precomputed text embeddings (the conditioner encodes either)."""
        if "text_emb" not in batch:
            return self.conditioner({"caption": [""]})
        null, mask = batch["text_null_emb"], batch.get("text_null_mask")
        if null.ndim == 2:  # one null [L0, D]; a collated batch repeats it per sample: [B, L0, D]
            null, mask = null[None], None if mask is None else mask[None]
        return self.conditioner({"text_emb": null[:1], "text_mask": None if mask is None else mask[:1]})

    def student_sample(self, cond: dict[str, torch.Tensor], shape: torch.Size, generator: torch.Generator,
                       device: torch.device) -> torch.Tensor:
        """A student sample x0 `shape` = `[B, C, T, H, W]` at a random exit step of its schedule (DMD2 backward
        simulation), its noises drawn from `generator`; gradients flow through the exit step when enabled."""
        steps = len(self.schedule) - 1
        noise = torch.randn(shape, generator=generator).to(device)
        renoise = torch.randn((steps - 1, *shape), generator=generator).to(device)
        if self.hparams.rollout == "stream":  # Self-Forcing: chunk by chunk on its own context, an exit step each
            exit_steps = torch.randint(steps, (shape[2] // self.dit.chunk_frames,), generator=generator).tolist()
            return self_forcing_rollout(self.denoiser, cond, noise, self.schedule, renoise, exit_steps)
        exit_step = int(torch.randint(steps, (1,), generator=generator))
        return student_rollout(lambda x, t: self.denoiser(x, t, cond), noise, self.schedule, renoise, exit_step)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        # All randomness of a step from one generator seeded by (seed, step, rank): exact resume (vidgen.training.rng).
        gen = self.micro.generator(self.global_step, self.global_rank)
        student_opt, critic_opt = self.optimizers()
        with torch.no_grad():
            real = self.latents(batch, sample=False)  # the GAN term's real data; DMD alone reads only the shape
            shape = real.shape
            cond = self.conditioner(batch, drop=False)
            uncond = self.null_cond(batch) if self.dmd.guider is not None else None
        train_student = self.global_step % self.hparams.student_every == 0
        losses = {}
        with torch.set_grad_enabled(train_student):
            x = self.student_sample(cond, shape, gen, self.device)
        if train_student:
            losses["train/loss_dmd"] = self.dmd.student_loss(x, cond, uncond, generator=gen)
            loss = losses["train/loss_dmd"]
            if self.hparams.gan_student_weight > 0:
                losses["train/loss_gan_student"] = self.dmd.gan_student_loss(x, cond, generator=gen)
                loss = loss + self.hparams.gan_student_weight * losses["train/loss_gan_student"]
            self.manual_backward(loss)
            # Through the strategy, not `student_opt.step()`: Lightning counts every LightningOptimizer step in
            # global_step, which must count batches. Callbacks' optimizer hooks (NonFiniteGuard) still run.
            self.trainer.strategy.optimizer_step(student_opt.optimizer, closure=lambda: None)
            student_opt.zero_grad(set_to_none=True)
        critic_opt.zero_grad(set_to_none=True)  # the student's GAN loss reached the critic: not its update
        losses["train/loss_critic"] = self.dmd.critic_loss(x, cond, generator=gen)
        loss = losses["train/loss_critic"]
        if self.hparams.gan_critic_weight > 0:
            losses["train/loss_gan_critic"] = self.dmd.gan_critic_loss(real, x, cond, generator=gen)
            loss = loss + self.hparams.gan_critic_weight * losses["train/loss_gan_critic"]
        self.manual_backward(loss)
        critic_opt.step()
        critic_opt.zero_grad(set_to_none=True)
        self.log_dict(losses, prog_bar=True, batch_size=shape[0])
        return losses

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """[student optimizer, critic optimizer], both from `optimizer` (weight decay on linear / conv weights)."""
        critic = nn.ModuleList([self.critic, self.critic_head]) if self.gan else self.critic
        return [self.optimizer_factory(params=param_groups(m)) for m in (self.dit, critic)]

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_description(self) -> dict[str, Any]:
        """The DiT description with the student as `dit`, its sampling defaults and the distillation settings."""
        description = super().checkpoint_description()
        steps = len(self.schedule) - 1
        description["meta"]["defaults"] = {"steps": steps, "sampler": "dmd", "guidance": 1.0,
                                           "shift": float(self.hparams.shift)}
        description["meta"]["distill"] = {"method": "dmd2", "rollout": self.hparams.rollout,
                                          "schedule": self.schedule.tolist(),
                                          "real_guidance": float(self.hparams.real_guidance),
                                          "student_every": int(self.hparams.student_every),
                                          "gan": [float(self.hparams.gan_critic_weight),
                                                  float(self.hparams.gan_student_weight)]}
        return description

