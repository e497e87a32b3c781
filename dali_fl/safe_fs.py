"""Opening dali-fl's own files without following symlinks or blocking on FIFOs, devices or sockets.

A run directory or an app directory may hold anything a user (or another program) put there. A
symlink at a name dali-fl writes would redirect the write outside the directory; a FIFO at a name it
reads would block the process for ever. So every such path is checked with `lstat` first, and opened
with O_NOFOLLOW | O_NONBLOCK, the kind checked again on the open descriptor (no race with a swap).
"""
from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path
from typing import Optional

from dali_fl.errors import DaliFlError

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"))


def kind_of(mode: int) -> str:
    """What a non-regular file is, in words."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _refuse(path: Path, what: str, fix: str) -> DaliFlError:
    return DaliFlError(f"{path} is {what}, not a file dali-fl wrote; {fix}")


def check_input_file(path: Path | str, flag: str, fix: str) -> Path:
    """A file the user names with `flag`, links followed: its real path, or one line if it is missing or not a
    regular file (a FIFO would block a read, a device never end one)."""
    try:
        real = Path(path).resolve()
    except (RuntimeError, OSError):  # Python 3.11 raises RuntimeError for a symlink loop
        raise DaliFlError(f"cannot read {flag} {path} (a symlink loop); {fix}") from None
    if not real.exists():
        raise DaliFlError(f"cannot read {flag} {path} (no such file); {fix}")
    if not real.is_file():
        raise DaliFlError(f"{flag} {path} is {kind_of(real.stat().st_mode)}, not a file; {fix}")
    return real


def check_regular(path: Path | str, fix: str = "remove it") -> Optional[os.stat_result]:
    """The lstat of `path` if it is a regular file, None if absent; a symlink or a FIFO (etc.) is refused."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise DaliFlError(f"cannot read {path} ({err.strerror}); {fix}") from None
    if stat.S_ISLNK(st.st_mode):
        raise _refuse(path, "a symlink", fix)
    if not stat.S_ISREG(st.st_mode):
        raise _refuse(path, kind_of(st.st_mode), fix)
    return st


def check_dir(path: Path | str, fix: str = "remove it") -> bool:
    """Whether `path` is a real directory (False if absent); a symlink or a file there is refused."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as err:
        raise DaliFlError(f"cannot read {path} ({err.strerror}); {fix}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise _refuse(path, "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory", fix)
    return True


def _check_parent(path: Path, flag: str) -> None:
    """The directory `path` goes in must exist already and be one we may write in; it is never created."""
    parent = path.parent
    try:
        st = os.stat(parent)  # follows links: a parent that is a link to a directory is a user's choice
    except FileNotFoundError:
        raise DaliFlError(f"{flag} {path}: directory {parent} does not exist; create it first "
                          f"or choose another {flag} path") from None
    except OSError as err:
        raise DaliFlError(f"{flag} {path}: cannot use directory {parent} ({err.strerror}); "
                          f"choose another {flag} path") from None
    if not stat.S_ISDIR(st.st_mode):
        raise DaliFlError(f"{flag} {path}: {parent} is not a directory; choose another {flag} path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DaliFlError(f"{flag} {path}: directory {parent} is not writable; choose another {flag} path")


def check_output_file(path: Path | str, flag: str, force: bool) -> Path:
    """Refuse, before any work, an output path dali-fl must not write; return it as a Path.

    Refused: an empty path or one ending in a separator; a missing parent directory; a symlink,
    directory, FIFO, socket or device at the path (even with `force`: replacing one would destroy
    what it is); an existing regular file unless `force`.
    """
    raw = os.fspath(path)
    if not raw:
        raise DaliFlError(f"{flag} is empty; give the path of a file to write")
    if raw.endswith(os.sep) or os.path.basename(raw) in (".", ".."):  # Path() would drop the `/`
        raise DaliFlError(f"{flag} {raw} names a directory; give the path of a file to write")
    path = Path(raw)
    _check_parent(path, flag)
    if check_regular(path, f"choose another {flag} path") is not None and not force:
        raise DaliFlError(f"{path} already exists; pass --force to replace it, or choose another {flag} path")
    return path


def open_regular(path: Path | str, flags: int = os.O_RDONLY, mode: int = 0o644, fix: str = "remove it") -> int:
    """os.open without following a symlink or blocking; the descriptor of a regular file, or a one-line refusal."""
    path = Path(path)
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise _refuse(path, "a symlink", fix) from None
        if err.errno == errno.ENOENT:
            raise DaliFlError(f"{path} is missing; {fix}") from None
        raise DaliFlError(f"cannot open {path} ({err.strerror}); {fix}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise _refuse(path, kind_of(st.st_mode), fix)
    return fd


def read_bytes(path: Path | str, limit: int, fix: str = "remove it") -> bytes:
    """A regular file's bytes (at most `limit`; a larger file is refused), read without following links."""
    path = Path(path)
    fd = open_regular(path, fix=fix)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise DaliFlError(f"{path} is {size:,} bytes, more than the {limit:,} a file of this kind holds; {fix}")
        chunks, total = [], 0
        while total <= limit and (chunk := os.read(fd, 1 << 20)):  # the size may change while reading
            chunks.append(chunk)
            total += len(chunk)
    except OSError as err:
        raise DaliFlError(f"cannot read {path} ({err.strerror}); {fix}") from None
    finally:
        os.close(fd)
    if total > limit:
        raise DaliFlError(f"{path} grew beyond {limit:,} bytes while read; {fix}")
    return b"".join(chunks)


def sha256(path: Path | str, fix: str = "remove it") -> str:
    """Hex sha256 of a regular file, read in chunks without following a symlink."""
    digest = hashlib.sha256()
    fd = open_regular(path, fix=fix)
    try:
        while chunk := os.read(fd, 16 << 20):
            digest.update(chunk)
    except OSError as err:
        raise DaliFlError(f"cannot read {path} ({err.strerror}); {fix}") from None
    finally:
        os.close(fd)
    return digest.hexdigest()


def read_text(path: Path | str, limit: int, fix: str = "remove it") -> str:
    """read_bytes decoded as UTF-8 (undecodable bytes replaced: the parser then names the bad line)."""
    return read_bytes(path, limit, fix).decode("utf-8", errors="replace")
