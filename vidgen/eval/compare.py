"""Checkpoints x prompts x seeds -> saved videos + per-video metrics: the sampling half of `eval.py`.

Every checkpoint samples every prompt with the same seeds (so videos compare side by side), through
`DiTPipeline`; each video is written with `save_sample` (`LABEL/NAME_sSEED.mp4` + contact-sheet `.png`) and a
`.json` of its settings (as sample.py writes them), then scored on its uint8 frames: flicker and motion, CLIP
score (with a local CLIP), I3D features for FVD (with a local I3D), per prompt the diversity across seeds, and
with real clips grouped by caption, each video's scene distance to every caption's clips (caption match: is
the nearest caption the video's own prompt?).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from vidgen.data.latent_stats import clip_batches
from vidgen.errors import UserError
from vidgen.eval.clip_score import CLIPScorer
from vidgen.eval.fvd import I3DFeatures
from vidgen.eval.video_metrics import caption_distances, diversity, flicker, motion, pool_blocks
from vidgen.io.prompts import read_prompt_file
from vidgen.io.video import save_sample, slug, to_uint8_video
from vidgen.pipeline import DiTPipeline


class EvalError(UserError):
    """An evaluation setting or input that cannot work; the message names it and what was expected."""


def read_prompts(path: str | os.PathLike, seeds: Sequence[int]) -> list[dict[str, Any]]:
    """[{"prompt", "name", "seeds"}] from a prompt file: plain lines, or JSONL {"prompt", "seed"?, "name"?}.

    Every prompt uses `seeds`; a JSONL "seed" (an int or a list) replaces them for its line. Names default to
    `NNN_slug-of-prompt` and must be unique (they name the files).
    """
    items = []
    for item in read_prompt_file(path):
        i, own = item["line_index"], item.get("seed")
        item_seeds = [int(s) for s in (own if isinstance(own, list) else [own])] if own is not None else list(seeds)
        items.append({"prompt": item["prompt"], "name": str(item.get("name") or f"{i:03d}_{slug(item['prompt'])}"),
                      "seeds": item_seeds})
    names = [it["name"] for it in items]
    if len(set(names)) != len(names):
        raise EvalError(f"prompts_file={path}: duplicate names {sorted({n for n in names if names.count(n) > 1})}")
    for it in items:
        if not it["seeds"] or len(set(it["seeds"])) != len(it["seeds"]):
            raise EvalError(f"seeds={it['seeds']} for \"{it['prompt']}\": expected at least one seed, no repeats")
        if _folder_name(it["name"]) != it["name"]:
            raise EvalError(f"prompts_file={path}: name \"{it['name']}\" is used as a file name: at most 60 letters, "
                            "digits, '.', '_' and '-'")
    return items


def _folder_name(text: str) -> str:
    """A label usable as a folder name: letters, digits, `.`, `_`, `-` (anything else -> `_`), at most 60."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:60]


def checkpoint_labels(paths: Sequence[str | os.PathLike], labels: Sequence[str] | None = None) -> list[str]:
    """Short unique names for checkpoints: the given labels, else RUN-STEM for `RUN/checkpoints/STEM.ckpt`,
    the stem of another file, the folder name of an export; repeats get `-2`, `-3`, ... appended."""
    if labels:
        if len(labels) != len(paths):
            raise EvalError(f"labels: {len(labels)} given for {len(paths)} ckpts; give one per checkpoint or none")
        names = [_folder_name(str(x)) or f"ckpt{i}" for i, x in enumerate(labels)]
    else:
        names = []
        for i, p in enumerate(Path(x) for x in paths):
            name = p.stem if p.suffix else p.name
            if p.parent.name == "checkpoints" and p.parent.parent.name:
                name = f"{p.parent.parent.name}-{name}"
            names.append(_folder_name(name) or f"ckpt{i}")
    out: list[str] = []
    for name in names:
        k, label = 1, name
        while label in out:
            k += 1
            label = f"{name}-{k}"
        out.append(label)
    return out


@dataclass
class Scorers:
    """The metric networks (None: that metric is skipped) and the weight-free metric settings."""

    clip: CLIPScorer | None = None
    i3d: I3DFeatures | None = None
    motion_stride: int = 4
    scenes: dict[str, list[torch.Tensor]] | None = None  # real clips per caption, pooled (real_scenes)
    scene_pool: int = 4


@dataclass
class Sampling:
    """What every checkpoint samples with; None sizes: the sizes recorded with each checkpoint."""

    num_frames: int | None = None
    height: int | None = None
    width: int | None = None
    steps: int = 50
    guidance: float = 5.0
    negative_prompt: str = ""
    sampler: str = "euler"
    shift: float | None = None
    fps: float = 16
    batch_size: int = 1

    def size(self, pipe: DiTPipeline) -> tuple[int, int, int]:
        """(num_frames, height, width) for `pipe`: the given ones, else its recorded defaults; validated."""
        size = tuple(getattr(self, k) if getattr(self, k) is not None else pipe.defaults.get(k)
                     for k in ("num_frames", "height", "width"))
        if None in size:
            raise EvalError("num_frames, height and width: not recorded with the checkpoint; set them")
        pipe.latent_size(*size)  # bad sizes stop here, before any model runs
        return size  # type: ignore[return-value]


def _nan_to_none(v: float | None) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def sample_checkpoint(pipe: DiTPipeline, label: str, prompts: list[dict[str, Any]], sampling: Sampling,
                      scorers: Scorers, out_dir: Path, progress: Any = None
                      ) -> tuple[dict[str, Any], np.ndarray | None]:
    """Sample and score every (prompt, seed) of one checkpoint; files go to `out_dir/label/`.

    Returns (the checkpoint's record for metrics.json, its I3D features [N, D] or None). Paths in the record
    are relative to `out_dir`. `progress`: a tqdm bar advanced once per video.
    """
    num_frames, height, width = sampling.size(pipe)
    jobs = [(p, s) for p, item in enumerate(prompts) for s in item["seeds"]]  # prompt-major
    records = [{"prompt": it["prompt"], "name": it["name"], "videos": []} for it in prompts]
    pending: dict[int, list[np.ndarray]] = {}  # frames of a prompt's seeds until its diversity is measured
    feats = []
    (out_dir / label).mkdir(parents=True, exist_ok=True)
    for start in range(0, len(jobs), sampling.batch_size):
        batch = jobs[start:start + sampling.batch_size]
        out = pipe([prompts[p]["prompt"] for p, _ in batch], num_frames, height, width, steps=sampling.steps,
                   guidance=sampling.guidance, negative_prompt=sampling.negative_prompt, seed=[s for _, s in batch],
                   sampler=sampling.sampler, shift=sampling.shift)
        frames = to_uint8_video(out.video)  # [B, T, H, W, 3]: the metrics see what the files hold (before H.264)
        if scorers.i3d is not None:
            feats.append(scorers.i3d(torch.from_numpy(frames).permute(0, 4, 1, 2, 3).float() / 127.5 - 1))
        for j, (p, seed) in enumerate(batch):
            item = prompts[p]
            stem = out_dir / label / f"{item['name']}_s{seed}"
            mp4, png = save_sample(stem, out.video[j], fps=sampling.fps)
            settings = {"prompt": item["prompt"], "seed": seed, **out.settings, "fps": sampling.fps,
                        "ckpt": pipe.info.get("source"), "ema_used": pipe.info.get("ema_used"),
                        "global_step": pipe.info.get("global_step"), "device": str(pipe.device)}
            stem.with_suffix(".json").write_text(json.dumps(settings, indent=2, default=str))
            video = {"seed": seed, "mp4": str(mp4.relative_to(out_dir)), "png": str(png.relative_to(out_dir)),
                     "json": str(stem.with_suffix(".json").relative_to(out_dir)),
                     "flicker": _nan_to_none(flicker(frames[j])),
                     "motion": _nan_to_none(motion(frames[j], scorers.motion_stride)),
                     "clip_score": scorers.clip.score(frames[j], item["prompt"]) if scorers.clip else None}
            if scorers.scenes:
                video.update(scene_scores(frames[j], item["prompt"], scorers.scenes, scorers.scene_pool))
            records[p]["videos"].append(video)
            pending.setdefault(p, []).append(frames[j])
            if len(pending[p]) == len(item["seeds"]):
                records[p]["diversity"] = _nan_to_none(diversity(pending.pop(p)))
            if progress is not None:
                progress.update(1)
    info = {"label": label, "path": str(pipe.info.get("source")), "global_step": pipe.info.get("global_step"),
            "ema_used": pipe.info.get("ema_used"), "size": [num_frames, height, width], "prompts": records}
    return info, (np.concatenate(feats) if feats else None)


def scene_scores(frames: np.ndarray, prompt: str, scenes: dict[str, list[torch.Tensor]], pool: int = 4
                 ) -> dict[str, Any]:
    """A video's scene distance to every caption's real clips (pooled: `real_scenes`), its nearest caption, and
    whether that is its prompt.

    caption_match is None when the prompt is none of the captions; caption_margin (the nearest other caption's
    distance minus the own caption's) is positive when the video is closer to its own caption's clips.
    """
    d = caption_distances(frames, scenes, pool)
    nearest = min(d, key=d.__getitem__)
    own = d.get(prompt.strip())
    others = [v for c, v in d.items() if c != prompt.strip()]
    return {"caption_distances": d, "nearest_caption": nearest,
            "caption_match": None if own is None else float(nearest == prompt.strip()),
            "caption_margin": None if own is None or not others else float(min(others) - own)}


def real_scenes(shards: str, size: Sequence[int], max_clips: int, decoder: str = "decord", pool: int = 4
                ) -> dict[str, list[torch.Tensor]]:
    """Up to `max_clips` real clips per caption (centre crops at size = (frames, height, width)), kept pooled
    (`pool_blocks`: pool^2 times smaller than the frames, and pooled once for every video they are compared with)."""
    frames, height, width = (int(v) for v in size)
    groups: dict[str, list[np.ndarray]] = {}
    count = 0
    for batch in clip_batches(str(shards), frames, (height, width), 4, decoder):
        for video, caption in zip(to_uint8_video(batch["video"]), batch["caption"]):
            if caption.strip() and count < max_clips:
                groups.setdefault(caption.strip(), []).append(pool_blocks(video, pool))
                count += 1
        if count >= max_clips:
            break
    if not groups:
        raise EvalError(f"real_shards={shards}: no captioned clip of {frames}x{height}x{width} found (clips smaller "
                        "than the size are not upscaled)")
    return groups


def real_features(i3d: I3DFeatures, shards: str, size: Sequence[int], max_clips: int, batch_size: int = 4,
                  decoder: str = "decord") -> np.ndarray:
    """I3D features [N, D] of up to `max_clips` real clips (centre crops at size = (frames, height, width))."""
    frames, height, width = (int(v) for v in size)
    batches = clip_batches(str(shards), frames, (height, width), batch_size, decoder)
    feats = i3d.features_of(batches, max_clips)
    if feats.shape[0] < 2:
        raise EvalError(f"real_shards={shards}: {feats.shape[0]} clip(s) of {frames}x{height}x{width} found; FVD "
                        "needs at least 2 (clips smaller than the size are not upscaled)")
    return feats


def aggregate(info: dict[str, Any]) -> dict[str, Any]:
    """Per-checkpoint means: clip_score / flicker / motion over videos, diversity over prompts (NaN/None skipped)."""
    videos = [v for p in info["prompts"] for v in p["videos"]]

    def mean(values: list[float | None]) -> float | None:
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else None

    out: dict[str, Any] = {k: mean([v.get(k) for v in videos])
                           for k in ("clip_score", "flicker", "motion", "caption_match", "caption_margin")}
    out["diversity"] = mean([p.get("diversity") for p in info["prompts"]])
    out["videos"] = len(videos)
    return out
