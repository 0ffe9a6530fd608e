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

from vidgen.errors import UserError
from vidgen.eval.clip_score import CLIPScorer
from vidgen.eval.video_metrics import diversity, flicker, motion
from vidgen.io.video import save_sample, slug, to_uint8_video
from vidgen.pipeline import DiTPipeline
from vidgen.training.callbacks import find_ema

log = logging.getLogger(__name__)


class SampleLogging(pl.Callback):
    """Generate `prompts` (seed + i for prompt i) every `every_n_steps` optimizer steps and at the end of training.

    num_frames / height / width: pixel shape (1 + 4k frames, multiples of 16); steps, guidance, shift (None:
    resolution-dependent), sampler, negative_prompt: as `sample.py`; use_ema: sample the EMA weights when an
    EMA callback is present; seeds: samples per prompt (seed, seed + 1, ...). Every time, the weight-free
    metrics of `vidgen.eval` (eval/flicker, eval/motion, eval/diversity with seeds > 1, eval/clip_score with a
    local CLIP folder in `clip`) go to every logger; wandb also gets the videos and a table per sample.
    """

    def __init__(self, prompts: Sequence[str], every_n_steps: int = 500, seed: int = 0, num_frames: int = 9,
                 height: int = 64, width: int = 64, steps: int = 25, guidance: float = 5.0,
                 shift: float | None = None, sampler: str = "euler", negative_prompt: str = "", fps: float = 8.0,
                 use_ema: bool = True, seeds: int = 1, clip: str | None = None):
        if every_n_steps < 1:
            raise ValueError(f"callbacks.sample_logging.every_n_steps={every_n_steps}: expected >= 1")
        self.prompts = [str(p) for p in prompts]
        self.every_n_steps, self.seed, self.fps, self.use_ema = every_n_steps, seed, fps, use_ema
        self.shape = (num_frames, height, width)
        self.kwargs = {"steps": steps, "guidance": guidance, "shift": shift, "sampler": sampler,
                       "negative_prompt": negative_prompt}
        self.last_step = -1
        if seeds < 1:
            raise ValueError(f"callbacks.sample_logging.seeds={seeds}: expected >= 1")
        self.seeds = int(seeds)
        self.clip = CLIPScorer.from_pretrained(clip) if clip else None  # fails at start-up, not at step N

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.log_samples(trainer, pl_module)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if getattr(pl_module, "sequence_parallel", 1) > 1:  # rank 0 alone would wait forever for its group
            raise UserError(f"callbacks.sample_logging samples on rank 0 alone, which a sequence-parallel DiT "
                            f"(scale.sequence_parallel={pl_module.sequence_parallel}) cannot do: remove it "
                            f"(~callbacks.sample_logging) and sample the checkpoints with sample.py")

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
        prompts = [p for p in self.prompts for _ in range(self.seeds)]  # seeds seed, seed + 1, ... per prompt
        seeds = [self.seed + k for _ in self.prompts for k in range(self.seeds)]
        try:
            with ema.average_parameters(pl_module) if ema is not None else contextlib.nullcontext():
                out = pipe(prompts, *self.shape, seed=seeds, **self.kwargs)
        finally:
            pl_module.train(was_training)
        folder = Path(trainer.default_root_dir) / "samples" / f"step_{step:07d}"
        paths, rows = [], []
        for i, (prompt, seed, video) in enumerate(zip(prompts, seeds, out.video)):
            paths.append(save_sample(folder / f"{i // self.seeds:02d}_{slug(prompt)}_s{seed}", video, fps=self.fps)[0])
            frames = to_uint8_video(video)
            row = {"prompt": prompt, "seed": seed, "flicker": flicker(frames), "motion": motion(frames)}
            if self.clip is not None:
                row["clip_score"] = self.clip.score(frames, prompt)
            rows.append(row)
        metrics = self.metrics(rows, [to_uint8_video(v) for v in out.video])
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        log.info("step %d: %d sample video(s) in %s; %s", step, len(paths), folder,
                 ", ".join(f"{k} {v:.3g}" for k, v in metrics.items()))
        self._to_wandb(trainer, paths, rows, step)
        return paths

    def metrics(self, rows: list[dict], videos: list) -> dict[str, float]:
        """The weight-free metrics (and CLIP score with its weights) over this step's samples, as `eval/...`."""
        keys = [k for k in ("flicker", "motion", "clip_score") if k in rows[0]]
        out = {f"eval/{k}": sum(r[k] for r in rows) / len(rows) for k in keys}
        if self.seeds > 1:  # per prompt across its seeds, then the mean over prompts
            groups = [videos[i:i + self.seeds] for i in range(0, len(videos), self.seeds)]
            out["eval/diversity"] = sum(diversity(g) for g in groups) / len(groups)
        return out

    def _to_wandb(self, trainer: pl.Trainer, paths: list[Path], rows: list[dict], step: int) -> None:
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                import wandb  # only runs that log to wandb need it

                videos = [wandb.Video(str(p), caption=f"{r['prompt']} (seed {r['seed']})", format="mp4")
                          for p, r in zip(paths, rows)]
                columns = list(rows[0])
                table = wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])
                logger.experiment.log({"samples/video": videos, "samples/metrics": table}, step=step)

