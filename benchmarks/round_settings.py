"""What a round benchmark run measures: bench defaults, then a preset, then the flags, as one frozen dataclass."""
from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from benchmarks.measure import ROOT

# Defaults sized for a small CPU machine; a --preset replaces them, explicit flags win over both.
DEFAULTS = dict(alg="fedavg", model="vit_tiny_patch16_224", model_kwargs="depth=2", image_size=224,
                num_train=2000, num_users=10, frac=0.2, local_ep=1, local_bs=32, lr=3e-4,
                partition="iid", alpha=0.5)
PRESET_KEYS = tuple(DEFAULTS)  # what a preset may set here (its rounds, eval and weights do not apply)
RESIZE = "-resize"  # kind suffix: read the --native-size store and resize to the image size on the device
KIND_BASES = ("dali", "dali-gpu", "memmap", "memmap-seed", "dali-resize", "dali-gpu-resize", "memmap-resize")
# Taken from the flags as given (the rest is merged with the defaults and the preset).
AS_GIVEN = ("preset", "pretrained", "workers", "threads", "amp", "augment", "rounds", "seed", "scaling",
            "scaling_clients", "native_size", "compile", "gpu_mem_gib")
RUN_ONLY = ("data_dir", "out", "in_process", "plot", "label")  # how to run, not what is measured: not recorded


@dataclass(frozen=True)
class Settings:
    """One run's settings; `record()` is what the results keep of them."""

    alg: str
    model: str
    model_kwargs: str
    image_size: int
    num_train: int
    num_users: int
    frac: float
    local_ep: int
    local_bs: int
    lr: float
    partition: str
    alpha: float
    preset: Optional[str]
    pretrained: bool
    workers: int
    threads: Optional[int]
    amp: str
    augment: bool
    rounds: int
    seed: int
    scaling: bool
    scaling_clients: int
    device: str
    kinds: tuple[str, ...]
    scaling_users: tuple[int, ...]
    scaling_sizes: tuple[int, ...]
    native_size: int = 32
    compile: bool = False
    gpu_mem_gib: Optional[float] = None  # torch's CUDA allocator capped at this (a smaller card's memory)
    data_dir: Path = ROOT / "data" / "bench-round"
    out: Optional[Path] = None
    in_process: bool = False
    plot: bool = True
    label: str = ""  # appended to the results' file stem

    def __post_init__(self) -> None:
        # JSON (the child's spec) brings lists and strings back; keep the declared types
        for name in ("kinds", "scaling_users", "scaling_sizes"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        # absolute: children run from the repository root, not the caller's directory
        object.__setattr__(self, "data_dir", Path(self.data_dir).resolve())

    def record(self) -> dict:
        """The settings as written in the results (JSON types, no run-only fields)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in dataclasses.fields(self) if f.name not in RUN_ONLY}


def settings_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Settings:
    """Settings: bench defaults, then the preset's values, then the flags given explicitly."""
    from dali_fl.config import PRESETS

    if args.preset is not None and args.preset not in PRESETS:
        parser.error(f"unknown --preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
    preset = {k: v for k, v in PRESETS.get(args.preset, {}).items() if k in PRESET_KEYS}
    base = {**DEFAULTS, "model_kwargs": ""} if args.preset else DEFAULTS  # no depth=2 on a preset's model
    s = {**base, **preset, **{k: getattr(args, k) for k in DEFAULTS if getattr(args, k) is not None}}
    if args.scaling and args.num_train is None:
        s["num_train"] = 10_000
    s.update({k: getattr(args, k) for k in AS_GIVEN})
    s["device"] = resolve_device_name(args.device, parser)
    s["kinds"] = parse_kinds(args.kinds, s["device"], args.scaling, parser)
    s["scaling_users"] = int_list(args.scaling_users, "--scaling-users", parser)
    s["scaling_sizes"] = int_list(args.scaling_sizes, "--scaling-sizes", parser)
    if args.rounds < 1 or s["num_train"] < s["local_bs"]:
        parser.error("need --rounds >= 1 and --num-train >= --local-bs (the bound caches one full batch)")
    if args.gpu_mem_gib is not None and args.gpu_mem_gib <= 0:
        parser.error(f"--gpu-mem-gib wants a positive number of GiB, got {args.gpu_mem_gib}")
    if args.scaling and max(s["scaling_users"]) > s["num_train"]:
        parser.error(f"--num-train {s['num_train']} is smaller than {max(s['scaling_users'])} clients")
    if args.label and not re.fullmatch(r"[A-Za-z0-9_-]+", args.label):
        parser.error(f"--label {args.label!r}: letters, digits, '-' and '_' only (it names files)")
    return Settings(**s, data_dir=args.data_dir, out=args.out, in_process=args.in_process, plot=not args.no_plot,
                    label=args.label or "")


def resolve_device_name(device: Optional[str], parser: argparse.ArgumentParser) -> str:
    """The torch device to run on: cuda:0 when present unless told otherwise."""
    import torch

    if device is None:
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return device


def parse_kinds(text: Optional[str], device: str, scaling: bool, parser: argparse.ArgumentParser) -> list[str]:
    """Kind labels to measure; `dali-gpu` is dropped from the default list on a CPU-only run."""
    on_gpu = device.startswith("cuda")
    if text is None:
        default = ["dali", "memmap"] if scaling else ["dali", "dali-gpu", "memmap", "memmap-seed"]
        return [k for k in default if on_gpu or k != "dali-gpu"]
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    for k in kinds:
        base, _, workers = k.partition("@")
        workers_ok = not workers or (base in ("memmap", "memmap" + RESIZE) and workers.isdigit())
        if base not in KIND_BASES or not workers_ok:
            parser.error(f"unknown kind {k!r}; choose from {', '.join(KIND_BASES)} or memmap[-resize]@N")
        if base.startswith("dali-gpu") and not on_gpu:
            parser.error("kind dali-gpu (--data-on-gpu) needs a CUDA device")
    return kinds


def int_list(text: str, flag: str, parser: argparse.ArgumentParser) -> list[int]:
    """Positive integers separated by commas, or a usage error naming `flag`."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        parser.error(f"{flag} wants positive integers separated by commas, got {text!r}")
    return values
