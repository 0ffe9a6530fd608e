"""Sampling speed against quality: samplers, step counts, the step cache (and distilled students) on one table.

    python bench/sampling.py --ckpt runs/demo_dit/export --markdown           # the demo DiT on CPU
    python bench/sampling.py --ckpt runs/demo_dit/export --student runs/distill_demo/export --markdown
    python bench/sampling.py --ckpt runs/demo_dit/export --student runs/distill_demo/export \
        --real-shards data/demo_shards --markdown                          # + caption match against the real clips
    python bench/sampling.py --ckpt exports/wan21_1.3b --device cuda --num-frames 81 --height 480 --width 832

The reference is the checkpoint sampled with 50 Euler steps and CFG (guidance 2 for the demo DiT): every row samples
the same prompts with the same seeds and reports its wall time per video, the speed-up over the reference, and how
far its videos are from the reference's: PSNR of the decoded frames (dB, higher = closer) and the mean absolute
difference of the latents. A distilled `--student` samples with the settings its checkpoint records (its step
schedule, no guidance), at its recorded step count and at each of `--student-steps` (default 2).

The evaluation metrics of `eval.py`, where their inputs exist (nothing is downloaded): with `--real-shards` each
row's caption match (the share of videos nearest to their own caption's real clips, `vidgen.eval.compare`); with
`--i3d` its FVD against the reference's videos (few videos: a noisy, biased estimate, compare rows only); with
`--clip` its mean CLIP score. Every row runs in this process, in the order of the table, after one warm-up video.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vidgen.eval.clip_score import CLIPScorer  # noqa: E402
from vidgen.eval.compare import real_scenes, scene_scores  # noqa: E402
from vidgen.eval.fvd import I3DFeatures, fvd_from_features, load_i3d  # noqa: E402
from vidgen.io.video import to_uint8_video  # noqa: E402
from vidgen.pipeline import DiTPipeline  # noqa: E402
from table import print_table  # bench/table.py, beside this script  # noqa: E402

DEMO_CAPTIONS = Path(__file__).resolve().parents[1] / "data_prep" / "demo_captions.jsonl"

# (label, settings): what each row changes from the reference (50 Euler steps with CFG).
ROWS = [
    ("euler 50 + CFG (reference)", {}),
    ("euler 25", {"steps": 25}),
    ("euler 10", {"steps": 10}),
    ("dpmpp_2m 25", {"steps": 25, "sampler": "dpmpp_2m"}),
    ("unipc 25", {"steps": 25, "sampler": "unipc"}),
    ("unipc 10", {"steps": 10, "sampler": "unipc"}),
    ("euler 50 + step cache 0.1", {"step_cache": 0.1}),
    ("euler 25 + step cache 0.1", {"steps": 25, "step_cache": 0.1}),
]


def prompts_from(path: Path) -> list[str]:
    """Captions of a JSONL file ({"caption"} or {"prompt"}) or one prompt per line."""
    out = []
    for line in (line.strip() for line in path.read_text().splitlines()):
        if line.startswith("{"):
            item = json.loads(line)
            out.append(item.get("caption") or item["prompt"])
        elif line:
            out.append(line)
    return out


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR (dB) between videos in [-1, 1]."""
    mse = ((a - b) / 2).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="runs/demo_dit/export", help="the (teacher) DiT checkpoint or export")
    p.add_argument("--student", action="append", default=[], help="a distilled export (repeatable)")
    p.add_argument("--prompts", default=str(DEMO_CAPTIONS))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--num-frames", type=int, default=9)
    p.add_argument("--height", type=int, default=48)
    p.add_argument("--width", type=int, default=112)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--student-steps", default="2", help="also sample each student at these step counts")
    p.add_argument("--real-shards", help="clip shards of the captions: caption match of every row")
    p.add_argument("--i3d", help="i3d_torchscript.pt: FVD of every row against the reference's videos")
    p.add_argument("--clip", help="a local Hugging Face CLIP folder: mean CLIP score of every row")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    prompts = prompts_from(Path(args.prompts))
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [(prompt, seed) for prompt in prompts for seed in seeds]
    size = (args.num_frames, args.height, args.width)
    base = {"steps": 50, "guidance": args.guidance, "sampler": "euler"}

    def run(pipe: DiTPipeline, settings: dict) -> tuple[float, torch.Tensor, torch.Tensor]:
        pipe([prompts[0]], *size, seed=seeds[0], **settings)  # warm-up
        videos, latents, start = [], [], time.perf_counter()
        for prompt, seed in jobs:
            out = pipe([prompt], *size, seed=seed, **settings)
            videos.append(out.video)
            latents.append(out.latents)
        if pipe.device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / len(jobs), torch.cat(videos), torch.cat(latents)

    teacher = DiTPipeline.from_pretrained(args.ckpt, device=args.device)
    results, reference = [], None
    for label, change in ROWS:
        wall, video, latent = run(teacher, {**base, **change})
        reference = reference or (wall, video, latent)
        results.append((label, wall, video, latent))
        print(f"  {label:<28} {wall:7.2f} s/video", flush=True)
    extra_steps = [int(s) for s in args.student_steps.split(",") if s.strip()]
    for path in args.student:
        student = DiTPipeline.from_pretrained(path, device=args.device)
        settings = {k: student.defaults[k] for k in ("steps", "guidance", "sampler", "shift") if k in student.defaults}
        for steps in dict.fromkeys([settings.get("steps", 4), *extra_steps]):
            wall, video, latent = run(student, {**settings, "steps": steps})
            label = f"student {Path(path).parent.name or path} ({steps} steps)"
            results.append((label, wall, video, latent))
            print(f"  {label:<28} {wall:7.2f} s/video", flush=True)

    ref_wall, ref_video, ref_latent = reference
    metrics = row_metrics(args, [video for _, _, video, _ in results], [prompt for prompt, _ in jobs], size)
    machine = (torch.cuda.get_device_name(0) if args.device.startswith("cuda")
               else f"{platform.processor() or platform.machine()}, {args.threads} thread(s)")
    print(f"\n{args.ckpt}; {len(jobs)} videos ({len(prompts)} prompts x {len(seeds)} seeds) of "
          f"{'x'.join(map(str, size))}, guidance {args.guidance:g}; {machine}; torch {torch.__version__}")
    head = ["sampling", "s / video", "speed-up", "PSNR to reference dB", "latent mean |diff|", *metrics]
    lines = [[label, f"{wall:.2f}", f"{ref_wall / wall:.1f}x", "ref" if i == 0 else f"{psnr(video, ref_video):.1f}",
              "ref" if i == 0 else f"{(latent - ref_latent).abs().mean().item():.3f}",
              *(column[i] for column in metrics.values())]
             for i, (label, wall, video, latent) in enumerate(results)]
    print_table(head, lines, args.markdown)


def row_metrics(args: argparse.Namespace, videos: list[torch.Tensor], prompts: list[str], size: tuple[int, ...]
                ) -> dict[str, list[str]]:
    """{column: one cell per row} of the metrics whose inputs were given (videos [N, 3, T, H, W] per row)."""
    out: dict[str, list[str]] = {}
    if args.real_shards:
        scenes = real_scenes(args.real_shards, size, max_clips=64)
        cells = []
        for video in videos:
            scores = [scene_scores(frames, prompt, scenes) for frames, prompt in zip(to_uint8_video(video), prompts)]
            hits = [s["caption_match"] for s in scores if s["caption_match"] is not None]
            cells.append(f"{sum(hits):.0f}/{len(hits)}" if hits else "n/a")
        out["caption match"] = cells
    if args.i3d:
        i3d = I3DFeatures(load_i3d(args.i3d), args.device)
        ref = i3d(videos[0])
        out[f"FVD to reference ({len(prompts)} videos)"] = ["ref"] + [f"{fvd_from_features(i3d(v), ref):.1f}"
                                                                      for v in videos[1:]]
    if args.clip:
        clip = CLIPScorer.from_pretrained(args.clip, args.device)
        out["CLIP score"] = [f"{sum(clip.score(f, p) for f, p in zip(to_uint8_video(v), prompts)) / len(prompts):.2f}"
                             for v in videos]
    return out


if __name__ == "__main__":
    main()
