"""Sample-logging callback: every N steps, videos for fixed prompts and seeds from the (EMA) DiT being trained.

The samples go through `vidgen.pipeline.DiTPipeline`, the object `sample.py` uses, built around the
training module's own DiT / conditioner / flow / frozen VAE, so what is logged is what sampling a checkpoint
of this step gives. Files land in `{default_root_dir}/samples/step_XXXXXXX/` (NN_prompt.mp4 + .png contact
sheet); a `WandbLogger` also gets them as `wandb.Video`s. Rank zero only: with sharded strategies (FSDP,
DeepSpeed ZeRO-3) the parameters are not whole on one rank, so leave this callback off there.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import torch

from vidgen.io.video import save_sample, slug
from vidgen.pipeline import DiTPipeline
from vidgen.training.callbacks import find_ema

log = logging.getLogger(__name__)


class SampleLogging(pl.Callback):
    """Generate `prompts` (seed + i for prompt i) every `every_n_steps` optimizer steps and at the end of training.

    num_frames / height / width: pixel shape (1 + 4k frames, multiples of 16); steps, guidance, shift (None:
    resolution-dependent), sampler, negative_prompt: as `sample.py`; use_ema: sample the EMA weights when an
    EMA callback is present.
    """

    def __init__(self, prompts: Sequence[str], every_n_steps: int = 500, seed: int = 0, num_frames: int = 9,
                 height: int = 64, width: int = 64, steps: int = 25, guidance: float = 5.0,
                 shift: float | None = None, sampler: str = "euler", negative_prompt: str = "", fps: float = 8.0,
                 use_ema: bool = True):
        if every_n_steps < 1:
            raise ValueError(f"callbacks.sample_logging.every_n_steps={every_n_steps}: expected >= 1")
        self.prompts = [str(p) for p in prompts]
        self.every_n_steps, self.seed, self.fps, self.use_ema = every_n_steps, seed, fps, use_ema
        self.shape = (num_frames, height, width)
        self.kwargs = {"steps": steps, "guidance": guidance, "shift": shift, "sampler": sampler,
                       "negative_prompt": negative_prompt}
        self.last_step = -1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.log_samples(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.log_samples(trainer, pl_module)

    @torch.no_grad()
    def log_samples(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Path]:
        """Sample, decode and save (and log to wandb) the fixed prompts at this step; returns the mp4 paths."""
        step = trainer.global_step
        if not trainer.is_global_zero or step == self.last_step or not self.prompts:
            return []
        self.last_step = step
        pipe = DiTPipeline(pl_module.dit, pl_module.conditioner, pl_module.vae, pl_module.flow)
        ema = find_ema(trainer) if self.use_ema else None
        was_training = pl_module.training
        pl_module.eval()
        try:
            with ema.average_parameters(pl_module) if ema is not None else contextlib.nullcontext():
                out = pipe(self.prompts, *self.shape, seed=self.seed, **self.kwargs)
        finally:
            pl_module.train(was_training)
        folder = Path(trainer.default_root_dir) / "samples" / f"step_{step:07d}"
        paths = []
        for i, (prompt, video) in enumerate(zip(self.prompts, out.video)):
            paths.append(save_sample(folder / f"{i:02d}_{slug(prompt)}", video, fps=self.fps)[0])
        log.info("step %d: %d sample video(s) in %s", step, len(paths), folder)
        self._to_wandb(trainer, paths, step)
        return paths

    def _to_wandb(self, trainer: pl.Trainer, paths: list[Path], step: int) -> None:
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                import wandb

                videos = [wandb.Video(str(p), caption=prompt, format="mp4") for p, prompt in zip(paths, self.prompts)]
                logger.experiment.log({"samples/video": videos}, step=step)

