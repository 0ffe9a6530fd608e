"""Bad input through the real entry points: one `error: ...` line naming the file or setting, exit code 2.

Each case runs `train.py`, `sample.py` or `python -m vidgen.io.checkpoint` in a subprocess, as a user would.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from runs import ROOT, tiny_dit_overrides, train

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    args = tuple(str(ROOT / a) if a.endswith(".py") else a for a in args)
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=ENV)


def one_line(out: subprocess.CompletedProcess) -> str:
    """The one `error:` line of a run that failed with exit code 2 (besides Lightning's start-up info lines)."""
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error: ")]
    assert out.returncode == 2 and len(errors) == 1, f"exit {out.returncode}:\n{out.stderr[-3000:]}"
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def dit_run(tmp_path_factory, demo_shards, tiny_vae_export) -> Path:
    """A real tiny DiT run (2 steps); returns its last.ckpt."""
    root = tmp_path_factory.mktemp("dit")
    train([*tiny_dit_overrides(tiny_vae_export, demo_shards), "trainer.max_steps=2",
           "callbacks.model_checkpoint.every_n_train_steps=2"], root)
    return root / "runs" / "quickstart_dit" / "checkpoints" / "last.ckpt"


class Payload:
    """Unpickling this runs `touch MARKER`: the file must never appear."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_truncated_and_empty_checkpoints(dit_run, tmp_path):
    truncated, empty = tmp_path / "truncated.ckpt", tmp_path / "empty.ckpt"
    truncated.write_bytes(dit_run.read_bytes()[:4096])
    empty.write_bytes(b"")
    for ckpt in (truncated, empty):
        line = one_line(run("sample.py", f"ckpt={ckpt}", "prompt=x", f"out_dir={tmp_path / 'out'}"))
        assert line == f"error: {ckpt}: not a readable checkpoint (truncated or corrupt? " + line.split("? ", 1)[1]
        line = one_line(run("-m", "vidgen.io.checkpoint", str(ckpt), str(tmp_path / "export")))
        assert str(ckpt) in line and "not a readable checkpoint" in line
    line = one_line(run("train.py", *tiny_dit_overrides(Path("/nonexistent"), Path("/nonexistent")),
                        f"resume={empty}", cwd=tmp_path))
    assert str(empty) in line and "not a readable checkpoint" in line


def test_pickled_code_in_checkpoints_never_runs(dit_run, tmp_path):
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "vidgen": {"kind": "dit"}, "x": Payload(marker)}, evil)
    fsdp = tmp_path / "fsdp_folder"  # an FSDP-shaped folder whose DCP metadata is a pickle
    fsdp.mkdir()
    (fsdp / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    (fsdp / "__0_0.distcp").write_bytes(b"")
    deepspeed = tmp_path / "ds_folder"  # a DeepSpeed-shaped folder
    (deepspeed / "global_step1").mkdir(parents=True)
    (deepspeed / "latest").write_text("global_step1")
    torch.save({"module": Payload(marker)}, deepspeed / "global_step1" / "mp_rank_00_model_states.pt")
    for ckpt in (evil, fsdp, deepspeed):
        line = one_line(run("-m", "vidgen.io.checkpoint", str(ckpt), str(tmp_path / "export")))
        assert str(ckpt) in line, line
        one_line(run("sample.py", f"ckpt={ckpt}", "prompt=x", f"out_dir={tmp_path / 'out'}"))
    line = one_line(run("train.py", *tiny_dit_overrides(Path("/x"), Path("/x")), f"resume={fsdp}", cwd=tmp_path))
    assert line.startswith(f"error: resume={fsdp}: a sharded checkpoint folder, but this run's trainer writes")
    from vidgen.io.sharded import UnsafeCheckpointError, check_sharded_folder  # what trainer=fsdp resume runs first

    with pytest.raises(UnsafeCheckpointError):
        check_sharded_folder(fsdp)
    assert not marker.exists()


def test_export_with_wrong_shaped_weights(dit_run, tmp_path):
    export = tmp_path / "export"
    assert run("-m", "vidgen.io.checkpoint", str(dit_run), str(export)).returncode == 0
    weights = export / "dit" / "model.safetensors"
    state = load_file(weights)
    state["proj_out.weight"] = torch.zeros(3, 3)
    save_file(state, weights)
    line = one_line(run("sample.py", f"ckpt={export}", "prompt=x", f"out_dir={tmp_path / 'out'}"))
    assert "1 wrong shape key(s) (e.g. proj_out.weight [3, 3] vs" in line and str(export) in line


def test_training_settings_checked_at_start(demo_shards, tiny_vae_export, tmp_path):
    base = tiny_dit_overrides(tiny_vae_export, demo_shards)
    line = one_line(run("train.py", *base, "data.buckets=[[8,48,112]]", cwd=tmp_path))
    assert line.startswith("error: data.buckets: [8, 48, 112]: 8 frames, but the causal VAE maps 1 + 4k frames")
    line = one_line(run("train.py", *base, "data.buckets=[[9,40,112]]", cwd=tmp_path))
    assert "data.buckets: [9, 40, 112] does not fit the VAE at task.module.vae_path" in line
    line = one_line(run("train.py", *base, "trainer.max_steps=0", cwd=tmp_path))
    assert line == ("error: trainer.max_steps=0: expected a positive number of optimizer steps (or -1 to train by "
                    "trainer.max_epochs)")
    no_config = tmp_path / "vae_without_config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes((Path(tiny_vae_export) / "model.safetensors").read_bytes())
    line = one_line(run("train.py", *tiny_dit_overrides(no_config, demo_shards), "model.dit.in_channels=4",
                        cwd=tmp_path))
    assert f"task.module.vae_path={no_config}: no VAE export folder there" in line


def test_sampling_settings(dit_run, tmp_path):
    line = one_line(run("sample.py", f"ckpt={dit_run}", "prompt=x", "guidance=-5", "steps=1",
                        f"out_dir={tmp_path / 'out'}"))
    assert line == "error: guidance=-5: expected a scale >= 0 (1 = no guidance, 5 = Wan's default)"
    line = one_line(run("sample.py", f"ckpt={dit_run}", "prompt=x", "steps=0", f"out_dir={tmp_path / 'out'}"))
    assert line == "error: steps=0: expected at least 1"
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    line = one_line(run("sample.py", f"ckpt={dit_run}", "prompt=x", "steps=1", f"out_dir={blocker / 'out'}"))
    assert str(blocker) in line


def test_vae_fingerprint_refused_at_sampling_and_resume(dit_run, tiny_vae_export, demo_shards, tmp_path):
    other = tmp_path / "other_vae"
    other.mkdir()
    meta = json.loads((Path(tiny_vae_export) / "config.json").read_text())
    meta["latent_std"] = [2.0 * s for s in meta["latent_std"]]  # another VAE: same shape, other normalisation
    (other / "config.json").write_text(json.dumps(meta))
    (other / "model.safetensors").write_bytes((Path(tiny_vae_export) / "model.safetensors").read_bytes())
    line = one_line(run("sample.py", f"ckpt={dit_run}", "prompt=x", f"vae={other}", f"out_dir={tmp_path / 'o'}"))
    assert line.startswith(f"error: vae={other}: VAE fingerprint ") and "but the DiT was trained with" in line
    line = one_line(run("train.py", *tiny_dit_overrides(other, demo_shards), "trainer.max_steps=4",
                        f"resume={dit_run}", cwd=tmp_path))
    assert f"task.module.vae_path={other}: this VAE (fingerprint " in line
