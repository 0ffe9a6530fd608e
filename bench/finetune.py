"""LoRA vs full fine-tune: step time, trainable parameters, optimizer state and peak memory of one DiT training step.

    python bench/finetune.py                       # CPU: the wan21_1.3b layout cut to --depth 6 blocks, 1x64x64 bucket
    python bench/finetune.py --depth 30 --markdown  # the whole 1.3B layout (needs ~24 GB RAM for the full fine-tune)
    python bench/finetune.py --device cuda --bucket 81x480x832 --depth 30   # GPU: bf16 autocast + checkpointing

Each mode runs in a fresh process (peak memory = that process's peak RSS on CPU, `max_memory_allocated` on GPU):
the DiT of configs/model/dit/wan21_1.3b.yaml (optionally with fewer blocks: every block is the same, so time and
memory per block scale linearly), random latents of the bucket's size (16 channels, 4x time / 8x space, patch
1x2x2) and random 4096-wide text context of 32 tokens; the step is the real `Denoiser.loss` + backward + AdamW.
LoRA: peft adapters (rank 16) on the attention and FFN linears of every block via
`vidgen.training.adapters.apply_lora`, exactly as `experiment=finetune_lora` applies them.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omegaconf import OmegaConf  # noqa: E402

from vidgen.diffusion.denoiser import Denoiser  # noqa: E402
from vidgen.diffusion.flow import RectifiedFlow  # noqa: E402
from vidgen.models.dit import DiT  # noqa: E402
from vidgen.training.adapters import apply_lora  # noqa: E402
from vidgen.training.parallelize import parallelize  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "model" / "dit" / "wan21_1.3b.yaml"


def build(depth: int, checkpointing: bool) -> DiT:
    """The wan21_1.3b DiT with `depth` blocks."""
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIG))
    cfg.pop("_target_")
    cfg["depth"] = depth
    return parallelize(DiT(**cfg), activation_checkpointing=checkpointing)


def run(mode: str, depth: int, bucket: tuple[int, int, int], steps: int, device: str, queue: mp.Queue) -> None:
    """One mode in this (fresh) process; puts a result row on `queue`."""
    torch.set_num_threads(1 if device == "cpu" else torch.get_num_threads())
    torch.manual_seed(0)
    dev = torch.device(device)
    dit = build(depth, checkpointing=dev.type == "cuda").to(dev).train()
    if mode == "lora":
        apply_lora(dit, rank=16)
    params = [p for p in dit.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=dev.type == "cuda")
    denoiser = Denoiser(dit, RectifiedFlow())
    frames, height, width = bucket
    z = torch.randn(1, 16, 1 + (frames - 1) // 4, height // 8, width // 8, device=dev)
    cond = {"context": torch.randn(1, 32, 4096, device=dev)}
    times = []
    for i in range(steps + 1):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss = denoiser.loss(z, cond)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first step allocates the optimizer state: not timed
            times.append(time.perf_counter() - start)
    state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                      if torch.is_tensor(t))
    peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    queue.put({"mode": mode, "total": sum(p.numel() for p in dit.parameters()), "trainable": sum(p.numel() for p in params),
               "step_s": statistics.median(times), "optimizer_gb": state_bytes / 1e9, "peak_gb": peak / 1e9})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=6, help="DiT blocks of the wan21_1.3b layout (30 = the whole model)")
    p.add_argument("--bucket", default="1x64x64", help="pixel frames x height x width")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    bucket = tuple(int(v) for v in args.bucket.split("x"))
    ctx = mp.get_context("spawn")
    rows = []
    for mode in ("lora", "full"):
        queue = ctx.Queue()
        proc = ctx.Process(target=run, args=(mode, args.depth, bucket, args.steps, args.device, queue))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            print(f"{mode}: the process died (exit {proc.exitcode}; out of memory?)", file=sys.stderr)
            continue
        rows.append(queue.get())
    machine = f"{platform.processor() or platform.machine()}, torch {torch.__version__}, device {args.device}"
    print(f"wan21_1.3b layout, {args.depth} block(s), bucket {args.bucket}, batch 1, {args.steps} timed steps; {machine}")
    header = "| mode | parameters | trainable | step s | AdamW state GB | peak GB |"
    print(header + ("\n|---|---|---|---|---|---|" if args.markdown else ""))
    for r in rows:
        print(f"| {r['mode']} | {r['total']:,} | {r['trainable']:,} ({100 * r['trainable'] / r['total']:.2f}%) | "
              f"{r['step_s']:.2f} | {r['optimizer_gb']:.3f} | {r['peak_gb']:.2f} |")
    if len(rows) == 2:
        lora, full = rows
        print(f"LoRA / full: step time {lora['step_s'] / full['step_s']:.2f}x, peak memory "
              f"{lora['peak_gb'] / full['peak_gb']:.2f}x")


if __name__ == "__main__":
    main()
