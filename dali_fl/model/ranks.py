"""Heterogeneous LoRA ranks: which rank each client trains, and the one persistent model serving them all.

The model is built at the largest rank R. A client of rank r trains only the first r components: it
starts from the global factors truncated to A[:r], B[:, :r] (the rest zeroed, so their gradients are
exactly zero and they stay zero under SGD, Adam and weight decay) at its own scale alpha / r, as a
rank-r LoRA would. The server sees every client's factors zero-padded to R.
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import torch
from torch import nn

from dali_fl.errors import DaliFlError
from dali_fl.model.lora import LoraPair
from dali_fl.seeds import RANK, stream

MAX_RANK = 1024


def parse_ranks(spec: str, num_users: int, seed: int) -> np.ndarray:
    """Each client's rank from `8` (all), `2,4,8` (cycled over clients) or `uniform:2,4,8,16` (seeded draw)."""
    text = spec.strip()
    draw = text.startswith("uniform:")
    body = text[len("uniform:"):] if draw else text
    if not re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)*", body):
        raise DaliFlError(f"--lora-ranks {spec!r} does not parse; give 8, a list like 2,4,8, or uniform:2,4,8,16")
    values = [int(v) for v in body.split(",")]
    if not all(1 <= v <= MAX_RANK for v in values):
        raise DaliFlError(f"--lora-ranks {spec!r}: every rank must be in 1..{MAX_RANK}")
    if not draw and len(values) > num_users:
        raise DaliFlError(f"--lora-ranks lists {len(values)} ranks for {num_users} clients; give at most one per "
                          "client (the list is cycled over clients)")
    if draw:
        rng = stream(seed, RANK)
        return rng.choice(np.asarray(values), size=num_users)
    return np.resize(np.asarray(values), num_users)


def upload_values(pairs: Sequence[LoraPair], shapes: dict[str, tuple[int, ...]], rank: int, others: int) -> int:
    """Values a client of rank `rank` uploads: its A and B blocks plus the other trainable tensors."""
    # FFA-LoRA's A is frozen, so it is neither trainable nor sent: count only the factors exchanged.
    lora = sum(rank * (shapes[p.a][1] if p.a in shapes else 0) + rank * (shapes[p.b][0] if p.b in shapes else 0)
               for p in pairs)
    return lora + others


@torch.no_grad()
def truncate_(model: nn.Module, pairs: Sequence[LoraPair], rank: int, alpha: float) -> None:
    """Make the model a rank-`rank` LoRA: zero the components beyond it and set its scale alpha / rank."""
    params = dict(model.named_parameters())
    for p in pairs:
        params[p.a][rank:].zero_()
        params[p.b][:, rank:].zero_()
    set_scale(model, alpha / rank)


def set_scale(model: nn.Module, scale: float) -> None:
    """Set every LoRA layer's scale (peft keeps one per adapter)."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer) and "default" in module.scaling:
            module.scaling["default"] = scale
