"""One command from a sharded (FSDP layout) or single-file checkpoint to an export folder; both give the same weights.

The four checkpoint forms (file, FSDP folder, export folder; DeepSpeed in test_safe_sharded.py) read into equal
`ModelParts`, and a wrong kind, a missing key, an unexpected key and a corrupt file each give one clear line."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from runs import tiny_dit_overrides, train
from vidgen.io.checkpoint import CheckpointError, load_checkpoint, main, read_parts, read_training_checkpoint
from vidgen.io.pretrained import WeightsError


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

    merged = read_training_checkpoint(sharded)
    assert merged["global_step"] == state["global_step"] and merged["vidgen"]["task"] == "dit"
    assert merged["state_dict"].keys() == state["state_dict"].keys()
    assert all(torch.equal(merged["state_dict"][k], v) for k, v in state["state_dict"].items())

    assert main([str(ckpt), str(tmp_path / "from_file")]) == 0
    assert main([str(sharded), str(tmp_path / "from_shards")]) == 0
    a = load_file(tmp_path / "from_file" / "dit" / "model.safetensors")
    b = load_file(tmp_path / "from_shards" / "dit" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    forms = [read_parts(p) for p in (ckpt, sharded, tmp_path / "from_file")]
    for other in forms[1:]:
        assert other.kind == forms[0].kind == "dit" and other.meta["flow"] == forms[0].meta["flow"]
        for name, part in forms[0].parts.items():
            assert other.parts[name].cls == part.cls and other.parts[name].config == part.config
            assert other.parts[name].state.keys() == part.state.keys()
            assert all(torch.equal(other.parts[name].state[k], v) for k, v in part.state.items())
        assert other.conditioner().spec() == forms[0].conditioner().spec()

    # one clear line for: a wrong kind, a missing key, an unexpected key, a corrupt file
    with pytest.raises(CheckpointError, match="a 'dit' checkpoint, expected a 'vae'"):
        read_parts(ckpt, kind="vae")
    missing, unexpected = dict(state), dict(state)
    missing["state_dict"] = {k: v for k, v in state["state_dict"].items() if k != "dit.proj_out.weight"}
    unexpected["state_dict"] = {**state["state_dict"], "dit.extra.weight": torch.zeros(1)}
    for name, ck, needle in [("missing", missing, "1 missing key.*dit.proj_out.weight|proj_out.weight"),
                             ("unexpected", unexpected, "1 unexpected key.*extra.weight")]:
        torch.save(ck, tmp_path / f"{name}.ckpt")
        with pytest.raises(WeightsError, match=needle) as err:
            read_parts(tmp_path / f"{name}.ckpt").build("dit")
        assert "\n" not in str(err.value)
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(ckpt.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="corrupt.ckpt: not a readable checkpoint"):
        read_parts(corrupt)


def test_bad_checkpoint_paths(tmp_path, capsys):
    from vidgen.errors import one_line_errors

    with pytest.raises(SystemExit, match="2"):
        one_line_errors(main)([str(tmp_path / "missing.ckpt"), str(tmp_path / "out")])
    (tmp_path / "folder").mkdir()
    with pytest.raises(SystemExit, match="2"):
        one_line_errors(main)([str(tmp_path / "folder"), str(tmp_path / "out")])
    assert "neither an FSDP" in capsys.readouterr().err
