"""The child-process protocol: measure one task in a fresh interpreter so its CPU and memory are its own.

The parent writes a spec (JSON) and runs `python -m <module> --child SPEC` from the repository root;
the child measures `spec["task"]` under `spec["settings"]` and writes its result to `spec["result"]`.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

from benchmarks.measure import ROOT

FLAG = "--child"


def add_child_flag(parser: argparse.ArgumentParser) -> None:
    """The internal option by which a benchmark runs as a child (hidden from --help)."""
    parser.add_argument(FLAG, type=Path, help=argparse.SUPPRESS)


def run_child(module: str, settings: dict, task: dict) -> dict:
    """Run one task in `python -m module` and return what it measured."""
    with tempfile.TemporaryDirectory() as tmp:
        spec, result = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec.write_text(json.dumps({"settings": settings, "task": task, "result": str(result)}))
        # from the repository root, so that `-m benchmarks.…` imports whatever the caller's cwd
        subprocess.run([sys.executable, "-m", module, FLAG, str(spec)], check=True, cwd=ROOT)
        return json.loads(result.read_text())


def serve_child(spec_path: Path, measure: Callable[[dict, dict], dict]) -> None:
    """The child's side: `measure(settings, task)` and write its result where the parent reads it."""
    spec = json.loads(Path(spec_path).read_text())
    Path(spec["result"]).write_text(json.dumps(measure(spec["settings"], spec["task"])))
