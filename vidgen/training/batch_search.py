"""Find the largest batch per bucket that fits on the device: `python -m vidgen.training.batch_search experiment=...`.

For every bucket of the data config, the real training step of the experiment's DiT (forward, backward and an
optimizer step on random latents of that bucket's shape, the text at its maximum length) is run with growing
batch sizes: doubling until the device runs out of memory, then bisection between the last fit and the first
failure. Prints a table and the `data.batch_size={...}` override to paste (with `--margin` kept free).
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import vidgen.config  # noqa: F401  (registers the config resolvers)
from vidgen.data.buckets import parse_buckets
from vidgen.training.parallelize import parallelize


def fits(step: Callable[[int], None], batch: int) -> bool:
    """Run `step(batch)`; False when the device ran out of memory (the error is swallowed, memory released)."""
    try:
        step(batch)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def largest_batch(step: Callable[[int], None], limit: int = 1024) -> int:
    """The largest batch in [1, limit] for which `step` fits (0 when even 1 does not): doubling, then bisection.

    Assumes memory grows with the batch (if b fails, every batch above b fails too).
    """
    if not fits(step, 1):
        return 0
    good, bad = 1, None
    while bad is None and good < limit:
        trial = min(2 * good, limit)
        good, bad = (trial, None) if fits(step, trial) else (good, trial)
    if bad is None:
        return good
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(step, mid) else (good, mid)
    return good


def dit_step_fn(module, bucket, latent_channels: int, text_len: int, device: torch.device,
                time_factor: int = 4, space_factor: int = 8) -> Callable[[int], None]:
    """One real DiTModule training step (fwd + bwd + AdamW) on random latents of `bucket` [frames, H, W] pixels."""
    frames, height, width = bucket
    shape = (latent_channels, 1 + (frames - 1) // time_factor, height // space_factor, width // space_factor)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-6)
    text_dim = module.dit.config["text_dim"]

    trainable_text = module.conditioner.entries["text"].trainable

    def step(batch: int) -> None:
        latent = torch.randn(batch, *shape, device=device)
        if trainable_text:  # the encoder trains too: captions of the longest length it takes
            text_batch = {"caption": ["x" * (text_len - 2)] * batch}
        else:  # a frozen encoder: precomputed embeddings, as latent shards give them
            text = torch.randn(batch, text_len, text_dim, device=device)
            mask = torch.ones(batch, text_len, dtype=torch.bool, device=device)
            text_batch = {"text_emb": text, "text_mask": mask, "text_null_emb": text[0], "text_null_mask": mask[0]}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = module.training_step({"latent": latent, **text_batch}, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main(argv: list[str] | None = None) -> int:
    """Hydra-style overrides of configs/train.yaml (e.g. experiment=dit_pretrain); prints batch sizes per bucket."""
    args = list(sys.argv[1:] if argv is None else argv)
    margin = 0.9
    for a in [a for a in args if a.startswith("--margin=")]:
        margin = float(a.split("=", 1)[1])
        args.remove(a)
    root = Path(__file__).resolve().parents[2]
    with initialize_config_dir(config_dir=str(root / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["paths.root_dir=.", "paths.output_dir=.", *args])
    if cfg.task.name != "dit":
        print("batch_search: error: task must be dit (experiment=dit_pretrain or task=dit)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module = parallelize(instantiate(cfg.task.module), **cfg.get("scale", {})).to(device).train()
    latent_channels = module.dit.config["in_channels"]
    text_len = int(cfg.model.text.get("max_length", 256))
    found = {}
    for bucket in parse_buckets(cfg.data.buckets):
        dims = (bucket.frames, bucket.height, bucket.width)
        best = largest_batch(dit_step_fn(module, dims, latent_channels, text_len, device), limit=256)
        found[bucket.key] = max(1, int(best * margin)) if best else 0
        print(f"{bucket.key:>14}: largest batch {best:4d} -> with margin {found[bucket.key]}", flush=True)
    print("data.batch_size=" + "{" + ",".join(f"{k}:{v}" for k, v in found.items()) + "}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
