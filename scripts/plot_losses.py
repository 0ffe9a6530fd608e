"""Plot loss curves from Lightning's CSV log: `python scripts/plot_losses.py RUN [RUN ...] out.png [--labels a,b]`.

Each RUN is a `metrics.csv` or a run folder (its `metrics.csv`, `csv/metrics.csv`, or the newest `metrics.csv`
below it). One run: train loss (raw + moving average) and every `val/*loss*` column against the optimizer
step. Several runs: overlaid in the same two panels, one colour per run (train: moving average over a faint
raw curve; val: one line style per column), with a legend naming run and column.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """CSV rows -> {metric: [(step, value), ...]} for every loss column."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            for key, value in row.items():
                if "loss" in key and value not in (None, "") and step not in (None, ""):
                    series[key].append((int(float(step)), float(value)))
    return series


def moving_average(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def find_csv(path: Path) -> Path | None:
    """A metrics.csv, or the one of a run folder (`metrics.csv`, `csv/metrics.csv`, else the newest below it)."""
    if path.is_file():
        return path
    if not path.is_dir():
        return None
    for candidate in (path / "metrics.csv", path / "csv" / "metrics.csv"):
        if candidate.is_file():
            return candidate
    found = sorted(path.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def run_label(given: Path, csv_path: Path) -> str:
    """The run's name: the folder given, or the folder holding the csv (above `csv/` or `version_N/`)."""
    if given.is_dir():
        return given.resolve().name
    folder = csv_path.resolve().parent
    while folder.name in ("csv", "logs") or folder.name.startswith("version_"):
        folder = folder.parent
    return folder.name or csv_path.stem


def unique(labels: list[str]) -> list[str]:
    out: list[str] = []
    for label in labels:
        k, name = 1, label
        while name in out:
            k += 1
            name = f"{label} ({k})"
        out.append(name)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", type=Path, nargs="+", help="metrics.csv files or run folders")
    p.add_argument("out_png", type=Path)
    p.add_argument("--labels", default=None, help="comma-separated legend names, one per run")
    p.add_argument("--window", type=int, default=20, help="moving-average window (logged points)")
    args = p.parse_args(argv)
    csvs = [find_csv(r) for r in args.runs]
    for run, found in zip(args.runs, csvs):
        if found is None:
            print(f"plot_losses: error: {run}: no metrics.csv found (run with logger=csv)", file=sys.stderr)
            return 2
    labels = args.labels.split(",") if args.labels else [run_label(r, c) for r, c in zip(args.runs, csvs)]
    if len(labels) != len(csvs):
        print(f"plot_losses: error: --labels has {len(labels)} names for {len(csvs)} runs", file=sys.stderr)
        return 2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(label, read_metrics(c)) for label, c in zip(unique(labels), csvs)]  # type: ignore[arg-type]
    overlay = len(runs) > 1
    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(11, 4) if not overlay else (13, 5))
    styles = ["-", "--", ":", "-."]
    for r, (label, series) in enumerate(runs):
        color = f"C{r % 10}" if overlay else None
        prefix = f"{label}: " if overlay else ""
        val_keys = sorted(k for k in series if k.startswith("val/"))
        for key, points in sorted(series.items()):
            steps, values = zip(*points)
            if key.startswith("train/"):
                ax_t.plot(steps, values, alpha=0.15 if overlay else 0.3, color=color,
                          label=None if overlay else key)
                ax_t.plot(steps, moving_average(list(values), args.window), color=color,
                          label=f"{prefix}{key} (avg {args.window})")
            elif key.startswith("val/"):
                ax_v.plot(steps, values, marker="o", ms=3, lw=2 if key == "val/loss" else 1, color=color,
                          ls=styles[val_keys.index(key) % len(styles)] if overlay else "-", label=f"{prefix}{key}")
    for ax, title in ((ax_t, "training loss"), (ax_v, "validation loss (fixed t, fixed noise)")):
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    args.out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out_png, dpi=110)
    print(f"loss curves of {len(runs)} run(s) -> {args.out_png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
