"""Torch versions of the DALI pipeline's crop, flip and normalize, for the memmap kinds."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dali_fl.loaders.normalize import Normalization
from dali_fl.loaders.order import PAD, Batch

Tensor = torch.Tensor


def crop_flip(x: Tensor, flip: Tensor, offsets: Tensor, pad: int = PAD) -> Tensor:
    """Zero-pad NHWC images by `pad`, take each HxW crop at (dy, dx), mirror where `flip`."""
    padded = F.pad(x, (0, 0, pad, pad, pad, pad))  # zeros in pixel space, before normalization
    # One gather kernel on the GPU; on the CPU per-sample slices are about 4x faster.
    crop = gather_crop_flip if x.is_cuda else sliced_crop_flip
    return crop(padded, flip, offsets, pad)


def gather_crop_flip(padded: Tensor, flip: Tensor, offsets: Tensor, pad: int = PAD) -> Tensor:
    """Crop + mirror of padded NHWC images as one advanced-indexing gather."""
    n, hp, wp, _ = padded.shape
    ar_h = torch.arange(hp - 2 * pad, device=padded.device)
    ar_w = torch.arange(wp - 2 * pad, device=padded.device)
    rows = offsets[:, :1].long() + ar_h  # (n, h)
    # Mirroring the crop is reading its columns backwards.
    cols = offsets[:, 1:].long() + torch.where(flip[:, None], ar_w.flip(0), ar_w)  # (n, w)
    batch = torch.arange(n, device=padded.device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]]


def sliced_crop_flip(padded: Tensor, flip: Tensor, offsets: Tensor, pad: int = PAD) -> Tensor:
    """Crop + mirror of padded NHWC images, one slice per sample."""
    n, hp, wp, c = padded.shape
    h, w = hp - 2 * pad, wp - 2 * pad
    out = padded.new_empty((n, h, w, c))
    for i, (f, (dy, dx)) in enumerate(zip(flip.tolist(), offsets.tolist())):
        crop = padded[i, dy:dy + h, dx:dx + w]
        out[i] = crop.flip(1) if f else crop
    return out


def batch_params(batch: Batch, device: torch.device) -> tuple[Tensor, Tensor]:
    """A plan batch's flip and offsets as tensors on `device`."""
    flip = torch.from_numpy(batch.flip).to(device, non_blocking=True)
    offsets = torch.from_numpy(np.ascontiguousarray(batch.offsets)).to(device, non_blocking=True)
    return flip, offsets


class Uint8Normalizer:
    """uint8 NHWC on the device -> normalized NCHW, the arithmetic of crop_mirror_normalize."""

    def __init__(self, norm: Normalization, device: torch.device, out_dtype: torch.dtype) -> None:
        mean, std = norm.scaled(255.0)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        # DALI multiplies by 1/std rather than dividing; doing the same keeps kinds within 1 ulp.
        inv_std = 1.0 / torch.tensor(std, dtype=torch.float32, device=device)
        self.inv_std = inv_std.view(1, 3, 1, 1)
        self.out_dtype = out_dtype

    def __call__(self, x: Tensor) -> Tensor:
        n, h, w, c = x.shape
        # Converting straight into an NCHW float buffer, then normalizing in place, is several
        # times faster on the CPU than permute().float() arithmetic; the values are the same.
        y = torch.empty((n, c, h, w), dtype=torch.float32, device=x.device)
        y.copy_(x.permute(0, 3, 1, 2))
        return y.sub_(self.mean).mul_(self.inv_std).to(self.out_dtype)
