"""One client's local training on the shared persistent model, and evaluation."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dali_fl.config import LocalConfig, derive_seed


@dataclass(frozen=True)
class ClientResult:
    """What a client reports besides its weights: sample count, loss and where the time went."""

    num_samples: int
    loss: float
    data_wait_s: float
    compute_s: float
    steps: int = 0  # optimizer steps taken (SCAFFOLD's K)


def make_optimizer(params, cfg: LocalConfig) -> torch.optim.Optimizer:
    """A fresh optimizer per client (the seed's LocalUpdate did the same)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    params = list(params)
    # One fused kernel per step on the GPU; the CPU keeps torch's default (and its bitwise results).
    fused = bool(params) and all(p.is_cuda for p in params)
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


def local_train(model: nn.Module, loader, indices: np.ndarray, cfg: LocalConfig, seed: int,
                amp: Optional[torch.dtype], device: torch.device,
                correction: Optional[list[torch.Tensor]] = None) -> ClientResult:
    """Train `cfg.local_ep` epochs over the client's indices; returns its count, mean loss and timings.

    `correction` (SCAFFOLD's c - c_i, one tensor per trainable parameter) is added to every gradient.
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg)
    # FedProx's anchor: the round-start state the model holds now (none for FedAvg, which stays bitwise as before).
    anchor = [p.detach().clone() for p in params] if cfg.prox_mu > 0 else None
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    loss_sum = torch.zeros((), device=device)
    seen, steps, wait, start = 0, 0, 0.0, time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # dropout and friends: same stream on every run and resume
        for epoch in range(cfg.local_ep):
            batches = loader.epoch(indices, derive_seed(seed, epoch))
            while True:
                t0 = time.perf_counter()
                batch = next(batches, None)
                wait += time.perf_counter() - t0
                if batch is None:
                    break
                images, labels = batch
                with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                    loss = F.cross_entropy(model(images), labels)
                total = loss if anchor is None else loss + proximal_term(params, anchor, cfg.prox_mu)
                _step(opt, scaler, total, params, correction)
                loss_sum += loss.detach().float() * labels.shape[0]
                seen += labels.shape[0]
                steps += 1
    mean_loss = float(loss_sum) / max(seen, 1)  # one device sync per client
    elapsed = time.perf_counter() - start
    return ClientResult(len(indices), mean_loss, wait, elapsed - wait, steps)


def _step(opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, loss: torch.Tensor,
          params: list[torch.Tensor], correction: Optional[list[torch.Tensor]]) -> None:
    """One optimizer step on `loss`, with SCAFFOLD's gradient correction when given."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if correction is not None:
        scaler.unscale_(opt)  # the correction is in gradient units, not the loss scaler's
        for p, c in zip(params, correction):
            p.grad.add_(c.to(p.grad.dtype))
    scaler.step(opt)
    scaler.update()


def proximal_term(params: list[torch.Tensor], anchor: list[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx (Li et al., 2020): (mu/2) * sum ||w - w_round_start||^2 over the trainable tensors."""
    return 0.5 * mu * sum((p.float() - a.float()).pow(2).sum() for p, a in zip(params, anchor))


@torch.no_grad()
def evaluate(model: nn.Module, loader, indices: np.ndarray, amp: Optional[torch.dtype],
             device: torch.device) -> tuple[int, float]:
    """(number correct, summed loss) over the given samples of the loader's split, in order."""
    model.eval()
    correct = torch.zeros((), device=device, dtype=torch.long)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    if len(indices) == 0:
        return 0, 0.0
    for images, labels in loader.epoch(indices, 0, shuffle=False):
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(images)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum")
        correct += (logits.argmax(1) == labels).sum()
    return int(correct), float(loss_sum)
