"""Model FLOPs per trained image (torch's FlopCounterMode over one step) and device peaks, for TFLOP/s and MFU."""
from __future__ import annotations

import re
from typing import Optional

# Dense bf16 tensor-core peaks in TFLOP/s (vendor data sheets), by the whole device name torch reports: a word of
# it would give "NVIDIA L40" the L4's peak and an H100 PCIe the SXM part's.
PEAK_BF16_TFLOPS = ((r"nvidia (gh|h)200( \d+gb)?( hbm3e)?", 989.4), (r"nvidia h200 nvl", 835.5),
                    (r"nvidia h100 80gb hbm3|nvidia h100 sxm5 80gb", 989.4), (r"nvidia h100 pcie", 756.5),
                    (r"nvidia h100 nvl", 835.5), (r"nvidia a100[- ].*", 312.0), (r"nvidia l40s", 362.1),
                    (r"nvidia l40", 181.0), (r"nvidia l4", 121.0), (r"nvidia a10", 125.0))


def train_flops_per_image(model, image_size: int, device) -> float:
    """Forward and backward FLOPs of one image through `model`, counted on a batch of two (no optimizer step)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    gen = torch.Generator().manual_seed(0)  # not the global stream the run's seeds leave alone
    images = torch.randn(2, 3, image_size, image_size, generator=gen).to(device)
    labels = torch.zeros(2, dtype=torch.long, device=device)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(images), labels).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def peak_tflops(device_name: Optional[str]) -> Optional[float]:
    """The device's dense bf16 peak, or None for a CPU or a GPU this table does not know."""
    name = " ".join((device_name or "").lower().split())
    return next((peak for pattern, peak in PEAK_BF16_TFLOPS if re.fullmatch(pattern, name)), None)
