"""Data-loading throughput: clips/s and frames/s decoded + transformed to 17x256x256, per worker count and decoder.

    python bench/data_throughput.py                      # builds 256-max-side shards from the demo clips
    python bench/data_throughput.py --shards DIR --clips 200 --workers 0 2 4 8 --markdown

Runs the real ClipDataModule (resampled, batch size 1, one 17x256x256 bucket, max_upscale off so every demo clip
lands in it) and times `--clips` batches after the first (worker start-up excluded; reported separately).
Each cell is the best of `--repeats` interleaved runs: on a shared machine the best run is the least disturbed.
A second table times decoding alone (17 consecutive frames per clip, main process) for each backend.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import webdataset as wds  # noqa: E402

from vidgen.data import ClipDataModule, clip_indices, open_video  # noqa: E402

FRAMES, SIZE = 17, 256


def build_demo_shards(out: Path) -> Path:
    """Demo clips -> shards with max side 256 and 17..33-frame clips (4 samples per shard) in `out`."""
    from data_prep.demo_data import prepare_demo_input
    from data_prep.make_shards import build_shards

    build_shards(input_dir=prepare_demo_input(out / "input"), output_dir=out / "shards", max_side=SIZE,
                 min_frames=FRAMES, max_frames=33, shard_size=4, workers=2, seed=0, progress=False)
    return out / "shards"


def measure(shards: Path, decoder: str, workers: int, clips: int) -> dict:
    """Time `clips` batches (after the first) of one configuration -> {first_s, clips_s, frames_s}."""
    dm = ClipDataModule(shards, buckets=[[FRAMES, SIZE, SIZE]], batch_size=1, num_workers=workers,
                        frame_stride=1, max_upscale=None, shuffle_buffer=8, resampled=True,
                        samples_per_epoch=clips + 1, decoder=decoder, rank=0, world_size=1)
    dm.setup("fit")
    start = time.perf_counter()
    it = iter(dm.train_dataloader())
    batch = next(it)
    assert tuple(batch["video"].shape) == (1, 3, FRAMES, SIZE, SIZE)
    first = time.perf_counter()
    n = sum(b["video"].shape[0] for b in it)
    elapsed = time.perf_counter() - first
    return {"first_s": first - start, "clips_s": n / elapsed, "frames_s": n * FRAMES / elapsed}


def decode_only(shards: Path, decoder: str, repeats: int) -> float:
    """Best-of-`repeats` milliseconds to open + decode 17 consecutive frames of each clip (no transform)."""
    samples = list(wds.WebDataset(sorted(str(p) for p in shards.glob("*.tar")), shardshuffle=False))
    rng = random.Random(0)
    plans = [(s["mp4"], clip_indices(json.loads(s["json"])["num_frames"], FRAMES, 1.0, rng)) for s in samples]
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for data, idx in plans:
            open_video(data, decoder).get(idx)
        best = min(best, (time.perf_counter() - start) / len(plans))
    return 1000 * best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=Path, help="clip shard folder (default: build from the demo clips)")
    p.add_argument("--clips", type=int, default=60, help="clips timed per configuration")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--decoders", nargs="+", default=["decord", "pyav"])
    p.add_argument("--repeats", type=int, default=3, help="runs per cell; the best one is reported")
    p.add_argument("--markdown", action="store_true", help="also print a markdown table (for bench/RESULTS.md)")
    args = p.parse_args(argv)
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards or build_demo_shards(Path(tmp))
        results: dict = {}
        for _ in range(args.repeats):  # interleaved, so a burst of load from elsewhere hits every cell alike
            for w in args.workers:
                for d in args.decoders:
                    r = measure(shards, d, w, args.clips)
                    if (d, w) not in results or r["clips_s"] > results[(d, w)]["clips_s"]:
                        results[(d, w)] = r
        decode_ms = {d: decode_only(shards, d, args.repeats * 2) for d in args.decoders}
    table = Table(title=f"{FRAMES}x{SIZE}x{SIZE} clips from {shards if args.shards else 'demo shards (max side 256)'}")
    for col in ("workers", *(f"{d} clips/s" for d in args.decoders), *(f"{d} frames/s" for d in args.decoders),
                "decord/pyav", "first batch s"):
        table.add_column(col, justify="right")
    rows = []
    for w in args.workers:
        r = [results[(d, w)] for d in args.decoders]
        ratio = (results[("decord", w)]["clips_s"] / results[("pyav", w)]["clips_s"]
                 if {"decord", "pyav"} <= set(args.decoders) else float("nan"))
        row = [str(w), *(f"{x['clips_s']:.2f}" for x in r), *(f"{x['frames_s']:.0f}" for x in r), f"{ratio:.2f}",
               " / ".join(f"{x['first_s']:.2f}" for x in r)]
        table.add_row(*row)
        rows.append(row)
    console.print(table)
    console.print("decode only (open + 17 frames, main process): "
                  + ", ".join(f"{d} {ms:.1f} ms/clip" for d, ms in decode_ms.items()))
    console.print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
                  f"torch {torch.__version__}, {args.clips} clips per cell, best of {args.repeats}")
    if args.markdown:
        header = [c.header for c in table.columns]
        print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
        print("\n".join("| " + " | ".join(r) + " |" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
