"""One client's local training on the shared persistent model, and evaluation."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dali_fl.seeds import derive_seed

if TYPE_CHECKING:
    from dali_fl.algorithms.base import LocalTerm
    from dali_fl.config import LocalConfig


@dataclass(frozen=True)
class ClientResult:
    """What a client reports besides its weights: sample count, loss and where the time went."""

    num_samples: int
    loss: float
    data_wait_s: float
    compute_s: float
    steps: int = 0  # optimizer steps taken (algorithms that normalise by local steps read it)
    skipped_steps: int = 0  # steps fp16's loss scaler skipped on an inf or NaN gradient (not in `steps`)


def make_optimizer(params, cfg: LocalConfig) -> torch.optim.Optimizer:
    """A fresh optimizer per client (the seed's LocalUpdate did the same)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    params = list(params)
    # One fused kernel per step on the GPU; the CPU keeps torch's default (and its bitwise results).
    fused = bool(params) and all(p.is_cuda for p in params)
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


def trainable_params(model: nn.Module) -> list[torch.Tensor]:
    """The parameters local training steps, in the model's order (the order of every per-parameter term)."""
    return [p for p in model.parameters() if p.requires_grad]


def local_train(model: nn.Module, loader, indices: np.ndarray, cfg: LocalConfig, seed: int,
                amp: Optional[torch.dtype], device: torch.device, terms: Sequence[LocalTerm] = ()) -> ClientResult:
    """Train `cfg.local_ep` epochs over the client's indices; returns its count, mean loss and timings.

    `terms` are the algorithms' additions to every step: loss terms (a proximal term) and gradient
    corrections (control variates); without them this is plain local training, bitwise.
    """
    model.train()
    params = trainable_params(model)
    opt = make_optimizer(params, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    loss_sum = torch.zeros((), device=device)
    seen, steps, skipped, wait, start = 0, 0, 0, 0.0, time.perf_counter()
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
                total = loss
                for term in terms:
                    extra = term.loss(params)
                    if extra is not None:
                        total = total + extra
                taken = _step(opt, scaler, total, params, terms)
                loss_sum += loss.detach().float() * labels.shape[0]
                seen += labels.shape[0]
                steps += taken
                skipped += not taken
    mean_loss = float(loss_sum) / max(seen, 1)  # one device sync per client
    elapsed = time.perf_counter() - start
    return ClientResult(len(indices), mean_loss, wait, elapsed - wait, steps, skipped)


def _step(opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, loss: torch.Tensor,
          params: list[torch.Tensor], terms: Sequence[LocalTerm]) -> bool:
    """One optimizer step on `loss`, with the terms' gradient corrections in gradient units; False when fp16's loss
    scaler skipped it."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    correcting = [t for t in terms if t.corrects_grads]
    if correcting:
        scaler.unscale_(opt)  # the corrections are in gradient units, not the loss scaler's
        for term in correcting:
            term.correct_(params)
    if not scaler.is_enabled():
        opt.step()
        return True
    # The scaler halves its scale exactly when it skips the step. scaler.step already waits for the device to
    # learn whether a gradient is inf, so reading the scale costs no further sync.
    scale = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    return scaler.get_scale() >= scale


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
