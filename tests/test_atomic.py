"""Atomic writes: ordinary file modes, and temporaries of killed writers cleaned up (never taken for the real file)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from vidgen.io import atomic
from vidgen.io.atomic import atomic_dir, atomic_path, atomic_write_text, remove_stale_temporaries
from vidgen.training.checkpoint import AtomicCheckpointIO, newest_checkpoint

WRITER = textwrap.dedent("""
    import sys, time
    from vidgen.io.atomic import atomic_path
    with atomic_path(sys.argv[1]) as tmp:
        tmp.write_bytes(b"partial")
        print(tmp, flush=True)
        time.sleep(float(sys.argv[2]))
        tmp.write_bytes(b"whole")
""")


def _start_writer(path: Path, seconds: float) -> tuple[subprocess.Popen, Path]:
    """A process in the middle of an atomic write of `path` (for `seconds`); returns it and its temporary."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(seconds)], stdout=subprocess.PIPE, text=True)
    tmp = Path(proc.stdout.readline().strip())
    assert tmp.is_file() and tmp.parent == path.parent, tmp
    return proc, tmp


def _temps(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.startswith("."))


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    """Set the process umask for a test and restore it after."""
    old = os.umask(0o022)
    try:
        yield os.umask
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750),
                                                       (0o002, 0o664, 0o775)])
def test_modes_follow_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    atomic_write_text(tmp_path / "new" / "a.json", "{}")
    assert _mode(tmp_path / "new" / "a.json") == file_mode and _mode(tmp_path / "new") == dir_mode
    AtomicCheckpointIO().save_checkpoint({"w": torch.ones(2)}, tmp_path / "ckpt" / "last.ckpt")
    assert _mode(tmp_path / "ckpt" / "last.ckpt") == file_mode
    (tmp_path / "old.txt").write_text("x")
    os.chmod(tmp_path / "old.txt", 0o600)  # a file written 0600 by an earlier version gets the ordinary mode back
    atomic_write_text(tmp_path / "old.txt", "y")
    assert _mode(tmp_path / "old.txt") == file_mode
    for _ in range(2):  # new, then replacing the previous folder
        with atomic_dir(tmp_path / "export") as tmp:
            assert _mode(tmp) == dir_mode
            atomic_write_text(tmp / "config.json", "{}")
    assert _mode(tmp_path / "export") == dir_mode and _mode(tmp_path / "export" / "config.json") == file_mode
    assert _temps(tmp_path) == [] and _temps(tmp_path / "ckpt") == []


def test_failed_write_leaves_previous_file_and_no_temporary(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "a.txt") as tmp:
            tmp.write_text("new, half")
            raise RuntimeError("boom")
    assert (tmp_path / "a.txt").read_text() == "old" and _temps(tmp_path) == []


def test_killed_writers_temporary_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, target)
    proc, orphan = _start_writer(target, 60)
    other_proc, other_orphan = _start_writer(target.with_name("other.ckpt"), 60)
    for p in (proc, other_proc):
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    assert orphan.name.startswith(".last.ckpt.") and orphan.name.endswith(".tmp")  # the names other tools glob
    assert orphan.exists() and other_orphan.exists()
    AtomicCheckpointIO().save_checkpoint({"step": 2}, target)
    assert not orphan.exists(), "the next write of the same target removes the stale temporary"
    assert other_orphan.exists(), "another target's temporary is left to that target's next write"
    assert newest_checkpoint(target.parent) == target  # the folder scan at a run's start removes the rest
    assert _temps(target.parent) == []
    assert torch.load(target, weights_only=True) == {"step": 2}


def test_newest_checkpoint_never_picks_and_cleans_a_killed_writers_temporary(tmp_path):
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, target)
    time.sleep(0.01)
    proc, orphan = _start_writer(target, 60)  # newer than last.ckpt
    try:
        assert newest_checkpoint(tmp_path) == target and orphan.exists()  # in flight: kept, not picked
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # a zombie until reaped: already dead for the cleanup
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # wait until it has died, without reaping it
    try:
        assert newest_checkpoint(tmp_path) == target and not orphan.exists()
    finally:
        proc.wait()


def test_a_live_writers_temporary_is_left_alone(tmp_path):
    target = tmp_path / "data.bin"
    proc, tmp = _start_writer(target, 2)
    atomic_write_text(target, "from another writer")  # a concurrent write of the same target
    assert tmp.exists()
    assert remove_stale_temporaries(tmp_path) == [] and tmp.exists()
    assert proc.wait(timeout=60) == 0  # its rename still works
    assert target.read_bytes() == b"whole" and _temps(tmp_path) == []


def test_stale_rules_for_names_that_cannot_be_checked(tmp_path):
    old = time.time() - atomic.STALE_AFTER_S - 60
    pid, start, host = os.getpid(), atomic._own_start(), atomic._HOST
    names = {
        f".a.ckpt.abcd1234.{pid}-{start}@{host}.tmp": False,  # this very process: a write in flight
        f".a.ckpt.abcd1234.{pid}-{start + 1}@{host}.tmp": True,  # same pid, other start time: a reused pid
        ".a.ckpt.k3j_x9q2.tmp": False,  # an older version's mkstemp name, recently modified
        f".a.ckpt.abcd1234.123-45@{'x' + host}.tmp": False,  # another host, recently modified
    }
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    for name in (".b.ckpt.k3j_x9q2.tmp", f".b.ckpt.abcd1234.123-45@other-{host}.tmp"):  # old: stale
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (old, old))
        names[name] = True
    (tmp_path / ".hidden").write_text("not a temporary")
    (tmp_path / ".c.json.k3j_x9q2.tmp").write_bytes(b"x")  # not a checkpoint's
    os.utime(tmp_path / ".c.json.k3j_x9q2.tmp", (old, old))
    removed = remove_stale_temporaries(tmp_path, suffix=".ckpt")
    assert sorted(p.name for p in removed) == sorted(n for n, stale in names.items() if stale)
    assert (tmp_path / ".hidden").exists() and (tmp_path / ".c.json.k3j_x9q2.tmp").exists()


def test_killed_export_folder_is_removed_by_the_next(tmp_path):
    script = textwrap.dedent("""
        import sys, time
        from vidgen.io.atomic import atomic_dir
        with atomic_dir(sys.argv[1]) as tmp:
            (tmp / "part").write_text("x")
            print(tmp, flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "export")], stdout=subprocess.PIPE, text=True)
    orphan = Path(proc.stdout.readline().strip())
    proc.kill()
    proc.wait()
    assert orphan.is_dir()
    with atomic_dir(tmp_path / "export") as tmp:
        (tmp / "config.json").write_text("{}")
    assert not orphan.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["export"]
