"""The GPU check's step runner: each step timed and recorded; neither a failure nor the time limit loses what ran.

A lent GPU machine gives a call a fixed number of seconds. `Steps` holds the check's budget: a step that
would start with too little of it left is recorded as not run, and at the deadline (or on the SIGTERM of
an outer `timeout`) the running step is cut, recorded as such, and the pages are still written.
"""
from __future__ import annotations

import io
import logging
import os
import signal
import tarfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

from benchmarks.measure import ROOT
from benchmarks.report import fmt, table

log = logging.getLogger("gpu_check")
MIN_STEP_S = 20.0  # a step started with less than this left would only be cut: it is recorded as not run


class TimeUp(BaseException):
    """The check's time ran out. A BaseException, so that no `except Exception` in a benchmark swallows it."""


class Steps:
    """Runs the check's steps one after another, timing each and recording failures instead of stopping."""

    def __init__(self, out: Path, label: str = "", budget_s: Optional[float] = None) -> None:
        self.out, self.label = out, label
        self.rows: list[tuple[str, float, str]] = []  # (name, seconds, "ok" or why not)
        self.deadline = None if budget_s is None else time.monotonic() + budget_s
        self.timed_out = False
        self._in_step = False
        self._saved: Optional[tuple[Any, Any, tuple[float, float], float]] = None

    @property
    def errors_file(self) -> Path:
        return self.out / f"errors{self.label}.txt"

    def left(self) -> Optional[float]:
        """Seconds of the budget left; None without a budget."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    def arm(self) -> None:
        """From now on the deadline's alarm and a SIGTERM cut the running step (main thread only)."""
        alarm, term = signal.getsignal(signal.SIGALRM), signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._on_signal)
        old_timer = (0.0, 0.0)
        if self.deadline is not None:
            signal.signal(signal.SIGALRM, self._on_signal)
            old_timer = signal.setitimer(signal.ITIMER_REAL, max(self.left() or 0.0, 0.001))
        self._saved = (alarm, term, old_timer, time.monotonic())

    def disarm(self) -> None:
        """Put back the handlers and the timer found by `arm` (pytest-timeout's own alarm, say)."""
        if self._saved is None:
            return
        alarm, term, (delay, interval), armed_at = self._saved
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, alarm)
        signal.signal(signal.SIGTERM, term)
        if delay > 0:
            signal.setitimer(signal.ITIMER_REAL, max(delay - (time.monotonic() - armed_at), 0.001), interval)
        self._saved = None

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.timed_out = True
        if self._in_step:  # between steps only the flag: the pages being written are finished first
            raise TimeUp(signal.Signals(signum).name)

    def run(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)`, or None when it raised, was cut at the deadline, or was not started for lack of time."""
        left = self.left()
        if self.timed_out or (left is not None and left < MIN_STEP_S):
            why = ("the time limit was reached" if self.timed_out
                   else f"{max(left or 0.0, 0.0):.0f} s of the budget left")
            self.timed_out = True  # the steps after it have less still
            self.rows.append((name, 0.0, f"not run: {why}"))
            log.warning("gpu-check: %s: not run (%s)", name, why)
            return None
        t0 = time.perf_counter()
        try:
            self._in_step = True
            result, status = fn(*args), "ok"
        except TimeUp as err:
            result, status = None, f"cut: the time limit was reached ({err})"
            self._record_traceback(name)
        except (Exception, SystemExit) as err:  # the next step still deserves its minutes
            result, status = None, f"failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            self._record_traceback(name)
        finally:
            self._in_step = False
        self.rows.append((name, time.perf_counter() - t0, status))
        log.info("gpu-check: %s: %s (%.0f s)", name, status, self.rows[-1][1])
        return result

    def _record_traceback(self, name: str) -> None:
        with open(self.errors_file, "a") as f:
            f.write(f"## {name}\n{traceback.format_exc()}\n")

    def mark_failed(self, why: str) -> None:
        """The last step ran to its end but its outcome is a failure (e.g. a GPU test failed)."""
        name, secs, _ = self.rows[-1]
        self.rows[-1] = (name, secs, f"failed: {why}")

    @property
    def failures(self) -> int:
        """Steps that did not end ok: failed, cut at the deadline, or not run."""
        return sum(status != "ok" for *_, status in self.rows)

    def markdown(self) -> list[str]:
        """The Steps table: each step's seconds and status."""
        rows = [[name, fmt(secs, ".0f"), status] for name, secs, status in self.rows]
        budget = "" if self.deadline is None else f" (time budget left: {max(self.left() or 0.0, 0.0):.0f} s)"
        return [f"## Steps{budget}", "", *table(["step", "s", "status"], rows), ""]


def write_pages(steps: Steps, page: str, report_dir: Optional[Path]) -> None:
    """summary<label>.md in the results folder; in `report_dir`, also summary.md, errors.txt and results.tgz."""
    write_atomic(steps.out / f"summary{steps.label}.md", page.encode())
    if report_dir is None:
        return
    report_dir.mkdir(parents=True, exist_ok=True)
    errors = steps.errors_file.read_bytes() if steps.errors_file.exists() else b"no step has failed so far\n"
    write_atomic(report_dir / "summary.md", page.encode())
    write_atomic(report_dir / "errors.txt", errors)
    write_atomic(report_dir / "results.tgz", folder_tgz(steps.out))


def folder_tgz(folder: Path) -> bytes:
    """The results folder as a gzipped tar: under the repository as benchmarks/results/<id>/..., else by its name."""
    folder = folder.resolve()
    arcname = str(folder.relative_to(ROOT)) if folder.is_relative_to(ROOT) else folder.name
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(folder, arcname=arcname)
    return buf.getvalue()


def write_atomic(path: Path, data: bytes) -> None:
    """Write a file whole or not at all: a kill mid-write leaves the previous version in place."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
