"""Choosing the training device, and explaining CUDA failures in one line."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from dali_fl.errors import DaliFlError


def resolve_device(gpu: Optional[int], device: Optional[str]) -> torch.device:
    """`--gpu N` means cuda:N; `--device cpu|cuda|cuda:N` is the general form; default is cuda:0 or cpu."""
    if gpu is not None and gpu < 0:
        raise DaliFlError(f"--gpu {gpu} is not a GPU index; give 0 for the first GPU (nvidia-smi lists them)")
    if gpu is not None and device not in (None, f"cuda:{gpu}"):
        raise DaliFlError(f"--gpu {gpu} and --device {device} disagree; give one of them")
    spec = f"cuda:{gpu}" if gpu is not None else device
    if spec is None:
        spec = "cuda:0" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise DaliFlError(f"--device {spec!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise DaliFlError(f"--device {spec}: only cpu and cuda are supported")
    if not torch.cuda.is_available():
        raise DaliFlError(f"{'--gpu ' + str(gpu) if gpu is not None else '--device ' + spec}: CUDA is not "
                          "available on this machine (no GPU or driver); use --device cpu")
    index = 0 if dev.index is None else dev.index
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        names = ", ".join(f"{i}: {torch.cuda.get_device_name(i)}" for i in range(count))
        raise DaliFlError(f"--gpu {index}: this machine has {count} GPU(s) ({names}); pick one of 0..{count - 1}")
    # TF32 matmuls and convolutions: the speed any Ampere-or-newer user expects; bf16 autocast covers the rest.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return torch.device("cuda", index)


def amp_dtype(mode: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype: bf16 on GPU by default, off on CPU (CPU autocast is slower here)."""
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" else "off"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[mode]


@contextlib.contextmanager
def explain_oom(device: torch.device) -> Iterator[None]:
    """Turn CUDA out-of-memory into a one-line message with used/total memory and what to lower."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        free, total = torch.cuda.mem_get_info(device)
        raise DaliFlError(f"CUDA out of memory on {device}: {(total - free) / 2**30:.1f} of {total / 2**30:.1f} GiB "
                          "in use; lower --local-bs or --eval-bs, or use --amp bf16 / --alg fedlora") from None


def peak_memory_mb(device: torch.device) -> Optional[float]:
    """Peak allocated GPU memory since the last reset, or None on CPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20
