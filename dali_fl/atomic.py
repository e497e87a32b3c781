"""Writing files so that readers see the old or the new content, never half of it."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from dali_fl.errors import DaliFlError


def atomic_write(path: Path | str, write: Callable[[Path], None]) -> None:
    """Let `write` fill a temp file in the same directory, sync it, then rename it over `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as err:
        raise DaliFlError(f"cannot write {path} ({err.strerror}); choose another path") from None
    try:
        write(Path(tmp))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename must not land before the data does
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as err:
        raise DaliFlError(f"cannot write {path} ({err.strerror}); choose another path") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path | str, text: str) -> None:
    """atomic_write of a UTF-8 text."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
