"""DiT training-step throughput: step time (forward + backward + AdamW), tokens/s, peak memory, MFU on GPU.

    python bench/train_throughput.py                         # CPU: tiny, S, B at 17x64x64 pixels, batch 4
    python bench/train_throughput.py --markdown --steps 5 --fsdp 2      # + FSDP2 over 2 gloo ranks
    python bench/train_throughput.py --device cuda --compile --markdown # GPU, one call: B, XL, wan21_1.3b at
        # 81x480x832 (bf16, activation checkpointing, compiled blocks, fused AdamW, SDPA/FlashAttention, MFU), each
        # beside diffusers' WanTransformer3DModel on the same step, then FSDP2 over every GPU of the machine

Every row of ours is followed by diffusers' `WanTransformer3DModel` of the same shape (random weights, the same
step: x_t, v, MSE, backward, AdamW; the same checkpointing and compilation) unless `--no-reference`.

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

from table import print_table  # bench/table.py, beside this script

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model" / "dit"
SMALL = (17, 64, 64, 4, 64)       # pixel frames, height, width, batch, text tokens
LARGE = (81, 480, 832, 1, 512)    # Wan 2.1 480p: 21 x 60 x 104 latents, 32,760 tokens


def build_dit(size: str, checkpointing: bool, compile: bool = False) -> torch.nn.Module:
    """DiT from configs/model/dit/SIZE.yaml with 16 latent channels and the byte encoder's width (256)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from vidgen.training.parallelize import parallelize

    cfg = OmegaConf.create({"model": {"text": {"dim": 256}, "dit": OmegaConf.load(CONFIGS / f"{size}.yaml")}})
    cfg.model.dit.in_channels = 16
    return parallelize(instantiate(cfg.model.dit), activation_checkpointing=checkpointing, compile=compile)


def build_reference(dit: torch.nn.Module, checkpointing: bool, compile: bool) -> torch.nn.Module:
    """diffusers' `WanTransformer3DModel` computing the same function shape as `dit` (random weights): the
    reference the table compares each of our rows with. Same checkpointing and per-block compilation."""
    from diffusers import WanTransformer3DModel

    from vidgen.io.convert_wan_dit import diffusers_config_from_dit

    # text_mask / abs_pos are off in Wan; without a text mask (none is passed here) the compute is the same
    net = WanTransformer3DModel(**diffusers_config_from_dit({**dit.config, "text_mask": False, "abs_pos": False}))
    if checkpointing:
        net.enable_gradient_checkpointing()
    if compile:
        for block in net.blocks:
            block.compile(fullgraph=True, dynamic=False)
    return net


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


def training_step(net: torch.nn.Module, impl: str, opt: torch.optim.Optimizer, z: torch.Tensor,
                  context: torch.Tensor, cuda: bool) -> None:
    """One rectified-flow step, the same arithmetic for both implementations: x_t, v = net(x_t, t), MSE to eps - z,
    backward, AdamW. impl: "vidgen" (our DiT: t in [0, 1]) or "diffusers" (Wan: timestep = 1000 t)."""
    noise = torch.randn_like(z)
    t = torch.rand(z.shape[0], device=z.device)
    x_t = (1 - t.view(-1, 1, 1, 1, 1)) * z + t.view(-1, 1, 1, 1, 1) * noise
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        if impl == "vidgen":
            v = net(x_t, t, context)
        else:
            v = net(hidden_states=x_t, timestep=t * 1000, encoder_hidden_states=context, return_dict=False)[0]
    loss = torch.nn.functional.mse_loss(v.float(), noise - z)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def measure(size: str, shape: tuple, device: str, steps: int, check_flops: bool, threads: int, impl: str,
            compile: bool, queue: mp.Queue) -> None:
    """One configuration in this (fresh) process -> queue.put(result dict)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    frames, height, width, batch, text_tokens = shape
    cuda = device.startswith("cuda")
    dit = build_dit(size, checkpointing=cuda, compile=compile and impl == "vidgen")
    net = dit if impl == "vidgen" else build_reference(dit, checkpointing=cuda, compile=compile)
    net = net.to(device).train()
    latent = (16, 1 + (frames - 1) // 4, height // 8, width // 8)
    z = torch.randn(batch, *latent, device=device)
    context = torch.randn(batch, text_tokens, dit.config["text_dim"], device=device)
    tokens = latent[1] * latent[2] * latent[3] // 4  # patch (1, 2, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=cuda)

    def step() -> None:
        training_step(net, impl, opt, z, context, cuda)

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(2):  # warm-up: allocator, kernels, compilation, optimizer state
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
    result = {"size": size, "impl": impl + (" +compile" if compile else ""),
              "params_m": sum(p.numel() for p in net.parameters()) / 1e6,
              "shape": f"{frames}x{height}x{width}", "batch": batch, "tokens": tokens, "step_s": t,
              "tokens_s": batch * tokens / t, "tflops": flops / t / 1e12,
              "peak_gib": (torch.cuda.max_memory_allocated() if cuda
                           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30}
    if cuda:
        result["mfu"] = result["tflops"] / matmul_peak_tflops(device)
    if check_flops and impl == "vidgen":
        from torch.utils.flop_counter import FlopCounterMode

        from torch.nn.attention import SDPBackend, sdpa_kernel

        # The math backend decomposes attention into counted matmuls (the CPU flash kernel has no FLOP formula).
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            training_step(net, impl, opt, z, context, cuda)
        result["counted_over_formula"] = counter.get_total_flops() / flops
    queue.put(result)


def measure_fsdp(rank: int, world: int, size: str, shape: tuple, steps: int, port: int, queue: mp.Queue) -> None:
    """FSDP2 on `world` local devices (NCCL on GPUs, gloo on CPU): every block one unit (`apply_fsdp`), bf16
    parameters / fp32 reduction on GPU, batch per rank as in `shape`; rank 0 reports the median step."""
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from vidgen.training.parallelize import apply_fsdp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    device = f"cuda:{rank}" if cuda else "cpu"
    torch.manual_seed(0)
    frames, height, width, batch, text_tokens = shape
    dit = build_dit(size, checkpointing=cuda).to(device).train()
    apply_fsdp([dit], init_device_mesh("cuda" if cuda else "cpu", (world,)), mixed_precision=cuda)
    latent = (16, 1 + (frames - 1) // 4, height // 8, width // 8)
    z = torch.randn(batch, *latent, device=device)
    context = torch.randn(batch, text_tokens, dit.config["text_dim"], device=device)
    opt = torch.optim.AdamW(dit.parameters(), lr=1e-4, fused=cuda)
    times = []
    for i in range(steps + 2):
        dist.barrier()
        start = time.perf_counter()
        training_step(dit, "vidgen", opt, z, context, False)  # FSDP's mixed precision policy replaces autocast
        if cuda:
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    if rank == 0:
        t = sorted(times)[len(times) // 2]
        tokens = latent[1] * latent[2] * latent[3] // 4
        queue.put({"size": size, "impl": f"vidgen FSDP2 x{world}", "params_m": sum(p.numel() for p in dit.parameters())
                   / 1e6, "shape": f"{frames}x{height}x{width}", "batch": batch * world, "tokens": tokens, "step_s": t,
                   "tokens_s": world * batch * tokens / t, "tflops": world * model_flops(dit, tokens, text_tokens, batch)
                   / t / 1e12, "peak_gib": (torch.cuda.max_memory_allocated() if cuda else
                                            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30})
    dist.destroy_process_group()


def run_isolated(*args) -> dict:
    """Run `measure` in a fresh spawned process (clean peak memory, no state between sizes)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=measure, args=(*args, queue))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        return {"size": args[0], "impl": args[6], "error": f"exit code {proc.exitcode} (out of memory?)"}
    return queue.get()


def run_fsdp(size: str, shape: tuple, world: int, steps: int) -> dict:
    """`measure_fsdp` on `world` spawned processes; rank 0's result."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = 29500 + int(time.time()) % 1000
    procs = [ctx.Process(target=measure_fsdp, args=(r, world, size, shape, steps, port, queue)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode != 0 for p in procs):
        return {"size": size, "impl": f"vidgen FSDP2 x{world}", "error": "a rank failed (out of memory?)"}
    return queue.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", nargs="*", default=None, help="default: tiny S B (+ B XL wan21_1.3b at 480p on GPU)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--large", action="store_true", help="81x480x832 for every size (the default on GPU)")
    parser.add_argument("--compile", action="store_true", help="each block compiled (ours and the reference's)")
    parser.add_argument("--no-reference", action="store_true", help="skip diffusers' WanTransformer3DModel rows")
    parser.add_argument("--fsdp", type=int, default=None,
                        help="also FSDP2 over this many local devices (default on GPU: all of them; CPU: gloo ranks)")
    parser.add_argument("--check-flops", action="store_true", help="compare the FLOP formula with FlopCounterMode")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    threads = args.threads or torch.get_num_threads()
    cuda = args.device.startswith("cuda")
    if cuda and args.sizes is None:
        plan = [(s, LARGE) for s in ("B", "XL", "wan21_1.3b")]
    else:
        plan = [(s, LARGE if args.large else SMALL) for s in (args.sizes or ["tiny", "S", "B"])]
    impls = ["vidgen"] + ([] if args.no_reference else ["diffusers"])
    rows = [run_isolated(size, shape, args.device, args.steps, args.check_flops, threads, impl, args.compile)
            for size, shape in plan for impl in impls]
    world = args.fsdp if args.fsdp is not None else (torch.cuda.device_count() if cuda else 0)
    if world:
        rows += [run_fsdp(size, shape, world, args.steps) for size, shape in plan]

    device = torch.cuda.get_device_name(0) if cuda else f"{platform.processor() or platform.machine()}, " \
                                                        f"{threads} threads"
    print(f"DiT training step (fwd + bwd + AdamW), {'bf16 autocast + activation checkpointing' if cuda else 'fp32'}"
          f"{', compiled blocks' if args.compile else ''} on {device}; torch {torch.__version__}")
    cols = ["size", "impl", "params_m", "shape", "batch", "tokens", "step_s", "tokens_s", "tflops", "peak_gib"]
    cols += ["mfu"] if cuda else []
    cols += ["counted_over_formula"] if args.check_flops else []
    fmt = {"params_m": "{:.2f}", "step_s": "{:.3f}", "tokens_s": "{:,.0f}", "tflops": "{:.3f}", "peak_gib": "{:.2f}",
           "mfu": "{:.1%}", "counted_over_formula": "{:.3f}"}
    cells = [[(r.get("error", "") if c not in r else fmt.get(c, "{}").format(r[c])) for c in cols] for r in rows]
    print_table(cols, cells, args.markdown)
    ours = {r["size"]: r for r in rows if r.get("impl", "").startswith("vidgen") and "FSDP" not in r.get("impl", "")
            and "step_s" in r}
    for r in rows:
        if r.get("impl", "").startswith("diffusers") and "step_s" in r and r["size"] in ours:
            print(f"{r['size']}: our step takes {ours[r['size']]['step_s'] / r['step_s']:.2f}x diffusers' time, "
                  f"{ours[r['size']]['peak_gib'] / r['peak_gib']:.2f}x its peak memory")


if __name__ == "__main__":
    main()
