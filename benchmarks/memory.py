"""Host memory of a process tree from Linux /proc: RSS, and PSS split by what the pages hold."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

import psutil

FAST_FIELDS = ("rss", "rss_anon")  # /proc/PID/status counters: cheap, sampled every interval
SLOW_FIELDS = ("pss", "pss_anon", "pss_file", "pss_store")  # page-table walks: sampled less often
STORE_FILES = "_images.npy"  # the store's image arrays, memory-mapped by every loader kind


def _kib_fields(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"^(\w+):\s+(\d+) kB", text, re.M)}


def fast_memory(pid: int) -> dict[str, int]:
    """RSS and its anonymous part (heaps, tensors, buffers) of one process, in bytes."""
    kib = _kib_fields(Path(f"/proc/{pid}/status").read_text())
    return {"rss": kib["VmRSS"] << 10, "rss_anon": kib.get("RssAnon", 0) << 10}


def store_pss_kib(pid: int, store_dir: str) -> int:
    """PSS in KiB of the store's image files mapped by one process (a walk over every mapping)."""
    store, in_store = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if line[0] in "0123456789abcdef":  # a mapping's header line; field lines start uppercase
                # this run's store (or its -f32 sibling, for memmap-seed) only, not other open stores
                mapped = line.rstrip().split(maxsplit=5)[5:]
                in_store = bool(mapped) and mapped[0].endswith(STORE_FILES) and \
                    mapped[0].startswith((store_dir + os.sep, store_dir + "-f32" + os.sep))
            elif in_store and line.startswith("Pss:"):
                store += int(line.split()[1])
    return store


def slow_memory(pid: int, store_dir: Optional[str]) -> dict[str, int]:
    """PSS of one process, split into anonymous, file-backed, and (given its folder) the store's pages."""
    kib = _kib_fields(Path(f"/proc/{pid}/smaps_rollup").read_text())
    store = store_pss_kib(pid, store_dir) if store_dir else 0
    return {"pss": kib["Pss"] << 10, "pss_anon": kib.get("Pss_Anon", 0) << 10,
            "pss_file": kib.get("Pss_File", 0) << 10, "pss_store": store << 10}


def tree_memory(store_dir: Optional[str], slow: bool = True) -> dict[str, int]:
    """Memory figures in bytes summed over this process and its descendants."""
    me = psutil.Process()
    total = dict.fromkeys(FAST_FIELDS + (SLOW_FIELDS if slow else ()), 0)
    for proc in [me, *me.children(recursive=True)]:
        try:
            parts = {**fast_memory(proc.pid), **(slow_memory(proc.pid, store_dir) if slow else {})}
        except (OSError, KeyError):  # exited meanwhile
            continue
        for k, v in parts.items():
            total[k] += v
    return total
