"""Atomic file writes: write to a temporary file in the same folder, fsync, then rename.

Temporary names are `.NAME.RAND.PID-START@HOST.tmp` (START: the writer's process start time), so a
temporary left by a killed writer can be told from one still being written: the next atomic write of
the same target (and `remove_stale_temporaries`, e.g. at a run's start) deletes the stale ones.
Files and folders get the ordinary modes `open()` / `mkdir()` would give (0666 / 0777 less the umask).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Iterator

# A temporary whose writer cannot be checked (another host, or a name written before owners were
# recorded) is stale once it has not been modified for this long.
STALE_AFTER_S = 3600.0

_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<rand>[0-9a-z]+)\.(?P<pid>\d+)-(?P<start>\d+)@(?P<host>[A-Za-z0-9-]+)"
                      r"\.tmp$")
_LEGACY_RE = re.compile(r"^\.(?P<name>.+)\.(?P<rand>[a-z0-9_]{8})\.tmp$")  # tempfile.mkstemp names (older versions)
_LEGACY_DIR_RE = re.compile(r"^\.(?P<name>.+)\.(?P<rand>[a-z0-9_]{8})$")  # tempfile.mkdtemp names (older exports)


def _proc_start(pid: int | str) -> tuple[int, str] | None:
    """(start time in clock ticks since boot, state letter) of a process, from /proc; None if it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    return int(fields[19]), fields[0]


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:63] or "host"


_HOST = _host()
_HAVE_PROC = _proc_start("self") is not None
_STARTS: dict[int, int] = {}


def _own_start() -> int:
    """This process's start time (0 without /proc); per pid, so forked children get their own."""
    pid = os.getpid()
    if pid not in _STARTS:
        found = _proc_start(pid)
        _STARTS[pid] = found[0] if found else 0
    return _STARTS[pid]


def _owner_tag() -> str:
    return f"{os.getpid()}-{_own_start()}@{_HOST}"


def _writer_alive(pid: int, start: int, host: str) -> bool | None:
    """True / False when the writer of a temporary can be checked (this host), None when it cannot."""
    if host != _HOST:
        return None
    if pid == os.getpid() and start == _own_start():
        return True  # this process (another thread may be writing it)
    if start and _HAVE_PROC:  # Linux: pid + start time identify the process even when pids are reused
        found = _proc_start(pid)
        return found is not None and found[0] == start and found[1] not in "ZX"  # zombie: killed, not yet reaped
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_stale(entry: os.DirEntry, name: str | None, suffix: str | None, legacy_dirs: bool, now: float) -> bool:
    m = _TEMP_RE.match(entry.name)
    legacy = m is None
    if legacy:
        m = _LEGACY_RE.match(entry.name) or (_LEGACY_DIR_RE.match(entry.name) if legacy_dirs else None)
    if m is None or (name is not None and m["name"] != name) or (suffix is not None and not m["name"].endswith(suffix)):
        return False
    alive = None if legacy else _writer_alive(int(m["pid"]), int(m["start"]), m["host"])
    if alive is not None:
        return not alive
    try:
        return now - entry.stat(follow_symlinks=False).st_mtime > STALE_AFTER_S
    except FileNotFoundError:
        return False


def remove_stale_temporaries(folder: str | os.PathLike, name: str | None = None, suffix: str | None = None,
                             dirs: bool = False) -> list[Path]:
    """Delete temporaries of interrupted atomic writes in `folder`; returns the paths removed.

    Only temporaries of target `name` (or of targets ending in `suffix`; else of any target) are
    considered. One is stale when its writer process is gone (same host), or, when that cannot be
    checked, when it has not been modified for `STALE_AFTER_S`. `dirs`: also temporary folders (and the
    `.NAME.XXXXXXXX` folders of older exports).
    """
    folder, removed, now = Path(folder), [], time.time()
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        if not entry.name.startswith(".") or not _is_stale(entry, name, suffix, dirs, now):
            continue
        path = Path(entry.path)
        try:
            if entry.is_dir(follow_symlinks=False):
                if dirs:
                    shutil.rmtree(path)
                    removed.append(path)
            else:
                path.unlink()
                removed.append(path)
        except FileNotFoundError:  # another process cleaned it first
            pass
    return removed


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.{_owner_tag()}.tmp")


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (best effort: not every OS / file system allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename.

    A crash or kill before the rename leaves any previous `path` untouched; the temporary it leaves is
    deleted by the next atomic write of `path`. The file gets mode 0666 less the umask (0644 under 022).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, name=path.name)
    while True:
        tmp = _temp_name(path)
        try:  # mode 0o666: the kernel applies the umask, as for any new file (mkstemp would force 0600)
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666))
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it takes the place of `path` (a previous folder is removed).

    The folder gets mode 0777 less the umask (0755 under 022); stale temporary folders of `path` left by
    killed writers are deleted first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, name=path.name, dirs=True)
    while True:
        tmp = _temp_name(path)
        try:
            os.mkdir(tmp, 0o777)  # the umask applies (mkdtemp would force 0700)
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))
