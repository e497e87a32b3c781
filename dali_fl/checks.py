"""Checks every frozen options dataclass runs in __post_init__: numbers finite and in range, counts integers."""
from __future__ import annotations

import dataclasses
import math
import numbers

import numpy as np

from dali_fl.bounds import check_int64
from dali_fl.errors import DaliFlError

F32_MAX = float(np.finfo(np.float32).max)


def flag(name: str) -> str:
    """The command-line spelling of an option's field name."""
    return "--" + name.replace("_", "-")


def check_numbers(obj: object, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()) -> None:
    """Refuse non-finite floats in every numeric field, and values out of range in the named ones."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            continue
        if not math.isfinite(value):
            raise DaliFlError(f"{flag(f.name)} {value} is not a finite number")
        if isinstance(value, float) and abs(value) > F32_MAX:  # torch raised an overflow deep inside a step
            raise DaliFlError(f"{flag(f.name)} {value} is beyond what float32, the weights' type, holds (3.4e38)")
        if f.name in positive and not value > 0:
            raise DaliFlError(f"{flag(f.name)} must be > 0 (got {value})")
        if f.name in non_negative and value < 0:
            raise DaliFlError(f"{flag(f.name)} must be >= 0 (got {value})")


def check_ints(obj: object, *names: str) -> None:
    """Refuse a non-integer (a float, a bool, a string) where a count is expected."""
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise DaliFlError(f"{flag(name)} must be an integer (got {value!r})")
        check_int64(flag(name), value)


def check_choice(value: str, choices: tuple[str, ...], flag: str) -> None:
    if value not in choices:
        raise DaliFlError(f"{flag} {value!r}: choose one of {', '.join(choices)}")
