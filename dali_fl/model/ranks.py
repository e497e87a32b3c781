"""Heterogeneous LoRA ranks: which rank each client trains, and the one persistent model serving them all.

The model is built at the largest rank R. A client of rank r trains only the first r components: it
starts from the global factors truncated to A[:r], B[:, :r] (the rest zeroed, so their gradients are
exactly zero and they stay zero under SGD, Adam and weight decay) at its own scale alpha / r, as a
rank-r LoRA would. The server sees every client's factors zero-padded to R.
"""
from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np
import torch
from torch import nn

from dali_fl.engine.aggregate import LoraPair
from dali_fl.errors import DaliFlError

MAX_RANK = 1024
RANK_STREAM = 17  # keeps the rank draw apart from the run's other random streams


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
        rng = np.random.default_rng([seed, RANK_STREAM])
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


@torch.no_grad()
def reinit_adapters_(model: nn.Module, pairs: Sequence[LoraPair], seed: int) -> None:
    """A fresh adapter (FLoRA's next round): A as peft initialises it, from a seeded stream; B = 0."""
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    for p in pairs:
        a = torch.empty(params[p.a].shape)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)  # peft's default init of lora_A
        params[p.a].copy_(a)
        params[p.b].zero_()
