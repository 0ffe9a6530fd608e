"""One command from a sharded (FSDP layout) or single-file checkpoint to an export folder; both give the same weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from runs import tiny_dit_overrides, train
from vidgen.training.checkpoint import load_checkpoint
from vidgen.training.consolidate import consolidate, main


def _write_fsdp_layout(checkpoint: dict, folder) -> None:
    """Write `checkpoint` exactly as Lightning's FSDPStrategy(state_dict_type="sharded") lays it out."""
    import torch.distributed.checkpoint as dcp

    checkpoint = dict(checkpoint)
    sharded = {"model": checkpoint.pop("state_dict")}
    sharded.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
    dcp.save(sharded, storage_writer=dcp.FileSystemWriter(str(folder)), no_dist=True)
    torch.save(checkpoint, folder / "meta.pt")


@pytest.mark.slow
def test_sharded_and_single_file_checkpoints_export_the_same(demo_shards, tiny_vae_export, tmp_path):
    train([*tiny_dit_overrides(tiny_vae_export, demo_shards), "trainer.max_steps=2"], tmp_path)
    ckpt = tmp_path / "runs" / "quickstart_dit" / "checkpoints" / "last.ckpt"
    state = load_checkpoint(ckpt)
    sharded = tmp_path / "sharded.ckpt"
    _write_fsdp_layout(state, sharded)

    merged = consolidate(sharded)
    assert merged["global_step"] == state["global_step"] and merged["vidgen"]["task"] == "dit"
    assert merged["state_dict"].keys() == state["state_dict"].keys()
    assert all(torch.equal(merged["state_dict"][k], v) for k, v in state["state_dict"].items())

    assert main([str(ckpt), str(tmp_path / "from_file")]) == 0
    assert main([str(sharded), str(tmp_path / "from_shards")]) == 0
    a = load_file(tmp_path / "from_file" / "dit" / "model.safetensors")
    b = load_file(tmp_path / "from_shards" / "dit" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_checkpoint_paths(tmp_path, capsys):
    assert main([str(tmp_path / "missing.ckpt"), str(tmp_path / "out")]) == 1
    (tmp_path / "folder").mkdir()
    assert main([str(tmp_path / "folder"), str(tmp_path / "out")]) == 1
    assert "neither an FSDP" in capsys.readouterr().err
