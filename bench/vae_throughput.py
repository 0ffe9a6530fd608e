"""Causal VAE throughput: encode / decode frames/s and peak memory on 17x256x256 clips, per model config.

    python bench/vae_throughput.py                                   # small + wan21, CPU fp32, chunk 1 and whole
    python bench/vae_throughput.py --models small --chunks 1 none --repeats 3 --markdown
    python bench/vae_throughput.py --device cuda                     # GPU: bf16 weights + activations

Every (model, op, chunk) cell runs in a fresh subprocess, so peak memory is that cell's own: on CPU the
process high-water RSS (`ru_maxrss`) minus the RSS before the timed op (weights + input already resident);
on GPU `torch.cuda.max_memory_allocated` minus the memory allocated before the op. Weights are random
(throughput does not depend on their values). `chunk` is latent frames per temporal chunk (the
`CausalCache` path; `none` = the whole clip in one pass). Time is the best of `--repeats` runs after a
warm-up on a 1-frame clip.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vidgen.models.vae import VideoVAE  # noqa: E402


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build(model: str, device: str) -> VideoVAE:
    cfg = yaml.safe_load((ROOT / "configs" / "model" / "vae" / f"{model}.yaml").read_text())
    cfg.pop("_target_")
    torch.manual_seed(0)
    vae = VideoVAE(**cfg).eval().to(device)
    return vae.to(torch.bfloat16) if device == "cuda" else vae  # GPU path: bf16 end to end


@torch.no_grad()
def run_cell(model: str, op: str, chunk: int | None, frames: int, size: int, repeats: int, device: str) -> dict:
    """Time one op in this process -> {"seconds", "frames_per_s", "peak_mem_gib", "params"}."""
    vae = build(model, device)
    dtype = next(vae.parameters()).dtype
    s, c = vae.spatial_factor, vae.latent_channels
    x = torch.rand(1, 3, frames, size, size, device=device, dtype=dtype) * 2 - 1
    z = torch.randn(1, c, vae.latent_frames(frames), size // s, size // s, device=device, dtype=dtype)
    fn = (lambda: vae.encode(x, chunk_size=chunk).mode()) if op == "encode" else (lambda: vae.decode(z, chunk_size=chunk))
    # warm-up on one frame (allocator, kernels) without inflating the peak of the real op much
    vae.encode(x[:, :, :1]) if op == "encode" else vae.decode(z[:, :, :1])
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_bytes()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - base
    return {"seconds": best, "frames_per_s": frames / best, "peak_mem_gib": peak / 2**30,
            "params": sum(p.numel() for p in vae.parameters())}


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["small", "wan21"])
    p.add_argument("--chunks", nargs="+", default=["1", "none"], help="latent frames per chunk; none = whole")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--markdown", action="store_true", help="print a markdown table (for bench/RESULTS.md)")
    p.add_argument("--cell", nargs=3, metavar=("MODEL", "OP", "CHUNK"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.cell:  # child process: one measurement, JSON on stdout
        model, op, chunk = args.cell
        out = run_cell(model, op, None if chunk == "none" else int(chunk), args.frames, args.size, args.repeats,
                       args.device)
        print(json.dumps(out))
        return

    rows = []
    for model in args.models:
        for chunk in args.chunks:
            cells = {}
            for op in ("encode", "decode"):
                cmd = [sys.executable, __file__, "--cell", model, op, chunk, "--frames", str(args.frames),
                       "--size", str(args.size), "--repeats", str(args.repeats), "--device", args.device]
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode:
                    raise SystemExit(f"{model} {op} chunk={chunk} failed:\n{res.stderr[-2000:]}")
                cells[op] = json.loads(res.stdout.strip().splitlines()[-1])
                print(f"{model:6s} {op:6s} chunk={chunk:4s} {cells[op]['frames_per_s']:8.2f} frames/s "
                      f"peak +{cells[op]['peak_mem_gib']:.2f} GiB", file=sys.stderr, flush=True)
            rows.append((model, chunk, cells))

    clip = f"{args.frames}x{args.size}x{args.size}"
    dtype = "bf16" if args.device == "cuda" else "fp32"
    print(f"\nMachine: {machine()}; device {args.device}, {dtype}, batch 1, clip {clip}, best of {args.repeats}\n")
    header = ["model", "params", "chunk (latent frames)", "encode frames/s", "decode frames/s",
              "encode peak mem GiB", "decode peak mem GiB"]
    lines = []
    for model, chunk, cells in rows:
        e, d = cells["encode"], cells["decode"]
        lines.append([model, f"{e['params'] / 1e6:.1f}M", chunk, f"{e['frames_per_s']:.2f}", f"{d['frames_per_s']:.2f}",
                      f"{e['peak_mem_gib']:.2f}", f"{d['peak_mem_gib']:.2f}"])
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for line in lines:
            print("| " + " | ".join(line) + " |")
    else:
        widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
        for line in [header, *lines]:
            print("  ".join(v.rjust(w) for v, w in zip(line, widths)))


if __name__ == "__main__":
    main()
