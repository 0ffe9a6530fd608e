"""Evaluate checkpoints side by side: `python eval.py 'ckpts=[A,B]' prompts_file=P 'seeds=[0,1]'` (configs/eval.yaml).

Every checkpoint (a DiT .ckpt, FSDP / DeepSpeed folder or export folder) samples every prompt with the same
seeds. Writes under `out_dir`: `LABEL/NAME_sSEED.{mp4,png,json}` per video, `metrics.json` (per checkpoint:
aggregates; per prompt and seed: metrics and file paths), `metrics.png`, `report.md` and a self-contained
`report.html`. Metrics: FVD against `real_shards` (with `i3d=`), CLIP score (with `clip=`), flicker, motion
and diversity across seeds, and with `real_shards` each video's distance to every caption's real clips (caption
match; definitions: vidgen/eval/report.py).
"""

from __future__ import annotations

import datetime
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from vidgen.errors import one_line_errors
import vidgen.config  # noqa: F401  (registers the config resolvers)
from vidgen.eval.clip_score import CLIPScorer
from vidgen.eval.compare import (EvalError, Sampling, Scorers, aggregate, checkpoint_labels, read_prompts,
                                 real_features, real_scenes, sample_checkpoint)
from vidgen.eval.fvd import I3DFeatures, fvd_from_features, load_i3d
from vidgen.eval.report import write_reports
from vidgen.pipeline import DiTPipeline


def build_scorers(cfg: DictConfig, device: str) -> tuple[Scorers, dict[str, str]]:
    """The metric networks from local paths, and why each missing one is skipped."""
    skipped = {}
    if cfg.i3d is not None and cfg.real_shards is None:
        raise EvalError(f"i3d={cfg.i3d} given without real_shards=FOLDER: FVD compares against real clips")
    pattern = any(ch in str(cfg.real_shards) for ch in "*?{")  # globs and brace patterns are checked when read
    if cfg.real_shards is not None and not pattern and not Path(cfg.real_shards).exists():
        raise EvalError(f"real_shards={cfg.real_shards}: no such file or folder")
    if cfg.i3d is None:
        skipped["fvd"] = "no i3d=PATH given (the TorchScript I3D, i3d_torchscript.pt)"
    if cfg.clip is None:
        skipped["clip_score"] = "no clip=PATH given (a local Hugging Face CLIP folder)"
    i3d = I3DFeatures(load_i3d(cfg.i3d), device, frames=cfg.fvd_frames) if cfg.i3d is not None else None
    clip = CLIPScorer.from_pretrained(cfg.clip, device) if cfg.clip is not None else None
    return Scorers(clip=clip, i3d=i3d, motion_stride=int(cfg.motion_stride)), skipped


def run(cfg: DictConfig) -> dict:
    """Sample every checkpoint x prompt x seed, score, and write the reports; returns the metrics.json content."""
    ckpts = [str(cfg.ckpts)] if isinstance(cfg.ckpts, str) else [str(c) for c in cfg.ckpts]
    missing = [c for c in ckpts if not Path(c).exists()]
    if not ckpts or missing:
        raise EvalError(f"ckpts: {missing or 'empty'}: expected existing DiT checkpoints or export folders")
    seeds = [int(cfg.seeds)] if isinstance(cfg.seeds, int) else [int(s) for s in cfg.seeds]
    prompts = read_prompts(cfg.prompts_file, seeds)
    labels = checkpoint_labels(ckpts, cfg.labels)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    scorers, skipped = build_scorers(cfg, device)
    sampling = Sampling(cfg.num_frames, cfg.height, cfg.width, cfg.steps, cfg.guidance, cfg.negative_prompt,
                        cfg.sampler, cfg.shift, cfg.fps, cfg.batch_size)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    real: dict[tuple[int, int, int], np.ndarray] = {}  # I3D features of the real clips, per (frames, height, width)
    scenes: dict[tuple[int, int, int], dict[str, list[torch.Tensor]]] = {}  # pooled real clips per caption, per size
    records = []
    total = len(ckpts) * sum(len(p["seeds"]) for p in prompts)
    with tqdm(total=total, desc="sampling", unit="video", dynamic_ncols=True) as bar:
        for path, label in zip(ckpts, labels):
            bar.set_postfix_str(label)
            pipe = DiTPipeline.from_pretrained(path, ema=cfg.ema, device=device, vae=cfg.vae)
            size = sampling.size(pipe)
            if scorers.i3d is not None and size not in real:  # before sampling: a bad shard folder fails early
                real[size] = real_features(scorers.i3d, cfg.real_shards, size, cfg.real_clips, decoder=cfg.decoder)
            if cfg.real_shards is not None and cfg.caption_match and size not in scenes:
                scenes[size] = real_scenes(cfg.real_shards, size, cfg.real_clips, cfg.decoder, scorers.scene_pool)
            scorers.scenes = scenes.get(size)
            info, feats = sample_checkpoint(pipe, label, prompts, sampling, scorers, out_dir, progress=bar)
            info["aggregate"] = aggregate(info)
            if feats is not None and feats.shape[0] >= 2:
                info["aggregate"].update(fvd=fvd_from_features(feats, real[size]), fvd_videos=int(feats.shape[0]),
                                         fvd_real_clips=int(real[size].shape[0]))
            elif feats is not None:
                skipped["fvd"] = "fewer than 2 videos per checkpoint (FVD needs a covariance)"
            records.append(info)
            del pipe
    settings = {**OmegaConf.to_container(cfg, resolve=True), "ckpts": ckpts, "device": device,
                "prompts": len(prompts), "date": datetime.datetime.now().isoformat(timespec="seconds")}
    results = {"settings": settings, "skipped": skipped, "checkpoints": records}
    paths = write_reports(out_dir, results, embed_sheets=cfg.embed_sheets)
    for c in records:
        print(f"{c['label']}: " + ", ".join(f"{k}={v:.4g}" for k, v in c["aggregate"].items()
                                            if isinstance(v, float)))
    print(f"wrote {total} video(s), metrics.json and {paths['html'].name} to {out_dir.resolve()}")
    return results


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
@one_line_errors
def main(cfg: DictConfig) -> None:
    run(cfg)  # a bad setting or file: one `error: ...` line and exit 2 (vidgen.errors)


if __name__ == "__main__":
    main()
