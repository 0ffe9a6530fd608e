"""VAE reconstruction evaluation on held-out clips: PSNR, SSIM (+ LPIPS with local weights), a report and a strip.

    python -m vidgen.eval.vae vae=exports/vae shards=data/heldout_shards \
        [lpips_weights=PATH clips=64 frames=17 size=256 batch_size=1 chunk=4 tile=256 out=FOLDER device=cpu]

Settings and their defaults: configs/eval_vae.yaml (`key=value` overrides, unknown keys are an error).

Writes `out/report.md` (metrics table + settings) and `out/strip.png` (top row: original frames,
bottom row: reconstructions, of the first clip). `out` defaults to `VAE_FOLDER/eval`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from einops import rearrange

from vidgen.data.latent_stats import clip_batches
from vidgen.eval.metrics import load_lpips, psnr, ssim
from vidgen.io.atomic import atomic_write_text
from vidgen.io.pretrained import load_pretrained
from vidgen.io.video import to_uint8_video
from vidgen.models.vae import VideoVAE


def recon_strip(x: torch.Tensor, recon: torch.Tensor, max_frames: int = 8) -> np.ndarray:
    """Originals over reconstructions: x, recon [3, T, H, W] -> uint8 image [2H, n*W, 3], n <= max_frames evenly spaced."""
    t = x.shape[1]
    idx = np.unique(np.linspace(0, t - 1, min(t, max_frames)).round().astype(int))
    pair = torch.stack([x[:, idx], recon[:, idx]])  # [2, 3, n, H, W]
    pair = rearrange(pair, "row c n h w -> c 1 (row h) (n w)")
    return to_uint8_video(pair)[0]


@torch.no_grad()
def evaluate_vae(vae: VideoVAE, batches: Iterable[dict[str, Any] | torch.Tensor], max_clips: int | None = None,
                 lpips: torch.nn.Module | None = None, chunk_size: int | None = None, tile_size: int | None = None,
                 ) -> dict[str, Any]:
    """Reconstruct up to `max_clips` clips with the posterior mean; per-clip metrics averaged over clips.

    batches: dicts with "video" [B, 3, T, H, W] in [-1, 1] (or such tensors).
    Returns {"psnr", "ssim", ["lpips"], "clips", "frames", "seconds", "strip": uint8 [2H, n*W, 3] | None}.
    """
    device = next(vae.parameters()).device
    scores: dict[str, list[float]] = {"psnr": [], "ssim": []}
    if lpips is not None:
        lpips = lpips.to(device)
        scores["lpips"] = []
    strip, frames, start = None, 0, time.perf_counter()
    for batch in batches:
        x = batch["video"] if isinstance(batch, dict) else batch
        if max_clips is not None:
            x = x[: max_clips - len(scores["psnr"])]
        x = x.to(device, torch.float32)
        z = vae.encode(x, chunk_size=chunk_size, tile_size=tile_size).mode()
        recon = vae.decode(z, chunk_size=chunk_size, tile_size=tile_size).float()  # clamped to [-1, 1]
        scores["psnr"] += psnr(recon, x).tolist()
        scores["ssim"] += ssim(recon, x).tolist()
        if lpips is not None:
            scores["lpips"] += lpips(recon, x).tolist()
        if strip is None:
            strip = recon_strip(x[0], recon[0])
        frames += x.shape[0] * x.shape[2]
        if max_clips is not None and len(scores["psnr"]) >= max_clips:
            break
    if not scores["psnr"]:
        raise ValueError("evaluate_vae got no clips (empty data or no clip fits the bucket)")
    out: dict[str, Any] = {k: float(np.mean(v)) for k, v in scores.items()}
    out.update(clips=len(scores["psnr"]), frames=frames, seconds=time.perf_counter() - start, strip=strip)
    return out


def write_report(out_dir: str | Path, results: dict[str, Any], settings: dict[str, Any]) -> Path:
    """Write `report.md` (+ `strip.png`, `metrics.json`) into `out_dir`; returns the report path."""
    from PIL import Image


    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = {k: v for k, v in results.items() if k != "strip"}
    if results.get("strip") is not None:
        Image.fromarray(results["strip"]).save(out_dir / "strip.png")
    rows = [("PSNR (dB, higher is better)", f"{metrics['psnr']:.2f}"), ("SSIM (higher is better)", f"{metrics['ssim']:.4f}")]
    if "lpips" in metrics:
        rows.append(("LPIPS (VGG, lower is better)", f"{metrics['lpips']:.4f}"))
    lines = ["# VAE reconstruction report", "", "| metric | value |", "|---|---|", *[f"| {a} | {b} |" for a, b in rows],
             "", f"{metrics['clips']} clips, {metrics['frames']} frames, {metrics['seconds']:.1f} s "
             f"({metrics['frames'] / max(metrics['seconds'], 1e-9):.1f} frames/s encode+decode).", "",
             "Posterior mean latents, reconstructions clamped to [-1, 1]; PSNR over [-1, 1] (range 2), SSIM per "
             "frame (11x11 Gaussian, sigma 1.5), averaged per clip then over clips.", "",
             "## Settings", "", *[f"- {k}: `{v}`" for k, v in settings.items()], "",
             "![original (top) vs reconstruction (bottom)](strip.png)", ""]
    atomic_write_text(out_dir / "metrics.json", json.dumps({**metrics, "settings": settings}, indent=2, default=str))
    atomic_write_text(out_dir / "report.md", "\n".join(lines))
    return out_dir / "report.md"


CONFIG = Path(__file__).resolve().parents[2] / "configs" / "eval_vae.yaml"


def load_settings(overrides: list[str]) -> dict[str, Any]:
    """configs/eval_vae.yaml merged with `key=value` overrides; unknown or missing keys are one clear error."""
    from omegaconf import OmegaConf

    base = OmegaConf.load(CONFIG)
    bad = [o for o in overrides if "=" not in o]
    unknown = sorted({o.split("=", 1)[0] for o in overrides if "=" in o} - set(base.keys()))
    if bad or unknown:
        raise SystemExit(f"eval_vae: unknown setting(s) {unknown or bad}; expected key=value with keys "
                         f"{sorted(base.keys())} (see {CONFIG})")
    cfg = OmegaConf.merge(base, OmegaConf.from_dotlist(overrides))
    missing = sorted(k for k in cfg if OmegaConf.is_missing(cfg, k))
    if missing:
        raise SystemExit(f"eval_vae: missing required setting(s) {', '.join(f'{k}=...' for k in missing)} (see {CONFIG})")
    return OmegaConf.to_container(cfg)  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI entry point (see the module docstring); returns the metrics."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="key=value settings of configs/eval_vae.yaml")
    cfg = load_settings(p.parse_args(argv).overrides)

    device = cfg["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    vae = load_pretrained(cfg["vae"], VideoVAE).to(device).eval()
    size = str(cfg["size"]).lower()
    hw = tuple(int(v) for v in size.split("x")) if "x" in size else int(size)
    batches = clip_batches(str(cfg["shards"]), int(cfg["frames"]), hw, int(cfg["batch_size"]), cfg["decoder"])
    lpips = None
    if cfg["lpips_weights"]:

        lpips = load_lpips(cfg["lpips_weights"])
    results = evaluate_vae(vae, batches, max_clips=int(cfg["clips"]), lpips=lpips, chunk_size=cfg["chunk"],
                           tile_size=cfg["tile"])
    settings = {**cfg, "device": device, "lpips_weights": cfg["lpips_weights"] or "off (no weights given)"}
    report = write_report(cfg["out"] or Path(cfg["vae"]) / "eval", results, settings)
    summary = {k: v for k, v in results.items() if k != "strip"}
    print(f"{report}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    return summary


if __name__ == "__main__":
    main()
