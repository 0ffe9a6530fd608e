"""Checkpoints survive a SIGKILL in the middle of a write; resume=auto finds the right one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from vidgen.training.checkpoint import AtomicCheckpointIO, load_checkpoint, newest_checkpoint
from vidgen.training.recipe import ConfigError, resolve_resume

WRITER = textwrap.dedent("""
    import sys, torch
    from vidgen.training.checkpoint import AtomicCheckpointIO
    io = AtomicCheckpointIO()
    path = sys.argv[1]
    io.save_checkpoint({"step": 1, "w": torch.ones(4)}, path)
    print("first", flush=True)
    big = {"step": 2, "w": torch.zeros(4), "blob": torch.randn(64 * 1024 * 1024)}  # 256 MiB: a slow write
    while True:
        io.save_checkpoint(big, path)
""")


def test_kill_during_checkpoint_write_keeps_previous(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "first"
        deadline = time.time() + 60
        while not any(p.name.startswith(".last.ckpt.") for p in path.parent.iterdir()):  # second write under way
            assert time.time() < deadline and proc.poll() is None, "the writer never started its second save"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(4))  # the old checkpoint, whole
    assert newest_checkpoint(path.parent) == path  # the torn temporary file is never picked
    assert resolve_resume("auto", tmp_path) == str(path)


def test_resume_settings(tmp_path):
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("auto", tmp_path) is None  # nothing yet: start fresh
    with pytest.raises(ConfigError, match="resume=.*nope.ckpt"):
        resolve_resume(str(tmp_path / "nope.ckpt"), tmp_path)
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, tmp_path / "checkpoints" / "step0000001.ckpt")
    time.sleep(0.01)
    io.save_checkpoint({"step": 2}, tmp_path / "hpc_ckpt_1.ckpt")  # SLURM requeue checkpoint, newer
    assert resolve_resume("auto", tmp_path) == str(tmp_path / "hpc_ckpt_1.ckpt")


def test_checkpoints_load_weights_only(tmp_path):
    """A checkpoint holding a pickled object (code) is refused."""
    path = tmp_path / "evil.ckpt"
    torch.save({"obj": Path("x")}, path)
    with pytest.raises(Exception, match="weights_only=True rejected it"):
        load_checkpoint(path)
