"""What every benchmark records besides its figures: tree CPU time, the machine, the command line."""
from __future__ import annotations

import os
import platform
import re
import resource
from pathlib import Path
from typing import Optional

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent  # the repository
MIB = 1 << 20


def tree_cpu_seconds() -> float:
    """User+system CPU of this process (all threads), its live descendants and its reaped children."""
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:  # gone between listing and reading; counted below once reaped
            pass
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    return total + reaped.ru_utime + reaped.ru_stime


def slug(text: str) -> str:
    """Lower-case words joined by dashes, for file and machine names."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def machine_info(device: str, threads: Optional[int] = None) -> dict:
    """What the numbers were measured on (no host names, no paths); DALI's version None where it is missing."""
    import torch

    try:
        import nvidia.dali

        dali: Optional[str] = nvidia.dali.__version__
    except ImportError:  # the GPU check's stores are made before DALI's parts have all arrived
        dali = None

    cpu = platform.processor() or "unknown CPU"
    try:
        cpu = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text()).group(1).strip()
    except (OSError, AttributeError):
        pass
    cores = len(os.sched_getaffinity(0))
    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None
    return {"id": slug(gpu) if gpu else f"cpu{cores}-{slug(cpu)}", "cpu": cpu, "cores": cores,
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "gpu": gpu, "device": device,
            "torch_threads": threads or torch.get_num_threads(), "torch": torch.__version__,
            "dali": dali, "numpy": np.__version__, "python": platform.python_version()}


def shown_path(path: "str | os.PathLike") -> str:
    """A path as results may show it: relative to the repository, or a placeholder outside it."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else "<outside-repo>"


def command_line(module: str, argv: list[str]) -> str:
    """The command as run, with absolute paths made repository-relative (or hidden outside it)."""
    return " ".join(["python -m", module, *(shown_path(w) if os.path.isabs(w) else w for w in argv)])
