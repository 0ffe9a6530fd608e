"""Preflight a data config: samples per bucket, drops by reason, a decoded sample, and the time to the first batch.

    python data_prep/inspect_data.py data=demo
    python data_prep/inspect_data.py data=clips data.train_shards=/data/shards data.target_fps=8 [--decode 256]

Counting reads only the json members of the shards (fast, every sample); then `--decode N` samples (default 64,
spread over the shards) are decoded by the loader's own transform, since a damaged mp4 is only found by decoding;
the kept share is estimated from them. Last, the first batch is timed with the real loader (skipped when no
decoded sample survived). Only `cfg.data` of the composed train config is used; nothing is written. It ends with
its tables (and one error line when the data cannot train), never a traceback; exit code 0 when samples survive.
"""

from __future__ import annotations

import argparse
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
from vidgen.data import ClipDataModule  # noqa: E402
from vidgen.data.buckets import BucketAssigner  # noqa: E402
from vidgen.data.report import DecodeReport, MetadataReport, decode_check, scan_metadata  # noqa: E402
from vidgen.data.starvation import StarveContext, clip_fixes, describe_shards, one_line, starved_message  # noqa: E402

# An inspection writes nothing: no Hydra run folder, no log file (the user's overrides come after these).
HYDRA_DEFAULTS = ["hydra.output_subdir=null", "hydra.run.dir=.", "hydra/job_logging=stdout",
                  "hydra/hydra_logging=disabled"]
DEFAULT_DECODE = 64

DROP_LABELS = {
    "too_few_frames": "too few frames at the target fps / stride",
    "too_small": "too small for every bucket (max_upscale)",
    "no_bucket": "no bucket of its kind (image / video)",
    "no_caption": "no caption (require_caption)",
    "corrupt": "corrupt (bad json / missing member / undecodable)",
}


def _share(n: float, total: int) -> str:
    return f"{n / max(1, total):.1%}"


def bucket_table(dm: ClipDataModule, report: MetadataReport, decoded: DecodeReport, title: str) -> Table:
    """Rich table: one row per bucket (samples by json, share, batch size, full batches per epoch on one process),
    then the kept totals: by json alone, and estimated from the share of the decoded sample that survived."""
    sizes = dm.batch_sizes(train=True)
    table = Table(title=title)
    for col in ("bucket (T x H x W)", "samples (json)", "share", "batch size", "full batches"):
        table.add_column(col, justify="left" if col.startswith("bucket") else "right")
    for b in dm.buckets:
        n = report.buckets.get(b, 0)
        table.add_row(b.key, str(n), _share(n, report.total), str(sizes[b]), str(n // sizes[b]))
    table.add_row("kept by json", str(report.kept), _share(report.kept, report.total), "", "")
    if decoded.tried:
        estimate = round(report.total * decoded.kept_fraction)
        table.add_row("[bold]kept after decoding[/]", f"[bold]~{estimate}[/]",
                      f"[bold]{_share(decoded.kept, decoded.tried)}[/]", "", "")
    return table


def drop_table(report: MetadataReport, decoded: DecodeReport) -> Table:
    """Rich table of drops by reason: all samples by json, and the decoded sample (with one example each)."""
    table = Table(title="dropped")
    for col in ("reason", "all (json)", f"decoded sample ({decoded.tried})", "example"):
        table.add_column(col, justify="left" if col in ("reason", "example") else "right")
    for reason, label in DROP_LABELS.items():
        table.add_row(label, str(report.dropped.get(reason, 0)), str(decoded.dropped.get(reason, 0)),
                      decoded.examples.get(reason, ""))
    table.add_row("unreadable shards", str(report.tar_errors), str(decoded.tar_errors),
                  decoded.examples.get("tar_error", ""))
    table.add_row("[dim]empty caption (kept)[/]", f"[dim]{report.empty_captions}[/]", "", "")
    return table


def first_batch(dm: ClipDataModule) -> tuple[float, dict]:
    """(seconds, batch) for the first training batch, workers' start-up included."""
    start = time.perf_counter()
    batch = next(iter(dm.train_dataloader()))
    return time.perf_counter() - start, batch


def _error(message: object) -> None:
    print(f"inspect_data: error: {one_line(message, 2000)}", file=sys.stderr)  # one plain line (rich would wrap it)


def inspect(data_cfg: DictConfig, console: Console, decode: int = DEFAULT_DECODE) -> int:
    """Print the bucket / drop tables for the train (and val) shards, decode a sample, time the first batch.

    Returns the exit code: 0 when decoded samples survive, 1 when none does, 2 for a config that cannot load.
    """
    try:
        dm = instantiate(data_cfg)
        if not isinstance(dm, ClipDataModule):
            _error(f"data._target_={data_cfg.get('_target_')}: inspect_data reads clip shards (ClipDataModule)")
            return 2
        dm.setup("fit")
    except MissingMandatoryValue as e:  # a `???` setting, e.g. data.train_shards in configs/data/clips.yaml
        _error(f"{str(e).splitlines()[0]} (set it on the command line)")
        return 2
    except Exception as e:  # DataConfigError, or Hydra's wrapping of a bad argument (the cause is the message)
        _error(e.__cause__ or e)
        return 2
    hp = dm.hparams
    assigner = BucketAssigner(dm.buckets, target_fps=hp.target_fps, frame_stride=hp.frame_stride,
                              max_upscale=hp.max_upscale)
    sampling = f"target_fps={hp.target_fps}" if hp.target_fps else f"frame_stride={hp.frame_stride}"
    console.print(f"decoder={dm.decoder}  {sampling}  max_upscale={hp.max_upscale}  resampled={hp.resampled}  "
                  f"num_workers={hp.num_workers}")
    starved = ""
    for name, shards in (("train", dm.train_set), ("val", dm.val_set)):
        if shards is None:
            continue
        start = time.perf_counter()
        report = scan_metadata(shards.urls, assigner, hp.require_caption)
        scanned = time.perf_counter() - start
        decoded = decode_check(list(shards.urls), assigner, max_samples=decode, decoder=dm.decoder,
                               require_caption=hp.require_caption)
        title = (f"{name}: {len(shards.urls)} shard(s), {report.total} samples by json (scan {scanned:.2f}s, "
                 f"{decoded.tried} decoded in {time.perf_counter() - start - scanned:.2f}s)")
        console.print(bucket_table(dm, report, decoded, title))
        console.print(drop_table(report, decoded))
        if name == "train" and not (decoded.kept if decode > 0 else report.kept):
            ctx = StarveContext("data.train_shards", describe_shards(shards.urls), clip_fixes("data.train_shards"))
            starved = starved_message(ctx, {**decoded.dropped, "tar_error": decoded.tar_errors}, decoded.examples,
                                      kept=0, scope=f"the {decoded.tried} decoded sample(s)")
    if starved:
        _error(starved)
        return 1
    try:
        seconds, batch = first_batch(dm)
    except Exception as e:  # DataStarvedError and friends: one line, never a traceback
        _error(e)
        return 1
    console.print(f"first train batch: video {tuple(batch['video'].shape)} {batch['video'].dtype} "
                  f"in {seconds:.2f}s (decoder={dm.decoder}, num_workers={hp.num_workers})")
    stats = {k: v for k, v in dm.data_stats().items() if v}
    if stats:
        console.print(f"loader counts so far: {stats}")
    return 0


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> int:
    logging.getLogger("vidgen").setLevel(logging.INFO)
    code = inspect(cfg.data, Console(), decode=DECODE)
    if code:
        sys.exit(code)
    return code


DECODE = DEFAULT_DECODE  # --decode N, taken off the command line before Hydra parses the rest


if __name__ == "__main__":
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--decode", type=int, default=DEFAULT_DECODE)
    known, rest = own.parse_known_args()
    DECODE = known.decode
    sys.argv[1:] = HYDRA_DEFAULTS + rest
    main()
