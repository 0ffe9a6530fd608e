"""Real 2-process DDP (gloo on CPU) through train.py: disjoint data per rank, identical weights after the run."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch

from runs import tiny_dit_overrides, tiny_vae_overrides, train
from vidgen.training.checkpoint import load_checkpoint

DDP = ["trainer=ddp_cpu", "data.val_split=null", "data.num_workers=0"]


def _shard_of_key(shards: Path) -> dict[str, str]:
    owner = {}
    for tar in sorted(shards.glob("clips-*.tar")):
        with tarfile.open(tar) as tf:
            for name in tf.getnames():
                owner[name.split(".", 1)[0]] = tar.name
    return owner


def _reports(folder: Path) -> list[dict]:
    reports = [json.loads((folder / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in reports] == [2, 2]
    return reports


def _assert_ddp_contract(reports: list[dict], shards: Path, steps: int) -> None:
    assert all(r["global_step"] == steps for r in reports)
    assert reports[0]["weights_sha256"] == reports[1]["weights_sha256"], "weights differ across ranks"
    keys0, keys1 = set(reports[0]["keys"]), set(reports[1]["keys"])
    assert keys0 and keys1 and not keys0 & keys1, "ranks trained on overlapping samples"
    owner = _shard_of_key(shards)
    shards0, shards1 = {owner[k] for k in keys0}, {owner[k] for k in keys1}
    assert not shards0 & shards1, f"ranks read the same shard: {shards0 & shards1}"


@pytest.mark.slow
def test_ddp_vae_two_ranks(demo_shards, tmp_path):
    steps = 2
    train([*tiny_vae_overrides(demo_shards), *DDP, f"trainer.max_steps={steps}",
           "+callbacks.rank_report._target_=tests.helpers.callbacks.RankReport",
           f"+callbacks.rank_report.out={tmp_path}/report"], tmp_path)
    _assert_ddp_contract(_reports(tmp_path / "report"), demo_shards, steps)


@pytest.mark.slow
def test_ddp_dit_two_ranks_then_resume_on_one(demo_shards, tiny_vae_export, tmp_path):
    """DiT on 2 ranks; then the checkpoint resumes on 1 device: weights, optimizer, EMA and step carry over."""
    steps = 2
    train([*tiny_dit_overrides(tiny_vae_export, demo_shards), *DDP, f"trainer.max_steps={steps}",
           "+callbacks.rank_report._target_=tests.helpers.callbacks.RankReport",
           f"+callbacks.rank_report.out={tmp_path}/report"], tmp_path)
    _assert_ddp_contract(_reports(tmp_path / "report"), demo_shards, steps)

    last = tmp_path / "runs" / "quickstart_dit" / "checkpoints" / "last.ckpt"
    before = load_checkpoint(last)
    assert before["global_step"] == steps and before["datamodule_hyper_parameters"] is not None
    out = train([*tiny_dit_overrides(tiny_vae_export, demo_shards), "resume=auto", f"trainer.max_steps={steps + 2}"],
                tmp_path)
    assert "data position cannot carry over" in out.stderr + out.stdout
    after = load_checkpoint(last)
    assert after["global_step"] == steps + 2
    assert set(after["callbacks"]["EMA"]["shadow"]) == set(before["callbacks"]["EMA"]["shadow"])
    moved = [k for k, v in after["state_dict"].items() if not torch.equal(v, before["state_dict"][k])]
    assert moved, "resumed training did not update the weights"
