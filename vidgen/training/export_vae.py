"""Export a trained VAE checkpoint to a self-describing folder, with measured latent statistics.

    python -m vidgen.training.export_vae ckpt=runs/x/checkpoints/last.ckpt out=exports/vae \
        [stats_clips=64 shards=data/clip_shards frames=17 size=256 batch_size=1 chunk=4 ema=true device=cpu]
    python -m vidgen.training.export_vae CKPT OUT            # positional form, no statistics

The folder (`config.json` + `model.safetensors`) loads with `VideoVAE.from_pretrained(folder)`
alone. EMA weights are exported when the checkpoint has them. With `stats_clips > 0` the
per-channel mean / std of the latents over that many clips are stored, so that
`encode(x, normalize=True)` gives roughly unit-variance latents for the DiT (the role of SD's
0.18215 and Wan's `latents_mean/std`, measured instead of hard-coded).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Iterable

import torch

from vidgen.models.vae import VideoVAE

log = logging.getLogger(__name__)


def vae_state_from_checkpoint(ckpt: dict[str, Any], use_ema: bool = True) -> tuple[dict[str, torch.Tensor], bool]:
    """VAE weights from a `VAEModule` checkpoint (EMA overlaid when present and asked) -> (state dict, used_ema)."""
    state = {k[len("vae."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("vae.")}
    ema = None
    if use_ema:
        from vidgen.training.callbacks import ema_state_from_checkpoint

        ema = ema_state_from_checkpoint(ckpt) or ckpt.get("ema_state_dict")
    if ema:
        # EMA shadows cover trainable parameters only; buffers (latent stats) come from the live weights.
        hits = {k[len("vae."):]: v for k, v in ema.items() if k.startswith("vae.")}
        state.update({k: v.to(state[k].dtype) for k, v in hits.items() if k in state})
        return state, bool(hits)
    return state, False


def load_vae_from_checkpoint(ckpt_path: str | Path, use_ema: bool = True) -> VideoVAE:
    """Rebuild the `VideoVAE` stored in a Lightning checkpoint (safe load, weights_only=True)."""
    from vidgen.training.checkpoint import load_checkpoint

    ckpt = load_checkpoint(ckpt_path)
    task = ckpt.get("vidgen", {}).get("task")
    if "vae_config" not in ckpt or (task is not None and task != "vae"):
        raise ValueError(f"ckpt={ckpt_path}: not a VAE checkpoint (task={task!r}, no 'vae_config'); "
                         "expected one written by vidgen.training.vae_module.VAEModule")
    vae = VideoVAE(**ckpt["vae_config"])
    state, used_ema = vae_state_from_checkpoint(ckpt, use_ema)
    vae.load_state_dict(state, strict=True)
    log.info("loaded %s weights from %s (step %s)", "EMA" if used_ema else "raw", ckpt_path, ckpt.get("global_step"))
    vae.exported_from = {"checkpoint": str(ckpt_path), "global_step": ckpt.get("global_step"), "ema": used_ema}
    return vae.eval()


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
        raise ValueError("measure_latent_stats got no clips (empty data?)")
    mean = total / count
    std = (total_sq / count - mean.pow(2)).clamp_min(1e-12).sqrt()
    log.info("latent statistics from %d clips (%d latent positions)", clips, count)
    return mean.float(), std.float()


def clip_batches(shards: str, frames: int, size: int | tuple[int, int], batch_size: int = 1,
                 decoder: str = "decord") -> Iterable[dict[str, Any]]:
    """Deterministic batches (center crops, no shuffling) of one bucket [frames, H, W] from a shard folder."""
    from vidgen.data import ClipDataModule

    h, w = (size, size) if isinstance(size, int) else size
    dm = ClipDataModule(train_shards=shards, val_shards=shards, buckets=[[frames, h, w]], batch_size=batch_size,
                        num_workers=0, decoder=decoder, log_stats=False, rank=0, world_size=1)
    dm.setup("validate")
    return dm.val_dataloader()


def export_vae(ckpt_path: str | Path, out_dir: str | Path, use_ema: bool = True,
               batches: Iterable[dict[str, Any]] | None = None, stats_clips: int = 0,
               chunk_size: int | None = None, device: str = "cpu") -> VideoVAE:
    """Checkpoint -> export folder (`VideoVAE.from_pretrained(out_dir)`); with `batches` and
    `stats_clips > 0`, measures and stores the latent statistics first. Returns the VAE."""
    vae = load_vae_from_checkpoint(ckpt_path, use_ema).to(device)
    extra: dict[str, Any] = {"exported_from": vae.exported_from}
    if stats_clips > 0:
        if batches is None:
            raise ValueError("stats_clips > 0 needs data: pass shards=FOLDER (or batches=...)")
        mean, std = measure_latent_stats(vae, batches, stats_clips, chunk_size=chunk_size)
        vae.set_latent_stats(mean, std)
        extra["latent_stats_clips"] = stats_clips
    vae.save_pretrained(out_dir, extra=extra)
    return vae


def _parse(argv: list[str] | None) -> dict[str, str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("args", nargs="+", help="ckpt=PATH out=FOLDER [key=value ...] or CKPT OUT")
    raw = p.parse_args(argv).args
    positional = [a for a in raw if "=" not in a]
    kv = dict(a.split("=", 1) for a in raw if "=" in a)
    for key, value in zip(("ckpt", "out"), positional):
        kv.setdefault(key, value)
    allowed = {"ckpt", "out", "stats_clips", "shards", "frames", "size", "batch_size", "chunk", "ema", "device",
               "decoder"}
    unknown = sorted(set(kv) - allowed)
    if unknown or not {"ckpt", "out"} <= set(kv) or len(positional) > 2:
        p.error(f"unknown setting(s) {unknown}; expected ckpt=PATH out=FOLDER and optionally "
                f"{sorted(allowed - {'ckpt', 'out'})}")
    return kv


def main(argv: list[str] | None = None) -> None:
    """CLI entry point (see the module docstring)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    kv = _parse(argv)
    stats_clips = int(kv.get("stats_clips", 0))
    batches = None
    if stats_clips > 0:
        if "shards" not in kv:
            raise SystemExit("export_vae: stats_clips > 0 needs shards=FOLDER (clip shards to measure on)")
        size = kv.get("size", "256")
        hw = tuple(int(v) for v in size.lower().split("x")) if "x" in size.lower() else int(size)
        batches = clip_batches(kv["shards"], int(kv.get("frames", 17)), hw, int(kv.get("batch_size", 1)),
                               kv.get("decoder", "decord"))
    chunk = int(kv["chunk"]) if kv.get("chunk") not in (None, "", "null", "none") else None
    try:
        vae = export_vae(kv["ckpt"], kv["out"], use_ema=kv.get("ema", "true").lower() in ("1", "true", "yes"),
                         batches=batches, stats_clips=stats_clips, chunk_size=chunk, device=kv.get("device", "cpu"))
    except (FileNotFoundError, ValueError) as e:
        hint = (f" (shards={kv.get('shards')}: no clip fits frames={kv.get('frames', 17)} size={kv.get('size', 256)};"
                " pass a smaller size= or frames=)" if "no clips" in str(e) else "")
        raise SystemExit(f"export_vae: error: {e}{hint}") from None
    stats = f"latent mean/std over {stats_clips} clips" if stats_clips else "no latent statistics (stats_clips=0)"
    print(f"exported {kv['out']}: {sum(p.numel() for p in vae.parameters()):,} parameters, "
          f"{'EMA' if vae.exported_from['ema'] else 'raw'} weights, {stats}")


if __name__ == "__main__":
    main()
