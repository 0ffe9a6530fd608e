"""Prior-preservation clips: the base model's own samples for class prompts, written as ordinary clip shards.

    python data_prep/prior_shards.py --ckpt exports/dit --prompts prompts.txt --seeds 0,1 --output data/prior_shards \\
        [--num-frames 9 --height 48 --width 112 --steps 25 --guidance 2]

Each (prompt, seed) becomes one sample KEY.mp4 (H.264) + KEY.json {caption (the prompt), fps, num_frames, width,
height, source, start, end, motion, seed}, packed into clips-000000.tar ... with manifest.json last, the layout of
data_prep/make_shards.py, so `data.sources=[{shards: STYLE, weight: 3, trigger: sks}, {shards: PRIOR, weight: 1}]`
reads them. Prompts: plain text (one per line) or JSONL with "prompt" or "caption" (data_prep/demo_captions.jsonl).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from data_prep.make_shards import DROP_REASONS, _histogram, motion_score  # noqa: E402
from data_prep.style_shards import finish_shards, write_shard  # noqa: E402
from vidgen.errors import UserError, one_line_errors  # noqa: E402
from vidgen.eval.before_after import (add_sampling_args, parse_seeds, read_prompt_list, sample_jobs,  # noqa: E402
                                      sampling_from_args)
from vidgen.io.video import encode_video, encoded_fps  # noqa: E402
from vidgen.pipeline import DiTPipeline  # noqa: E402


def prior_shards(args: argparse.Namespace) -> dict:
    """Sample every prompt x seed with the checkpoint and pack the clips -> the manifest."""
    prompts, seeds = read_prompt_list(args.prompts), parse_seeds(args.seeds)
    sampling = sampling_from_args(args)
    if args.shard_size < 1:
        raise UserError(f"--shard-size={args.shard_size}: expected >= 1")
    if not Path(args.ckpt).exists():
        raise UserError(f"--ckpt={args.ckpt}: no such checkpoint or export folder")
    pipe = DiTPipeline.from_pretrained(args.ckpt, device=args.device)
    size = sampling.size(pipe)
    jobs = [(prompt, seed) for prompt in prompts for seed in seeds]
    videos, settings = sample_jobs(pipe, jobs, sampling, size)
    fps = encoded_fps(sampling.fps)  # the rate encode_video writes, so the json agrees with the mp4
    samples, metas = [], []
    for n, ((prompt, seed), frames) in enumerate(zip(jobs, videos)):
        t, h, w, _ = frames.shape
        meta = {"caption": prompt, "fps": fps, "num_frames": t, "width": w, "height": h,
                "source": f"prior:{Path(args.ckpt).name}", "start": 0.0, "end": round(t / fps, 6),
                "motion": round(motion_score(frames), 4), "seed": seed}
        metas.append(meta)
        samples.append((f"prior_{n // len(seeds):04d}_s{seed}", {
            "mp4": encode_video(frames, fps, crf=args.crf), "json": json.dumps(meta, sort_keys=True).encode()}))
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # stale from here until the new one is written
    shards = []
    for i in range(0, len(samples), args.shard_size):
        name = f"clips-{i // args.shard_size:06d}.tar"
        shards.append({"name": name, "num_samples": write_shard(out / name, samples[i:i + args.shard_size])})
    manifest = {
        "num_samples": len(samples), "shards": shards, "sources": len(prompts),
        "dropped": {r: 0 for r in DROP_REASONS}, "no_caption": sum(not m["caption"] for m in metas),
        "total_seconds": round(sum(m["end"] for m in metas), 3), "histogram": _histogram(metas),
        "unreadable_sources": [],
        "options": {"ckpt": str(Path(args.ckpt).resolve()), "prompts": str(args.prompts), "seeds": seeds,
                    "num_frames": size[0], "height": size[1], "width": size[2], "steps": sampling.steps,
                    "guidance": sampling.guidance, "negative_prompt": sampling.negative_prompt,
                    "sampler": sampling.sampler, "shift": settings.get("shift"), "fps": fps, "crf": args.crf,
                    "shard_size": args.shard_size, "ema_used": pipe.info.get("ema_used")},
    }
    finish_shards(out, manifest)
    return manifest


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see --help)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="the base DiT: export folder or checkpoint")
    p.add_argument("--prompts", required=True, help="class prompts: plain text or JSONL (prompt/caption)")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds; one clip per prompt and seed")
    p.add_argument("--output", required=True, help="folder for clips-*.tar and manifest.json")
    p.add_argument("--crf", type=int, default=18, help="H.264 quality (lower = better, bigger)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard")
    add_sampling_args(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry: sample and pack the prior clips, print one summary line -> exit code 0."""
    args = parse_args(argv)
    m = prior_shards(args)
    o = m["options"]
    print(f"{m['num_samples']} prior clips ({m['sources']} prompts x {len(o['seeds'])} seeds, "
          f"{o['num_frames']}x{o['height']}x{o['width']}) -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(one_line_errors(main)())
