"""Where a store lies on disk: its manifest marks it. No torch here, so tools that only read runs can ask."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

MANIFEST = "manifest.json"


def store_around(path: Path) -> Optional[Path]:
    """The store that `path` is or lies inside (the nearest directory holding a manifest), or None."""
    path = Path(path).absolute()
    return next((d for d in (path, *path.parents) if (d / MANIFEST).is_file()), None)
