"""DiT training-step throughput: step time (forward + backward + AdamW), tokens/s, peak memory, MFU on GPU.

    python bench/train_throughput.py                         # CPU: tiny, S, B at 17x64x64 pixels, batch 4
    python bench/train_throughput.py --markdown --steps 5
    python bench/train_throughput.py --device cuda           # + L, XL, wan21_1.3b at 81x480x832 (bf16,
                                                             #   activation checkpointing, fused AdamW, MFU)

Each configuration runs in a fresh process (peak memory = that process's peak RSS on CPU, or
`torch.cuda.max_memory_allocated` on GPU) on random latents at the size the VAE gives for the pixel bucket
(16 channels, 4x time / 8x space) and random text context; the text encoder and VAE are not timed.
Model FLOPs per step use the standard count (Kaplan et al. 2020; PaLM App. B): 6 x (matmul weights) x (tokens each
weight sees: latent tokens, or text tokens for the cross-attention keys / values) + 12 x layers x dim x (latent
tokens^2 + latent x text tokens) for attention scores and values -- recomputation by activation
checkpointing is not counted, as MFU requires. `--check-flops` compares it with `FlopCounterMode` on one step.
MFU divides by the bf16 matmul TFLOP/s this card reaches in the same run (8192^3 matmuls).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model" / "dit"
SMALL = (17, 64, 64, 4, 64)       # pixel frames, height, width, batch, text tokens
LARGE = (81, 480, 832, 1, 512)    # Wan 2.1 480p: 21 x 60 x 104 latents, 32,760 tokens


def build_dit(size: str, checkpointing: bool) -> torch.nn.Module:
    """DiT from configs/model/dit/SIZE.yaml with 16 latent channels and the byte encoder's width (256)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from vidgen.training.parallelize import parallelize

    cfg = OmegaConf.create({"model": {"text": {"dim": 256}, "dit": OmegaConf.load(CONFIGS / f"{size}.yaml")}})
    cfg.model.dit.in_channels = 16
    return parallelize(instantiate(cfg.model.dit), activation_checkpointing=checkpointing)


def model_flops(dit: torch.nn.Module, tokens: int, text_tokens: int, batch: int) -> float:
    """Training FLOPs of one step: 6 x weights x the tokens each weight sees, + attention (fwd + bwd)."""
    def numel(*modules: torch.nn.Module) -> int:
        return sum(m.weight.numel() for mod in modules for m in mod.modules()
                   if isinstance(m, (torch.nn.Linear, torch.nn.Conv3d)))

    # Cross-attention keys / values and the text projection run over text tokens, the time MLP once per frame.
    text = numel(dit.condition_embedder.text_embedder, *(m for b in dit.blocks for m in (b.attn2.to_k, b.attn2.to_v)))
    per_frame = numel(dit.condition_embedder.time_embedder, dit.condition_embedder.time_proj)
    latent = numel(dit) - text - per_frame
    attention = 12 * len(dit.blocks) * dit.dim * (tokens * tokens + tokens * text_tokens)  # QK^T and AV
    return batch * (6 * (latent * tokens + text * text_tokens) + attention)


def matmul_peak_tflops(device: str) -> float:
    """Measured dense bf16 matmul TFLOP/s (8192^3, best of 20) on this card."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(20):
        start = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * 8192**3 / best / 1e12


def measure(size: str, shape: tuple, device: str, steps: int, check_flops: bool, threads: int,
            queue: mp.Queue) -> None:
    """One configuration in this (fresh) process -> queue.put(result dict)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    frames, height, width, batch, text_tokens = shape
    cuda = device.startswith("cuda")
    dit = build_dit(size, checkpointing=cuda).to(device).train()
    latent = (16, 1 + (frames - 1) // 4, height // 8, width // 8)
    z = torch.randn(batch, *latent, device=device)
    context = torch.randn(batch, text_tokens, dit.config["text_dim"], device=device)
    tokens = latent[1] * latent[2] * latent[3] // 4  # patch (1, 2, 2)
    opt = torch.optim.AdamW(dit.parameters(), lr=1e-4, fused=cuda)
    from vidgen.diffusion.flow import RectifiedFlow

    flow = RectifiedFlow()

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = flow.loss(dit, z, {"context": context})
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(2):  # warm-up: allocator, kernels, optimizer state
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    t = sorted(times)[len(times) // 2]  # median: robust to a disturbed step on a shared machine
    flops = model_flops(dit, tokens, text_tokens, batch)
    result = {"size": size, "params_m": sum(p.numel() for p in dit.parameters()) / 1e6,
              "shape": f"{frames}x{height}x{width}", "batch": batch, "tokens": tokens, "step_s": t,
              "tokens_s": batch * tokens / t, "tflops": flops / t / 1e12,
              "peak_gib": (torch.cuda.max_memory_allocated() if cuda
                           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30}
    if cuda:
        result["mfu"] = result["tflops"] / matmul_peak_tflops(device)
    if check_flops:
        from torch.utils.flop_counter import FlopCounterMode

        from torch.nn.attention import SDPBackend, sdpa_kernel

        # The math backend decomposes attention into counted matmuls (the CPU flash kernel has no FLOP formula).
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                loss = flow.loss(dit, z, {"context": context})
            loss.backward()
        result["counted_over_formula"] = counter.get_total_flops() / flops
    queue.put(result)


def run_isolated(*args) -> dict:
    """Run `measure` in a fresh spawned process (clean peak memory, no state between sizes)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=measure, args=(*args, queue))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        return {"size": args[0], "error": f"exit code {proc.exitcode} (out of memory?)"}
    return queue.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", nargs="*", default=None, help="default: tiny S B (+ L XL wan21_1.3b on GPU)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--check-flops", action="store_true", help="compare the FLOP formula with FlopCounterMode")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    threads = args.threads or torch.get_num_threads()
    cuda = args.device.startswith("cuda")
    plan = [(s, SMALL) for s in (args.sizes or ["tiny", "S", "B"])]
    if cuda and args.sizes is None:
        plan += [(s, LARGE) for s in ("L", "XL", "wan21_1.3b")]
    rows = [run_isolated(size, shape, args.device, args.steps, args.check_flops, threads) for size, shape in plan]

    device = torch.cuda.get_device_name(0) if cuda else f"{platform.processor() or platform.machine()}, " \
                                                        f"{threads} threads"
    print(f"DiT training step (fwd + bwd + AdamW), {'bf16 autocast + activation checkpointing' if cuda else 'fp32'}"
          f" on {device}; torch {torch.__version__}")
    cols = ["size", "params_m", "shape", "batch", "tokens", "step_s", "tokens_s", "tflops", "peak_gib"]
    cols += ["mfu"] if cuda else []
    cols += ["counted_over_formula"] if args.check_flops else []
    fmt = {"params_m": "{:.2f}", "step_s": "{:.3f}", "tokens_s": "{:,.0f}", "tflops": "{:.3f}", "peak_gib": "{:.2f}",
           "mfu": "{:.1%}", "counted_over_formula": "{:.3f}"}
    cells = [[r.get("error", "") if c not in r else fmt.get(c, "{}").format(r[c]) for c in cols] for r in rows]
    if args.markdown:
        print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
        for row in cells:
            print("| " + " | ".join(row) + " |")
    else:
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
        print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
        for row in cells:
            print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


if __name__ == "__main__":
    main()
