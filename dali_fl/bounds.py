"""Bounds on integers taken from the user or from files (every one must fit the 64-bit types it ends up in), and
sizes as messages about them show them."""
from __future__ import annotations

from dali_fl.errors import DaliFlError

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def fits_int64(value: int) -> bool:
    """Whether an integer fits a signed 64-bit integer (torch seeds, numpy indices, C++ sizes)."""
    return INT64_MIN <= value <= INT64_MAX


def check_int64(flag: str, value: int) -> None:
    """Refuse an integer beyond 64 bits in one line, rather than as an OverflowError deep in torch or numpy."""
    if not fits_int64(int(value)):
        raise DaliFlError(f"{flag} {value} does not fit in 64 bits; use a value of at most {INT64_MAX}")


def human_size(nbytes: float) -> str:
    """Bytes in the largest decimal unit that keeps a digit before the point (2.50 GB, 312.00 kB, 5 bytes)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{int(nbytes)} bytes"
