"""In-loop evaluation: the sample-logging callback samples the EMA weights every N steps and logs the weight-free
metrics to every logger, and videos + a metrics table to wandb (offline), found in the run's files."""

from __future__ import annotations

import csv

import pytest

from runs import tiny_dit_overrides, train


@pytest.mark.slow
def test_wandb_offline_run_holds_the_videos_and_metrics(demo_shards, tiny_vae_export, tmp_path):
    overrides = [o for o in tiny_dit_overrides(tiny_vae_export, demo_shards)
                 if o not in ("~callbacks.sample_logging", "logger=none")]
    train([*overrides, "logger=[csv,wandb]", "trainer.max_steps=2", "trainer.log_every_n_steps=1",
           "callbacks.sample_logging.every_n_steps=2", "callbacks.sample_logging.prompts=[bikes,bunny]",
           "callbacks.sample_logging.seeds=2", "callbacks.sample_logging.steps=2",
           "callbacks.sample_logging.num_frames=5", "callbacks.sample_logging.height=48",
           "callbacks.sample_logging.width=112"], tmp_path)
    run = tmp_path / "runs" / "quickstart_dit"
    samples = sorted(p.name for p in (run / "samples" / "step_0000002").glob("*.mp4"))
    assert samples == ["00_bikes_s0.mp4", "00_bikes_s1.mp4", "01_bunny_s0.mp4", "01_bunny_s1.mp4"]
    rows = list(csv.DictReader(open(run / "csv" / "metrics.csv")))
    logged = {k: float(r[k]) for r in rows for k in r if k.startswith("eval/") and r[k]}
    assert set(logged) == {"eval/flicker", "eval/motion", "eval/diversity"}
    assert all(v >= 0 for v in logged.values())
    (wandb_run,) = (run / "wandb").glob("offline-run-*")
    videos = list((wandb_run / "files" / "media" / "videos").rglob("*.mp4"))
    assert len(videos) == 4
    records = next(wandb_run.glob("run-*.wandb")).read_bytes()
    assert b"eval/flicker" in records and b"eval/diversity" in records and b"samples/metrics" in records
