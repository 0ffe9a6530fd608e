"""Preflight a data config: samples per bucket, drops by reason, and the time to the first batch.

    python data_prep/inspect_data.py data=demo
    python data_prep/inspect_data.py data=clips data.train_shards=/data/shards data.target_fps=8

Counting reads only the json members of the shards (fast, no decoding); the first batch is then decoded by
the real loader. Only `cfg.data` of the composed train config is used; nothing is written (no run folder).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import vidgen.config  # noqa: E402,F401  (registers the config resolvers)
from vidgen.data import ClipDataModule, DataConfigError  # noqa: E402
from vidgen.data.buckets import BucketAssigner, batch_sizes_per_bucket  # noqa: E402
from vidgen.data.report import MetadataReport, scan_metadata  # noqa: E402

# An inspection writes nothing: no Hydra run folder, no log file (the user's overrides come after these).
HYDRA_DEFAULTS = ["hydra.output_subdir=null", "hydra.run.dir=.", "hydra/job_logging=stdout",
                  "hydra/hydra_logging=disabled"]

DROP_LABELS = {
    "too_few_frames": "too few frames at the target fps / stride",
    "too_small": "too small for every bucket (max_upscale)",
    "no_bucket": "no bucket of its kind (image / video)",
    "no_caption": "no caption (require_caption)",
    "corrupt": "corrupt (bad json / missing member)",
}


def bucket_table(dm: ClipDataModule, report: MetadataReport, title: str) -> Table:
    """Rich table: one row per bucket with its samples, share and full batches per epoch (one process)."""
    sizes = batch_sizes_per_bucket(dm.batch_size, dm.buckets)
    table = Table(title=title)
    for col in ("bucket (T x H x W)", "samples", "share", "batch size", "full batches"):
        table.add_column(col, justify="left" if col.startswith("bucket") else "right")
    for b in dm.buckets:
        n = report.buckets.get(b, 0)
        table.add_row(b.key, str(n), f"{n / max(1, report.total):.1%}", str(sizes[b]), str(n // sizes[b]))
    table.add_row("[bold]kept[/]", f"[bold]{report.kept}[/]", f"{report.kept / max(1, report.total):.1%}", "", "")
    return table


def drop_table(report: MetadataReport) -> Table:
    """Rich table of dropped samples by reason (plus unreadable shards and kept empty captions)."""
    table = Table(title="dropped")
    table.add_column("reason")
    table.add_column("samples", justify="right")
    for reason, label in DROP_LABELS.items():
        table.add_row(label, str(report.dropped.get(reason, 0)))
    table.add_row("unreadable shards", str(report.tar_errors))
    table.add_row("[dim]empty caption (kept)[/]", f"[dim]{report.empty_captions}[/]")
    return table


def first_batch(dm: ClipDataModule) -> tuple[float, dict]:
    """(seconds, batch) for the first training batch, workers' start-up included."""
    start = time.perf_counter()
    batch = next(iter(dm.train_dataloader()))
    return time.perf_counter() - start, batch


def inspect(data_cfg: DictConfig, console: Console) -> int:
    """Print the bucket / drop tables for the train (and val) shards and time the first batch -> exit code."""
    try:
        dm: ClipDataModule = instantiate(data_cfg)
        dm.setup("fit")
    except DataConfigError as e:
        print(f"inspect_data: error: {e}", file=sys.stderr)  # one plain line (rich would wrap it)
        return 2
    except MissingMandatoryValue as e:  # a `???` setting, e.g. data.train_shards in configs/data/clips.yaml
        print(f"inspect_data: error: {str(e).splitlines()[0]} (set it on the command line)", file=sys.stderr)
        return 2
    hp = dm.hparams
    assigner = BucketAssigner(dm.buckets, target_fps=hp.target_fps, frame_stride=hp.frame_stride,
                              max_upscale=hp.max_upscale)
    sampling = f"target_fps={hp.target_fps}" if hp.target_fps else f"frame_stride={hp.frame_stride}"
    console.print(f"decoder={dm.decoder}  {sampling}  max_upscale={hp.max_upscale}  resampled={hp.resampled}  "
                  f"num_workers={hp.num_workers}")
    for name, shards in (("train", dm.train_set), ("val", dm.val_set)):
        if shards is None:
            continue
        start = time.perf_counter()
        report = scan_metadata(shards.urls, assigner, hp.require_caption)
        title = (f"{name}: {len(shards.urls)} shard(s), {report.total} samples "
                 f"(metadata scan {time.perf_counter() - start:.2f}s)")
        console.print(bucket_table(dm, report, title))
        console.print(drop_table(report))
    seconds, batch = first_batch(dm)
    console.print(f"first train batch: video {tuple(batch['video'].shape)} {batch['video'].dtype} "
                  f"in {seconds:.2f}s (decoder={dm.decoder}, num_workers={hp.num_workers})")
    stats = {k: v for k, v in dm.data_stats().items() if v}
    if stats:
        console.print(f"loader counts so far: {stats}")
    return 0


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> int:
    logging.getLogger("vidgen").setLevel(logging.INFO)
    code = inspect(cfg.data, Console())
    if code:
        sys.exit(code)
    return code


if __name__ == "__main__":
    sys.argv[1:1] = HYDRA_DEFAULTS
    main()
