"""Before/after a style fine-tune: base and tuned sampled on the same prompts and seeds, with and without the trigger.

    python -m vidgen.eval.before_after --base exports/dit --tuned runs/finetune_lora/checkpoints/last.ckpt \\
        --prompts prompts.txt --trigger sks --seeds 0,1 --out runs/before_after [--style-shards data/style_shards] \\
        [--num-frames 9 --height 48 --width 112 --steps 25 --guidance 2]

Every prompt is sampled as written and with the trigger in front (exactly as training put it there:
`vidgen.data.pipeline.with_trigger`, "sks <prompt>"), by both models with the same seeds. Writes
`OUT/base|tuned/NNN_with|without_sSEED.mp4` (+ contact-sheet .png), one side-by-side `OUT/grid.png` (rows: prompt x
{with, without trigger}; columns: base | tuned per seed, a few frames each) and `OUT/settings.json` (every setting and
the numbers). Two numbers, both on the uint8 frames before H.264:

  toward_style: mean over with-trigger samples of style_score(tuned) - style_score(base); with --style-shards, as a
                fraction of style_score(style clips) - style_score(base) (0: no change, 1: as styled as the clips).
  prior_drift:  mean |tuned - base| per pixel (0-255) over the samples WITHOUT the trigger (what prior preservation
                keeps small).
and, to tell a style leak from other change: style_leak, the toward_style of the samples WITHOUT the trigger (the
same scale: 0 = the style did not leak into them at all).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import textwrap
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from vidgen.data.pipeline import with_trigger
from vidgen.data.shards import resolve_shards
from vidgen.errors import UserError, one_line_errors
from vidgen.eval.compare import Sampling
from vidgen.io.prompts import read_prompt_file
from vidgen.io.video import read_video, save_sample, to_uint8_video
from vidgen.pipeline import DiTPipeline

GRID_FRAMES = 3  # frames shown per grid cell (evenly spaced)
GAP = 2  # pixels between the frames of one cell
PAD = 6  # pixels between cells
LABEL_WIDTH = 200  # left column: the row's prompt
HEADER_HEIGHT = 16  # top row: the column's model and seed
VARIANTS = ("with", "without")  # trigger word in front of the prompt, or not


class BeforeAfterError(UserError):
    """A before/after setting or input that cannot work; the message names it."""


def style_score(frames: np.ndarray) -> float:
    """Warmth of uint8 frames `[..., 3]` (RGB, 0-255): mean of R - B over all pixels, in [-255, 255].

    The one statistic of the style fine-tune demo: the grades of data_prep/style_shards.py raise it (on the demo
    clips, "warm" by 50-75, "sepia" by 15-40); ordinary footage sits near 0-30.
    """
    x = np.asarray(frames)
    return float(x[..., 0].astype(np.float64).mean() - x[..., 2].astype(np.float64).mean())


def read_prompt_list(path: str | os.PathLike, setting: str = "--prompts") -> list[str]:
    """Prompts from a file: plain text (one per line) or JSONL with "prompt" or "caption" (demo_captions.jsonl)."""
    return [item["prompt"] for item in read_prompt_file(path, setting, keys=("prompt", "caption"))]


def parse_seeds(text: str, setting: str = "--seeds") -> list[int]:
    """"0,1,2" -> [0, 1, 2] (non-negative, distinct)."""
    try:
        seeds = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise BeforeAfterError(f"{setting}={text}: expected comma-separated integers like 0,1") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise BeforeAfterError(f"{setting}={text}: expected distinct non-negative integers like 0,1")
    return seeds


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """The sampling options shared by before_after and data_prep/prior_shards.py (fields of compare.Sampling)."""
    g = p.add_argument_group("sampling")
    g.add_argument("--num-frames", type=int, help="frames per video (1 + 4k); default: recorded with the checkpoint")
    g.add_argument("--height", type=int, help="default: recorded with the checkpoint")
    g.add_argument("--width", type=int, help="default: recorded with the checkpoint")
    g.add_argument("--steps", type=int, default=25)
    g.add_argument("--guidance", type=float, default=2.0)
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--sampler", default="euler")
    g.add_argument("--shift", type=float, help="default: the resolution-dependent shift the model trained with")
    g.add_argument("--fps", type=float, default=8.0, help="frame rate of the written mp4s")
    g.add_argument("--batch-size", type=int, default=4, help="videos per sampler call")
    g.add_argument("--device", default="auto", help="cpu, cuda, or auto")


def sampling_from_args(args: argparse.Namespace) -> Sampling:
    """compare.Sampling from the parsed sampling options."""
    if args.batch_size < 1 or args.fps <= 0:
        raise BeforeAfterError(f"--batch-size={args.batch_size}, --fps={args.fps}: both must be positive")
    return Sampling(num_frames=args.num_frames, height=args.height, width=args.width, steps=args.steps,
                    guidance=args.guidance, negative_prompt=args.negative_prompt, sampler=args.sampler,
                    shift=args.shift, fps=args.fps, batch_size=args.batch_size)


def sample_jobs(pipe: DiTPipeline, jobs: Sequence[tuple[str, int]], sampling: Sampling,
                size: tuple[int, int, int]) -> tuple[list[np.ndarray], dict[str, Any]]:
    """(prompt, seed) jobs -> their uint8 videos `[T, H, W, 3]` (in job order) and the sampler's settings."""
    videos, settings = [], {}
    for start in range(0, len(jobs), sampling.batch_size):
        batch = jobs[start:start + sampling.batch_size]
        out = pipe([p for p, _ in batch], *size, steps=sampling.steps, guidance=sampling.guidance,
                   negative_prompt=sampling.negative_prompt, seed=[s for _, s in batch], sampler=sampling.sampler,
                   shift=sampling.shift)
        videos += list(to_uint8_video(out.video))  # [B, T, H, W, 3]
        settings = out.settings
    return videos, settings


def label_font() -> ImageFont.ImageFont:
    """PIL's built-in font (no font file needed)."""
    return ImageFont.load_default()


def grid_image(rows: Sequence[tuple[str, Sequence[np.ndarray]]], columns: Sequence[str],
               frames_per_cell: int = GRID_FRAMES) -> Image.Image:
    """Side-by-side grid: one row per (label, videos `[T, H, W, 3]` one per column), a few frames per cell.

    Size: (LABEL_WIDTH + C * (k * W + (k - 1) * GAP + PAD), HEADER_HEIGHT + R * (H + PAD)), k = min(frames, T).
    """
    t, h, w, _ = rows[0][1][0].shape
    k = min(frames_per_cell, t)
    idx = np.linspace(0, t - 1, k).round().astype(int)
    cell_w = k * w + (k - 1) * GAP
    sheet = Image.new("RGB", (LABEL_WIDTH + len(columns) * (cell_w + PAD), HEADER_HEIGHT + len(rows) * (h + PAD)),
                      "white")
    draw, font = ImageDraw.Draw(sheet), label_font()
    for c, name in enumerate(columns):
        draw.text((LABEL_WIDTH + c * (cell_w + PAD), 2), name, fill="black", font=font)
    max_lines = max(1, (h + PAD) // 11)
    for r, (label, videos) in enumerate(rows):
        y = HEADER_HEIGHT + r * (h + PAD)
        lines = textwrap.wrap(label, width=LABEL_WIDTH // 6) or [""]
        if len(lines) > max_lines:
            lines = lines[:max_lines - 1] + [lines[max_lines - 1][:LABEL_WIDTH // 6 - 3] + "..."]
        draw.multiline_text((2, y), "\n".join(lines), fill="black", font=font, spacing=1)
        for c, video in enumerate(videos):
            x0 = LABEL_WIDTH + c * (cell_w + PAD)
            for n, i in enumerate(idx):
                sheet.paste(Image.fromarray(video[i]), (x0 + n * (w + GAP), y))
    return sheet


def style_reference(spec: str, max_clips: int) -> tuple[float, int]:
    """Mean style_score over up to `max_clips` clips of a shard set (decoded from the tars) -> (score, clips)."""
    scores = []
    for url in resolve_shards(spec, "--style-shards").urls:
        with tarfile.open(url) as tar:
            for member in tar:
                if len(scores) >= max_clips:
                    break
                if member.isfile() and member.name.endswith(".mp4"):
                    frames, _ = read_video(tar.extractfile(member).read())
                    scores.append(style_score(frames))
    if not scores:
        raise BeforeAfterError(f"--style-shards={spec}: no .mp4 clip found")
    return float(np.mean(scores)), len(scores)


def compare_models(base: str, tuned: str, prompts: Sequence[str], trigger: str, seeds: Sequence[int],
                   sampling: Sampling, out_dir: Path, device: str = "auto") -> dict[str, Any]:
    """Sample both models on prompts x {with, without trigger} x seeds; write mp4s + grid -> results for settings.json.

    The models are loaded one after the other (one in memory at a time); the numbers use the uint8 frames.
    """
    items = [(p, v, s) for p in range(len(prompts)) for v in VARIANTS for s in seeds]  # prompt-major
    text = {(p, "with"): with_trigger(prompts[p], trigger) for p in range(len(prompts))}
    text |= {(p, "without"): prompts[p] for p in range(len(prompts))}
    frames: dict[str, list[np.ndarray]] = {}
    results: dict[str, Any] = {"models": {}, "videos": {}}
    size = None
    for label, path in (("base", base), ("tuned", tuned)):
        pipe = DiTPipeline.from_pretrained(path, device=device)
        size = size or sampling.size(pipe)  # the base decides the size; the tuned model samples the same
        frames[label], settings = sample_jobs(pipe, [(text[p, v], s) for p, v, s in items], sampling, size)
        results["models"][label] = {"path": str(path), "ema_used": pipe.info.get("ema_used"),
                                    "global_step": pipe.info.get("global_step"), "sampler_settings": settings}
        for (p, v, s), video in zip(items, frames[label]):
            name = f"{p:03d}_{v}_s{s}"
            mp4, _ = save_sample(out_dir / label / name, torch_video(video), fps=sampling.fps)
            results["videos"].setdefault(name, {"prompt": text[p, v], "seed": s})[label] = {
                "mp4": str(mp4.relative_to(out_dir)), "style_score": style_score(video)}
        del pipe
    rows = [(f"{v}: {text[p, v]}",
             [frames[m][items.index((p, v, s))] for s in seeds for m in ("base", "tuned")])
            for p in range(len(prompts)) for v in VARIANTS]
    columns = [f"{m} s{s}" for s in seeds for m in ("base", "tuned")]
    grid_image(rows, columns).save(out_dir / "grid.png")
    with_idx = [i for i, (_, v, _) in enumerate(items) if v == "with"]
    without_idx = [i for i, (_, v, _) in enumerate(items) if v == "without"]
    results["size"] = list(size)
    results["base_style_score_with_trigger"] = float(np.mean([style_score(frames["base"][i]) for i in with_idx]))
    results["toward_style_raw"] = float(np.mean([style_score(frames["tuned"][i]) - style_score(frames["base"][i])
                                                 for i in with_idx]))
    results["style_leak_raw"] = float(np.mean([style_score(frames["tuned"][i]) - style_score(frames["base"][i])
                                               for i in without_idx]))
    results["prior_drift"] = float(np.mean([np.abs(frames["tuned"][i].astype(np.float64) - frames["base"][i]).mean()
                                            for i in without_idx]))
    return results


def torch_video(frames: np.ndarray) -> torch.Tensor:
    """uint8 `[T, H, W, 3]` -> `[3, T, H, W]` in [-1, 1] (what save_sample takes; exact round trip)."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1


def summary_table(results: dict[str, Any], trigger: str) -> str:
    """The two numbers in one short table."""
    relative = results.get("style_reference") is not None
    meaning = (f"style shift with \"{trigger}\", as a fraction of the style clips' (1 = as styled as them)"
               if relative else f"mean style_score (R - B) shift with \"{trigger}\", tuned - base")
    ts, leak = results["toward_style"], results.get("style_leak")
    return "\n".join([f"{'metric':<14}{'value':>9}  meaning",
                      f"{'toward_style':<14}{'n/a' if ts is None else f'{ts:.3f}':>9}  {meaning}",
                      f"{'prior_drift':<14}{results['prior_drift']:>9.3f}  mean |tuned - base| per pixel "
                      f"(0-255) without the trigger",
                      f"{'style_leak':<14}{'n/a' if leak is None else f'{leak:.3f}':>9}  toward_style of the samples "
                      f"without the trigger (0 = no leak)"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see --help)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the base DiT: export folder or checkpoint")
    p.add_argument("--tuned", required=True, help="the fine-tuned DiT: LoRA/full checkpoint or export")
    p.add_argument("--prompts", required=True, help="plain text (one per line) or JSONL with prompt/caption")
    p.add_argument("--trigger", default="sks", help="the trigger word the style set trained with")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds, the same for both models")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--style-shards", help="the style clips: toward_style becomes relative to their style_score")
    p.add_argument("--style-clips", type=int, default=32, help="how many style clips to score")
    add_sampling_args(p)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Sample, write mp4s + grid.png + settings.json, print the table -> settings.json's content."""
    prompts, seeds = read_prompt_list(args.prompts), parse_seeds(args.seeds)
    sampling = sampling_from_args(args)
    for flag, path in (("--base", args.base), ("--tuned", args.tuned)):
        if not Path(path).exists():
            raise BeforeAfterError(f"{flag}={path}: no such checkpoint or export folder")
    reference = style_reference(args.style_shards, args.style_clips) if args.style_shards else None
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = compare_models(args.base, args.tuned, prompts, args.trigger, seeds, sampling, out_dir, args.device)
    toward, leak = results["toward_style_raw"], results["style_leak_raw"]
    if reference is not None:
        span = reference[0] - results["base_style_score_with_trigger"]
        results["style_reference"] = {"shards": args.style_shards, "clips": reference[1], "style_score": reference[0],
                                      "minus_base": span}
        toward, leak = (toward / span, leak / span) if abs(span) > 1e-6 else (None, None)
    results["toward_style"], results["style_leak"] = toward, leak
    settings = {**vars(args), "prompts_file": args.prompts, "prompts": prompts, "seeds": seeds,
                "sampling": asdict(sampling), "style_score": "mean R - B over pixels of uint8 frames "
                "(vidgen.eval.before_after.style_score)", "grid": "grid.png", **results}
    (out_dir / "settings.json").write_text(json.dumps(settings, indent=2, default=str) + "\n")
    print(summary_table(results, args.trigger))
    print(f"grid: {out_dir / 'grid.png'}  settings: {out_dir / 'settings.json'}")
    return settings


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (see the module docstring) -> exit code 0."""
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(one_line_errors(main)())
