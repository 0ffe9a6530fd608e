"""Per-channel latent statistics of a VAE export, measured on clip shards and stored in the export.

    python -m vidgen.data.latent_stats vae=exports/vae shards=data/clip_shards [clips=64 frames=17 size=256
        batch_size=1 chunk=4 device=cpu decoder=decord]

`encode(x, normalize=True)` then gives roughly unit-variance latents for the DiT (the role of SD's 0.18215 and
Wan's `latents_mean/std`, measured instead of hard-coded). The export is rewritten in place (atomically), so
its content fingerprint changes: measure before encoding latent shards or training a DiT on it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Iterable

import torch

from vidgen.errors import one_line_errors
from vidgen.data.datamodule import ClipDataModule
from vidgen.data.shards import DataConfigError
from vidgen.io.pretrained import load_pretrained, read_config, save_pretrained
from vidgen.models.vae import VideoVAE

log = logging.getLogger(__name__)


class NoClipsError(ValueError):
    """The shards gave no clip of the asked shape."""


@torch.no_grad()
def measure_latent_stats(vae: VideoVAE, batches: Iterable[dict[str, Any] | torch.Tensor], max_clips: int,
                         sample: bool = False, chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std [C] of un-normalised latents over up to `max_clips` clips.

    batches: dicts with "video" [B, 3, T, H, W] in [-1, 1] (or such tensors). Uses the posterior
    mean (or a sample with `sample=True`); sums run in float64 over every latent position.
    """
    device = next(vae.parameters()).device
    c = vae.latent_channels
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    count, clips = 0, 0
    for batch in batches:
        x = batch["video"] if isinstance(batch, dict) else batch
        x = x[: max_clips - clips].to(device, torch.float32)
        posterior = vae.encode(x, chunk_size=chunk_size)
        z = (posterior.sample() if sample else posterior.mode()).double().cpu()
        z = z.transpose(0, 1).reshape(c, -1)  # [C, B*t*h*w]
        total += z.sum(dim=1)
        total_sq += z.pow(2).sum(dim=1)
        count += z.shape[1]
        clips += x.shape[0]
        if clips >= max_clips:
            break
    if clips == 0:
        raise NoClipsError("measure_latent_stats got no clips (empty data?)")
    mean = total / count
    std = (total_sq / count - mean.pow(2)).clamp_min(1e-12).sqrt()
    log.info("latent statistics from %d clips (%d latent positions)", clips, count)
    return mean.float(), std.float()


def clip_batches(shards: str, frames: int, size: int | tuple[int, int], batch_size: int = 1,
                 decoder: str = "decord") -> Iterable[dict[str, Any]]:
    """Deterministic batches (center crops, no shuffling) of one bucket [frames, H, W] from a shard folder."""
    h, w = (size, size) if isinstance(size, int) else size
    dm = ClipDataModule(train_shards=shards, val_shards=shards, buckets=[[frames, h, w]], batch_size=batch_size,
                        num_workers=0, decoder=decoder, log_stats=False, rank=0, world_size=1)
    dm.setup("validate")
    return dm.val_dataloader()


def store_latent_stats(folder: str | Path, batches: Iterable[dict[str, Any]], clips: int,
                       chunk_size: int | None = None, device: str = "cpu") -> VideoVAE:
    """Measure latent mean/std of the VAE export `folder` over `clips` clips and write them into it."""
    meta = read_config(folder, VideoVAE)
    vae = load_pretrained(folder, VideoVAE).to(device).eval()
    mean, std = measure_latent_stats(vae, batches, clips, chunk_size=chunk_size)
    vae.set_latent_stats(mean, std)
    extra = {k: v for k, v in meta.items() if k not in ("class", "config", *vae.export_extra())}
    save_pretrained(vae, folder, extra={**extra, "latent_stats_clips": clips})
    return vae


def _parse(argv: list[str] | None) -> dict[str, str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("args", nargs="+", help="vae=FOLDER shards=FOLDER [key=value ...]")
    raw = p.parse_args(argv).args
    kv = dict(a.split("=", 1) for a in raw if "=" in a)
    allowed = {"vae", "shards", "clips", "frames", "size", "batch_size", "chunk", "device", "decoder"}
    unknown = sorted(set(kv) - allowed) + [a for a in raw if "=" not in a]
    if unknown or not {"vae", "shards"} <= set(kv):
        p.error(f"unknown setting(s) {unknown}; expected vae=FOLDER shards=FOLDER and optionally "
                f"{sorted(allowed - {'vae', 'shards'})}")
    return kv


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (see the module docstring)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    kv = _parse(argv)
    size = kv.get("size", "256")
    hw = tuple(int(v) for v in size.lower().split("x")) if "x" in size.lower() else int(size)
    chunk = int(kv["chunk"]) if kv.get("chunk") not in (None, "", "null", "none") else None
    clips = int(kv.get("clips", 64))
    batches = clip_batches(kv["shards"], int(kv.get("frames", 17)), hw, int(kv.get("batch_size", 1)),
                           kv.get("decoder", "decord"))
    try:
        store_latent_stats(kv["vae"], batches, clips, chunk_size=chunk, device=kv.get("device", "cpu"))
    except NoClipsError:
        raise DataConfigError(f"shards={kv['shards']}: no clip fits frames={kv.get('frames', 17)} size={size}; "
                              f"pass a smaller size= or frames=") from None
    print(f"stored latent mean/std over up to {clips} clips in {kv['vae']}")
    return 0


if __name__ == "__main__":
    sys.exit(one_line_errors(main)())
