"""Plot the loss curves of a run from Lightning's CSV log: `python scripts/plot_losses.py metrics.csv out.png`.

Train loss (raw + moving average) and every `val/*loss*` column against the optimizer step.
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("metrics_csv", type=Path)
    p.add_argument("out_png", type=Path)
    args = p.parse_args(argv)
    if not args.metrics_csv.is_file():
        print(f"plot_losses: error: {args.metrics_csv} not found (run with logger=csv)", file=sys.stderr)
        return 2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_metrics(args.metrics_csv)
    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(11, 4))
    for key, points in sorted(series.items()):
        steps, values = zip(*points)
        if key.startswith("train/"):
            ax_t.plot(steps, values, alpha=0.3, label=key)
            ax_t.plot(steps, moving_average(list(values), 20), label=f"{key} (avg 20)")
        elif key.startswith("val/"):
            ax_v.plot(steps, values, marker="o", lw=2 if key == "val/loss" else 1, label=key)
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
    print(f"loss curves -> {args.out_png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
