"""Writing files and directories so that readers see the old or the new content, never half of it.

One durability policy for everything dali-fl writes (store, checkpoint, config, partition,
summary): the data is fsynced before the rename that publishes it, and the parent directory is
fsynced after, so a crash or power cut leaves either the old version or the new one, whole.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from dali_fl.errors import DaliFlError

log = logging.getLogger(__name__)


def fsync_path(path: Path | str) -> None:
    """Flush a file's or a directory's entry and data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(root: Path) -> None:
    """fsync every regular file under `root`, then every directory, deepest first."""
    for dirpath, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(os.path.join(dirpath, name))
        fsync_path(dirpath)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_CAUSES = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space",
           errno.EACCES: "check that you may write there", errno.EPERM: "check that you may write there",
           errno.EROFS: "check that you may write there"}


def what_to_do(err: OSError, other: str = "choose another path") -> str:
    """The fix a failed write calls for: space for a full disk, permissions for a refusal; `other` as well or else."""
    cause = _CAUSES.get(err.errno, "")
    return f"{cause} or {other}" if cause and other else cause or other


def atomic_write(path: Path | str, write: Callable[[Path], None]) -> None:
    """Let `write` fill a temp file in the same directory, sync it, then rename it over `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as err:
        raise DaliFlError(f"cannot write {path} ({err.strerror}); {what_to_do(err)}") from None
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the result is an ordinary file
        fsync_path(tmp)  # the rename must not land before the data does
        os.replace(tmp, path)
        fsync_path(path.parent)
    except OSError as err:
        raise DaliFlError(f"cannot write {path} ({err.strerror}); {what_to_do(err)}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path | str, text: str) -> None:
    """atomic_write of a UTF-8 text."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _start_time(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, /proc/PID/stat's 22nd field), or None if none runs."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[19]  # after the command name, which may hold spaces


def _writer_tag() -> str:
    """PID.START for this process: a pid alone is reused (a container's restart hands out the same small pids)."""
    return f"{os.getpid()}.{_start_time(os.getpid())}"


def _writer_alive(name: str) -> bool:
    """Whether another running process owns a temp or old directory (its tag ends the name)."""
    pid, _, start = name.rsplit("-", 1)[-1].partition(".")
    # This process's own leftovers come from an earlier call that was interrupted: not in use.
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    running = _start_time(int(pid))
    # Without a start time (names of earlier versions) any process with that id counts as the writer.
    return running is not None and (not start or start == running)


def temp_dir_for(final: Path, whole: Callable[[Path], bool] = lambda p: True) -> Path:
    """A fresh `.NAME.tmp-PID.START` directory beside `final`, after clearing what crashed writers left."""
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(final, whole)
    tmp = final.parent / f".{final.name}.tmp-{_writer_tag()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def replace_dir(tmp: Path, final: Path) -> None:
    """Publish the finished directory `tmp` as `final`; readers see the old one or the new one, whole.

    Every file in `tmp` and `tmp` itself are fsynced first; an existing `final` is renamed to
    `.NAME.old-PID.START` beside it; `tmp` is renamed to `final` and the parent is fsynced; only then
    is the old copy deleted. A crash between the two renames leaves the old copy whole, and
    `recover_dir` (called by every reader and writer of such a directory) puts it back.
    """
    sync_tree(tmp)
    old = final.parent / f".{final.name}.old-{_writer_tag()}"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    fsync_path(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(final: Path, whole: Callable[[Path], bool] = lambda p: True) -> bool:
    """Restore `final` from the old copy an interrupted `replace_dir` left; drop what crashes left.

    `whole` tells a complete copy (e.g. one with its manifest) from debris. Returns True when a
    copy was restored. Copies that belong to a live process are left alone.
    """
    olds = [p for p in final.parent.glob(f".{final.name}.old-*") if not _writer_alive(p.name)]
    restored = False
    candidates = [p for p in olds if whole(p)]
    if not final.exists() and candidates:
        newest = max(candidates, key=lambda p: p.stat().st_mtime)
        newest.rename(final)
        fsync_path(final.parent)
        olds.remove(newest)
        log.warning("restored %s from the copy an interrupted write left", final)
        restored = True
    temps = [p for p in final.parent.glob(f".{final.name}.tmp-*") if not _writer_alive(p.name)]
    for stale in olds + temps:
        log.info("removing %s, left by an interrupted write", stale)
        shutil.rmtree(stale, ignore_errors=True)
    return restored
