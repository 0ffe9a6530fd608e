"""metrics.json -> `report.md` and a self-contained `report.html` (images inlined as base64 PNG) in the eval folder.

The HTML holds: the settings, the metric table (best value per column in bold), a bar chart per metric,
and per prompt a checkpoint x seed grid of thumbnails (first, middle and last frame of each video, the same
seeds side by side) with each video's metrics; each prompt's full contact sheets fold out below its grid.
Everything is read back from `metrics.json` and the files it names, so a report can be rebuilt from a folder.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from vidgen.io.atomic import atomic_write_bytes, atomic_write_text
from vidgen.io.video import read_video

# key, title, better ("lower" | "higher" | None), unit
METRICS = (
    ("fvd", "FVD", "lower", ""),
    ("clip_score", "CLIP score", "higher", "0-100"),
    ("flicker", "flicker", "lower", "8-bit levels"),
    ("motion", "motion", None, "8-bit levels"),
    ("diversity", "diversity", "higher", "8-bit levels"),
    ("caption_match", "caption match", "higher", "fraction"),
    ("caption_margin", "caption margin", "higher", "8-bit levels"),
)
DEFINITIONS = {
    "fvd": "Fréchet distance between Gaussians fitted (float64 mean, unbiased covariance) to I3D logits (400-d, "
           "before softmax) of the generated videos and of real clips; first fvd_frames (16) frames, each resized to "
           "224x224 (bilinear), values in [-1, 1]; I3D = i3d_torchscript.pt called with rescale=False, resize=False, "
           "return_features=True. Noisy and biased below ~hundreds of videos: compare at equal counts.",
    "clip_score": "max(mean over frames of 100 * cos(CLIP image embedding of the frame, CLIP text embedding of the "
                  "prompt), 0) per video (torchmetrics' clip_score with the frames as the batch); mean over videos.",
    "flicker": "mean |frame[t+1] - frame[t]| over t, pixels and channels, in 8-bit levels (0-255) on the saved uint8 "
               "frames; mean over videos. Includes real motion: read next to motion.",
    "motion": "mean |frame[t+k] - frame[t]| over t, pixels and channels, k = min(motion_stride, T-1), in 8-bit levels; "
              "mean over videos. 0 for a still video; above flicker for smooth motion.",
    "diversity": "per prompt, mean over pairs of seeds of mean |video_i - video_j| (8-bit levels); mean over prompts. "
                 "0 when every seed gives the same video.",
    "caption_match": "with real_shards: the share of videos whose nearest caption is their own prompt; a video's "
                     "distance to a caption = the smallest scene distance to that caption's real clips (centre crops "
                     "at the sample size), scene distance = mean |a - b| of 4x4-pixel block means over the frames, in "
                     "8-bit levels (layout and colour, not texture). Prompts that are no real caption are left out.",
    "caption_margin": "distance to the nearest other caption's clips minus distance to the own caption's clips, mean "
                      "over videos (8-bit levels); > 0: videos sit closer to their own caption's clips.",
}
ARROWS = {"lower": "↓", "higher": "↑"}
THUMB_HEIGHT = 112
SHEET_WIDTH = 900


def png_data_uri(image: Image.Image | np.ndarray) -> str:
    """A PIL image or uint8 array [H, W, 3] -> "data:image/png;base64,..."."""
    img = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def thumbnail(mp4: Path, height: int = THUMB_HEIGHT) -> Image.Image:
    """First, middle and last frame of a video side by side, each scaled to `height` px (never enlarged 4x+)."""
    frames, _ = read_video(mp4)
    idx = sorted({0, len(frames) // 2, len(frames) - 1})
    strip = np.concatenate([np.pad(frames[i], ((0, 0), (0, 2), (0, 0)), constant_values=255) for i in idx], axis=1)
    img = Image.fromarray(strip[:, :-2])
    scale = min(height / img.height, 4.0)
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                      Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BOX)


def fit_width(path: Path, width: int = SHEET_WIDTH) -> Image.Image:
    """An image file, scaled down to at most `width` px wide."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        if img.width <= width:
            return img.copy()
        return img.resize((width, max(1, round(img.height * width / img.width))), Image.Resampling.BOX)


def fmt(v: float | None, key: str = "") -> str:
    """A metric value for the tables: 4 significant digits (no exponent up to 9999), "–" when missing."""
    if v is None:
        return "–"
    return f"{v:.0f}" if abs(v) >= 1e4 else f"{v:.4g}"


def shown_metrics(results: dict[str, Any]) -> list[tuple[str, str, str | None, str]]:
    """The METRICS some checkpoint has a value for."""
    return [m for m in METRICS if any(c["aggregate"].get(m[0]) is not None for c in results["checkpoints"])]


def best_indices(results: dict[str, Any], key: str, better: str | None) -> set[int]:
    """The checkpoints with the best value of `key` (all of them on a tie; none for a metric without a direction)."""
    values = [c["aggregate"].get(key) for c in results["checkpoints"]]
    valid = [v for v in values if v is not None]
    if better is None or len(valid) < 2:
        return set()
    best = min(valid) if better == "lower" else max(valid)
    winners = {i for i, v in enumerate(values) if v is not None and abs(v - best) <= 1e-9 * max(1.0, abs(best))}
    return winners if len(winners) < len(valid) else set()  # all equal: nobody is best


def bar_chart(results: dict[str, Any]) -> Image.Image | None:
    """One bar subplot per shown metric, one bar per checkpoint."""
    metrics = shown_metrics(results)
    if not metrics:
        return None
    labels = [c["label"] for c in results["checkpoints"]]
    fig = Figure(figsize=(2.6 * len(metrics), 2.8), dpi=100)
    FigureCanvasAgg(fig)
    colors = [f"C{i % 10}" for i in range(len(labels))]
    for n, (key, title, better, unit) in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), n + 1)
        values = [c["aggregate"].get(key) for c in results["checkpoints"]]
        ax.bar(range(len(labels)), [v if v is not None else 0 for v in values], color=colors)
        for i, v in enumerate(values):
            ax.annotate(fmt(v, key), (i, v or 0), ha="center", va="bottom", fontsize=7)
        arrow = {"lower": " (lower better)", "higher": " (higher better)"}.get(better or "", "")
        ax.set_title(title + arrow, fontsize=9)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.margins(y=0.18)
        ax.grid(axis="y", alpha=0.3)
        if unit:
            ax.set_ylabel(unit, fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def fvd_notes(results: dict[str, Any]) -> list[str]:
    """One line per checkpoint with an FVD: how many generated videos and real clips it compares."""
    frames = results["settings"].get("fvd_frames")
    return [f"FVD of {c['label']}: {a['fvd_videos']} generated videos vs {a['fvd_real_clips']} real clips at "
            f"{'x'.join(map(str, c['size']))}, first {min(frames or c['size'][0], c['size'][0])} frames."
            for c in results["checkpoints"] if (a := c["aggregate"]).get("fvd") is not None]


def _video_caption(v: dict[str, Any]) -> str:
    parts = [f"{name} {fmt(v.get(key), key)}" for key, name in (("clip_score", "clip"), ("flicker", "flicker"),
                                                                 ("motion", "motion")) if v.get(key) is not None]
    if v.get("caption_match") is not None:
        parts.append("own caption nearest ✓" if v["caption_match"] else "other caption nearest ✗")
    return " · ".join(parts)


def caption_columns(results: dict[str, Any]) -> list[str]:
    """The real-clip captions some video was measured against, in first-seen order."""
    cols: list[str] = []
    for c in results["checkpoints"]:
        for pr in c["prompts"]:
            for v in pr["videos"]:
                cols += [k for k in v.get("caption_distances") or {} if k not in cols]
    return cols


def _short(text: str, n: int = 48) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def caption_rows(results: dict[str, Any]) -> list[tuple[str, str, int, list[float | None], int | None, int]]:
    """(checkpoint, prompt, seed, distance per caption column, own column or None, nearest column) per video."""
    cols, rows = caption_columns(results), []
    for c in results["checkpoints"]:
        for pr in c["prompts"]:
            for v in pr["videos"]:
                d = v.get("caption_distances")
                if not d:
                    continue
                values = [d.get(k) for k in cols]
                own = cols.index(pr["prompt"].strip()) if pr["prompt"].strip() in cols else None
                rows.append((c["label"], pr["prompt"], v["seed"], values, own, cols.index(v["nearest_caption"])))
    return rows


def write_markdown(out_dir: Path, results: dict[str, Any], plot_name: str | None) -> Path:
    """report.md: settings, metric table, definitions, per-prompt per-video metrics with file links."""
    metrics = shown_metrics(results)
    lines = ["# Checkpoint evaluation", ""]
    lines += [f"- **{k} skipped**: {why}" for k, why in results.get("skipped", {}).items()] + [""]
    head = ["checkpoint", "step", "videos"] + [f"{t} {ARROWS.get(b or '', '')}".strip() for _, t, b, _ in metrics]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    best = {k: best_indices(results, k, b) for k, _, b, _ in metrics}
    for i, c in enumerate(results["checkpoints"]):
        cells = [f"**{fmt(c['aggregate'].get(k), k)}**" if i in best[k] else fmt(c["aggregate"].get(k), k)
                 for k, _, _, _ in metrics]
        lines.append(f"| {c['label']} | {c.get('global_step')} | {c['aggregate']['videos']} | {' | '.join(cells)} |")
    lines += ["", *[f"- {n}" for n in fvd_notes(results)], ""]
    lines += [f"![metrics]({plot_name})", ""] if plot_name else []
    for p, prompt in enumerate(results["checkpoints"][0]["prompts"] if results["checkpoints"] else []):
        lines += [f"## {prompt['prompt']}", "", "| checkpoint | seed | clip | flicker | motion | diversity | files |",
                  "|---|---|---|---|---|---|---|"]
        for c in results["checkpoints"]:
            pr = c["prompts"][p]
            for v in pr["videos"]:
                lines.append(f"| {c['label']} | {v['seed']} | {fmt(v.get('clip_score'))} | {fmt(v['flicker'])} | "
                             f"{fmt(v['motion'])} | {fmt(pr.get('diversity'))} | [mp4]({quote(v['mp4'])}) "
                             f"[sheet]({quote(v['png'])}) |")
        lines.append("")
    cols = caption_columns(results)
    if cols:
        lines += ["## Distance to each caption's real clips (8-bit levels; own caption in italics, nearest in bold)",
                  "", "| checkpoint | prompt | seed | " + " | ".join(_short(k) for k in cols) + " |",
                  "|" + "---|" * (3 + len(cols))]
        for label, prompt, seed, values, own, nearest in caption_rows(results):
            cells = []
            for i, v in enumerate(values):
                cell = fmt(v)
                cell = f"**{cell}**" if i == nearest else cell
                cells.append(f"_{cell}_" if i == own else cell)
            lines.append(f"| {label} | {_short(prompt)} | {seed} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Definitions", ""] + [f"- **{k}**: {DEFINITIONS[k]}" for k, *_ in METRICS] + [""]
    lines += ["## Settings", ""] + [f"- {k}: `{v}`" for k, v in results["settings"].items()] + [""]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1600px}
h1{font-size:22px;margin:0 0 8px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0} td,th{border:1px solid #ddd;padding:4px 8px;vertical-align:top}
th{background:#f4f4f4;font-weight:600} td.num{text-align:right;font-variant-numeric:tabular-nums}
.grid td{text-align:center;font-size:12px} .grid img{display:block;margin:0 auto 4px;image-rendering:pixelated}
.muted{color:#777;font-size:12px} .skip{color:#a15c00} code{background:#f4f4f4;padding:0 3px}
dl.defs dt{font-weight:600;margin-top:6px} dl.defs dd{margin:0 0 0 16px;font-size:13px}
details{margin:6px 0 14px} summary{cursor:pointer;color:#0b57d0;font-size:13px}
img.chart{max-width:100%;height:auto}
.sheet{display:inline-block;margin:6px 12px 6px 0;font-size:12px} .sheet img{display:block;max-width:100%}
"""


def _metric_table_html(results: dict[str, Any]) -> list[str]:
    """The checkpoints x metrics table (best per column in bold) and the FVD counts."""
    e, metrics = html.escape, shown_metrics(results)
    out = ["<table><tr><th>checkpoint</th><th>step</th><th>frames×H×W</th><th>videos</th>"]
    out += [f"<th>{e(title)} {ARROWS.get(better or '', '')}</th>" for _, title, better, _ in metrics]
    out.append("</tr>")
    best = {k: best_indices(results, k, b) for k, _, b, _ in metrics}
    for i, c in enumerate(results["checkpoints"]):
        out.append(f"<tr><td><b>{e(c['label'])}</b><br><span class='muted'>{e(c['path'])}</span></td>"
                   f"<td class='num'>{e(str(c.get('global_step')))}</td><td>{'×'.join(map(str, c['size']))}</td>"
                   f"<td class='num'>{c['aggregate']['videos']}</td>")
        for k, *_ in metrics:
            v = fmt(c["aggregate"].get(k), k)
            out.append(f"<td class='num'>{'<b>' + v + '</b>' if i in best[k] else v}</td>")
        out.append("</tr>")
    out.append("</table>")
    return out + [f"<p class='muted'>{e(line)}</p>" for line in fvd_notes(results)]


def _prompt_grid_html(out_dir: Path, results: dict[str, Any], p: int, embed_sheets: bool) -> list[str]:
    """Prompt `p`: checkpoints (rows) x seeds (columns) of thumbnails + metrics, then its contact sheets."""
    e, ckpts = html.escape, results["checkpoints"]
    prompt = ckpts[0]["prompts"][p]
    out = [f"<h2>“{e(prompt['prompt'])}” <span class='muted'>({e(prompt['name'])})</span></h2>",
           "<table class='grid'><tr><th>checkpoint</th>", *[f"<th>seed {v['seed']}</th>" for v in prompt["videos"]],
           "<th>diversity</th></tr>"]
    for c in ckpts:
        pr = c["prompts"][p]
        out.append(f"<tr><th>{e(c['label'])}</th>")
        for v in pr["videos"]:
            mp4, png = e(quote(v["mp4"])), e(quote(v["png"]))
            out.append(f"<td><img src='{png_data_uri(thumbnail(out_dir / v['mp4']))}' alt='{e(c['label'])} seed "
                       f"{v['seed']}'>{e(_video_caption(v))}<br><a href='{mp4}'>mp4</a> · "
                       f"<a href='{png}'>sheet</a></td>")
        out.append(f"<td class='num'>{fmt(pr.get('diversity'))}</td></tr>")
    out.append("</table><p class='muted'>Thumbnails: first, middle and last frame.</p>")
    if embed_sheets:
        out.append("<details><summary>contact sheets</summary>")
        out += [f"<div class='sheet'>{e(c['label'])} · seed {v['seed']}"
                f"<img src='{png_data_uri(fit_width(out_dir / v['png']))}'></div>"
                for c in ckpts for v in c["prompts"][p]["videos"]]
        out.append("</details>")
    return out


def _caption_table_html(results: dict[str, Any]) -> list[str]:
    """Every video's distance to every caption's real clips: own caption shaded, nearest in bold."""
    e, cols = html.escape, caption_columns(results)
    if not cols:
        return []
    out = ["<h2>Distance to each caption's real clips</h2>",
           "<p class='muted'>Scene distance in 8-bit levels (definition below); the video's own caption is shaded, "
           "the nearest is bold. A video recognisably shows its prompt's scene when its own column is the bold one."
           "</p><table><tr><th>checkpoint</th><th>prompt</th><th>seed</th>"]
    out += [f"<th title='{e(k)}'>{e(_short(k, 32))}</th>" for k in cols] + ["</tr>"]
    for label, prompt, seed, values, own, nearest in caption_rows(results):
        out.append(f"<tr><td>{e(label)}</td><td title='{e(prompt)}'>{e(_short(prompt, 40))}</td><td>{seed}</td>")
        for i, v in enumerate(values):
            style = " style='background:#e6f4ea'" if i == own else ""
            cell = fmt(v)
            out.append(f"<td class='num'{style}>{'<b>' + cell + '</b>' if i == nearest else cell}</td>")
        out.append("</tr>")
    return out + ["</table>"]


def write_html(out_dir: Path, results: dict[str, Any], chart: Image.Image | None, embed_sheets: bool = True) -> Path:
    """report.html, self-contained: every image is an inline base64 PNG; links to the mp4 files are relative."""
    e, s, ckpts = html.escape, results["settings"], results["checkpoints"]
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>vidgen checkpoint evaluation</title>",
           f"<style>{CSS}</style></head><body>", "<h1>Checkpoint evaluation</h1>",
           f"<p class='muted'>{len(ckpts)} checkpoint(s) × {s.get('prompts')} prompt(s) × seeds "
           f"{e(str(s.get('seeds')))}; {e(str(s.get('steps')))} {e(str(s.get('sampler')))} steps, guidance "
           f"{e(str(s.get('guidance')))}; written {e(str(s.get('date', '')))}</p>"]
    out += [f"<p class='skip'><b>{e(key)} skipped</b>: {e(why)}</p>" for key, why in results.get("skipped", {}).items()]
    out += ["<h2>Metrics</h2>", *_metric_table_html(results)]
    if chart is not None:
        out.append(f"<img class='chart' alt='metrics per checkpoint' src='{png_data_uri(chart)}'>")
    for p in range(len(ckpts[0]["prompts"]) if ckpts else 0):
        out += _prompt_grid_html(out_dir, results, p, embed_sheets)
    out += _caption_table_html(results)
    out.append("<h2>Definitions</h2><dl class='defs'>")
    out += [f"<dt>{e(t)}</dt><dd>{e(DEFINITIONS[k])}</dd>" for k, t, *_ in METRICS]
    out.append("</dl><h2>Settings</h2><table>")
    out += [f"<tr><th>{e(str(k))}</th><td><code>{e(str(v))}</code></td></tr>" for k, v in s.items()]
    out.append("</table></body></html>")
    path = out_dir / "report.html"
    atomic_write_text(path, "\n".join(out))
    return path


def write_reports(out_dir: str | Path, results: dict[str, Any], embed_sheets: bool = True) -> dict[str, Path]:
    """Write metrics.json, metrics.png (bar chart), report.md and report.html into `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": out_dir / "metrics.json"}
    atomic_write_text(paths["metrics"], json.dumps(results, indent=2, default=str))
    chart = bar_chart(results)
    if chart is not None:
        buf = io.BytesIO()
        chart.save(buf, format="PNG")
        atomic_write_bytes(out_dir / "metrics.png", buf.getvalue())
        paths["plot"] = out_dir / "metrics.png"
    paths["markdown"] = write_markdown(out_dir, results, "metrics.png" if chart is not None else None)
    paths["html"] = write_html(out_dir, results, chart, embed_sheets)
    return paths
