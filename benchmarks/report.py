"""Where results go and how they are written: one folder per machine and day, markdown tables."""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Iterable, Optional, Sequence

from benchmarks.measure import ROOT

RESULTS = ROOT / "benchmarks" / "results"


def results_dir(machine: dict, out: Optional[Path] = None) -> Path:
    """`out` if given, else benchmarks/results/<machine-id>-<YYYYMMDD>/."""
    return out or RESULTS / f"{machine['id']}-{dt.date.today():%Y%m%d}"


def fmt(value: Optional[float], spec: str = ".2f", none: str = "n/a") -> str:
    """A figure formatted for a table, or `none` where it was not measured."""
    return none if value is None else format(value, spec)


def table(columns: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """Markdown table lines: the first column (the loader) left-aligned, the figures right-aligned."""
    return ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1),
            *("| " + " | ".join(row) + " |" for row in rows)]


def federation_page(doc: dict, title: str, settings: str, cols: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A suite's page: its title and machine, the command, what the federation was, then its table."""
    m = doc["machine"]
    return "\n".join([f"# {title} on a non-IID federation ({m['cpu']}, {m['cores']} cores, {m['gpu'] or 'no GPU'})",
                      "", f"`{doc['command']}`", "", settings, "", *table(cols, rows), ""])


def with_ext(stem: Path, ext: str) -> Path:
    """`stem` + `ext`; unlike Path.with_suffix, a dot inside the stem (alpha0.1) is kept."""
    return stem.parent / (stem.name + ext)


def write_results(stem: Path, doc: dict, md: str) -> Path:
    """`stem`.json (the document) and `stem`.md (its tables); returns `stem`."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    with_ext(stem, ".json").write_text(json.dumps(doc, indent=2))
    with_ext(stem, ".md").write_text(md)
    return stem
