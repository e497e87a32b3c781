"""The same federation as a Flower app: a ClientApp that trains with dali-fl, a ServerApp that aggregates like it.

`options` (run config <-> `dali-fl train` options, no flwr needed), `wire` (tensors as ArrayRecords),
`client` (one process's federation, built once, and the train handler), `server` (sampling, aggregation,
evaluation, the run directory), `app` (the two apps and the simulation entry point) and `compare` (both
engines on one federation). flwr is the optional extra `dali-fl[flower]`; this package's `__init__` and
`options` do not import it.
"""
from __future__ import annotations

from dali_fl.errors import DaliFlError

INSTALL_HINT = "install the Flower extra: pip install 'dali-fl[flower]'"


def require_flwr() -> None:
    """Refuse, in one line, to build a Flower app without flwr installed."""
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise DaliFlError(f"flwr is not installed; {INSTALL_HINT}") from None
