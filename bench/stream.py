"""Streaming generation: frames/s, time to first frame and peak memory against length, vs one-window sampling.

    python bench/stream.py                                   # the stream demo's causal DiT (make stream-demo), CPU
    python bench/stream.py --ckpt runs/quickstart_stream/export --seconds 1 10 60 --markdown
    python bench/stream.py --ckpt runs/distill_stream_demo/export --sampler dmd --steps 4 --guidance 1  # the student
    python bench/stream.py --device cuda --layout wan21_1.3b --height 480 --width 832   # GPU: the 1.3B layout, bf16

Each (mode, length) runs in a fresh process: peak memory is that process's peak RSS on CPU (`max_memory_allocated`
on a GPU). `stream` is `DiTPipeline.stream` (causal DiT + KV cache, VAE decode through its causal cache, frames
encoded to an mp4 as they come); `window` is the reference: the same causal DiT sampling the whole length as ONE
window (`DiTPipeline.__call__`, full block-causal mask over every frame, then one VAE decode), which is how
a model without a streaming sampler would make that video. Same steps, guidance and size in both.
With `--layout wan21_1.3b` (GPU) the DiT is a random-weight causal copy of the Wan 2.1 1.3B layout (speed does
not depend on the weights) and the VAE is the stream export's, so the VAE column is not Wan's.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from table import print_table  # bench/table.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
PROMPT = ("A big, fluffy animated white rabbit stands in a green meadow under a bright blue sky, with trees and "
          "flowers around him, in a colourful cartoon style.")


def child(args: argparse.Namespace) -> dict:
    """One measurement in this process."""
    import torch

    sys.path.insert(0, str(ROOT))
    from vidgen.io.video import VideoWriter, to_uint8_video
    from vidgen.pipeline import DiTPipeline

    torch.set_num_threads(args.threads)
    pipe = DiTPipeline.from_pretrained(args.ckpt, device=args.device)
    if args.layout:
        from omegaconf import OmegaConf
        from vidgen.models.dit import DiT
        cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "model" / "dit" / f"{args.layout}.yaml"))
        cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
        cfg.update(in_channels=pipe.dit.in_channels, text_dim=pipe.dit.config["text_dim"], attention="causal",
                   chunk_frames=pipe.dit.chunk_frames, window_chunks=pipe.dit.window_chunks,
                   sink_chunks=pipe.dit.sink_chunks)
        pipe.dit = pipe.denoiser.net = DiT(**cfg).to(pipe.device).eval()
    if pipe.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    total = round(args.length * args.fps)
    sync = torch.cuda.synchronize if pipe.device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    first = None
    if args.mode == "stream":
        with VideoWriter(Path(tempfile.mkdtemp()) / "s.mp4", fps=args.fps) as out:
            for x, _ in pipe.stream([(0.0, PROMPT)], args.length, args.fps, args.height, args.width,
                                    steps=args.steps, guidance=args.guidance, sampler=args.sampler):
                out.write(to_uint8_video(x[0]))
                sync()
                first = first if first is not None else time.perf_counter() - start
        frames = out.frames
    else:
        cf = pipe.dit.chunk_frames
        n = pipe.vae.pixel_frames(-(-(pipe.latent_frame_of(total - 1) + 1) // cf) * cf)  # whole chunks, as streamed
        video = pipe([PROMPT], n, args.height, args.width, steps=args.steps, guidance=args.guidance,
                     sampler=args.sampler).video
        sync()
        frames = video.shape[2]
        first = time.perf_counter() - start  # nothing is shown before the whole window is done
    wall = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() / 2**20 if pipe.device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"mode": args.mode, "seconds": args.length, "frames": frames, "wall_s": wall, "fps": frames / wall,
            "first_frame_s": first, "peak_mib": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=str(ROOT / "runs" / "quickstart_stream" / "export"))
    p.add_argument("--seconds", type=float, nargs="+", default=[1, 10, 60])
    p.add_argument("--window-max-seconds", type=float, default=10.0,
                   help="the one-window reference only up to this length (its attention is quadratic in length)")
    p.add_argument("--fps", type=float, default=15.0)
    p.add_argument("--height", type=int, default=48)
    p.add_argument("--width", type=int, default=112)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--sampler", default="euler", help="dmd for a distilled streaming student (with --steps 4 "
                   "--guidance 1: experiment=distill_stream_demo)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--layout", default=None, help="a configs/model/dit name (e.g. wan21_1.3b): random causal DiT")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--child", choices=["stream", "window"], help=argparse.SUPPRESS)
    p.add_argument("--length", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.mode = args.child
        print(json.dumps(child(args)))
        return
    if not Path(args.ckpt, "vidgen.json").is_file() and not Path(args.ckpt).is_file():
        sys.exit(f"error: --ckpt {args.ckpt}: no causal DiT export there (make stream-demo writes one)")
    rows = []
    for seconds in args.seconds:
        for mode in ("stream", "window"):
            if mode == "window" and seconds > args.window_max_seconds:
                continue
            cmd = [sys.executable, __file__, "--child", mode, "--length", str(seconds)] + [
                a for k, v in vars(args).items() if k not in ("child", "length", "seconds", "markdown", "mode",
                                                              "window_max_seconds") and v is not None
                for a in (f"--{k.replace('_', '-')}", str(v))]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"error: {mode} {seconds:g} s failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"  {mode:<7}{seconds:>5g} s  {r['frames']:>5} frames  {r['wall_s']:7.1f} s  {r['fps']:6.1f} frames/s"
                  f"  first frame {r['first_frame_s']:6.2f} s  peak {r['peak_mib']:6.0f} MiB", flush=True)
    machine = f"{platform.processor() or platform.machine()}, {args.device}, {args.threads} thread(s)"
    print(f"\n{machine}; {args.ckpt}; {args.height}x{args.width} at {args.fps:g} fps, {args.steps} {args.sampler} "
          f"steps, guidance {args.guidance:g}" + (f"; DiT layout {args.layout} (random weights)" if args.layout else ""))
    head = ["mode", "length", "frames", "wall s", "frames/s", "real time x", "first frame s", "peak MiB"]
    lines = [[r["mode"], f"{r['seconds']:g} s", str(r["frames"]), f"{r['wall_s']:.1f}", f"{r['fps']:.1f}",
              f"{r['fps'] / args.fps:.2f}", f"{r['first_frame_s']:.2f}", f"{r['peak_mib']:.0f}"] for r in rows]
    print_table(head, lines, args.markdown)


if __name__ == "__main__":
    main()
