"""Batch resizing with torch, the one place prep and verify turn source pixels into stored ones."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dali_fl.errors import DaliFlError

METHODS = ("bilinear", "bicubic")
MAX_IMAGE_SIZE = 4096  # a 4096px side is 48 MB per RGB image: far beyond any model input


def resize_batch(images: np.ndarray, size: int, method: str = "bilinear") -> np.ndarray:
    """Resize uint8 NHWC images to (size, size) the way torchvision's Resize((size, size)) does."""
    # torch's antialiased uint8 kernel: the one transforms.v2.Resize runs on uint8 tensors (bit-exact),
    # a port of Pillow's (within one level of Resize on PIL images; bicubic at 7x: two, a few per million).
    if method not in METHODS:
        raise DaliFlError(f"unknown interpolation {method!r}; choose one of {', '.join(METHODS)}")
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise DaliFlError(f"expected uint8 images shaped (N, H, W, 3), got {images.dtype} {images.shape}")
    if min(images.shape[1:3], default=0) < 1:
        raise DaliFlError(f"cannot resize empty images shaped {images.shape}; each needs at least 1x1 pixels")
    # Checked here too, as the last guard: a size read from a damaged manifest must not allocate terabytes.
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 1 <= size <= MAX_IMAGE_SIZE:
        raise DaliFlError(f"cannot resize to {size!r} pixels; the size must be an integer in 1..{MAX_IMAGE_SIZE}")
    if images.shape[1:3] == (size, size):
        return np.ascontiguousarray(images)
    # NCHW view of an NHWC buffer is channels_last, which lets torch take its fast uint8 path.
    # torch wants a writable buffer (it never writes to it): copy only read-only inputs such as memmaps.
    x = torch.from_numpy(np.require(images, requirements=["C", "W"])).permute(0, 3, 1, 2)
    out = F.interpolate(x, size=(size, size), mode=method, align_corners=False, antialias=True)
    if out.dtype != torch.uint8:  # older torch or a method without a uint8 kernel
        out = out.round().clamp_(0, 255).to(torch.uint8)
    return np.ascontiguousarray(out.permute(0, 2, 3, 1).numpy())


def to_stored_dtype(images: np.ndarray, dtype: str) -> np.ndarray:
    """Convert resized uint8 pixels to the store's dtype (float32 means the seed's [0, 1] values)."""
    if dtype == "uint8":
        return images
    return images.astype(np.float32) / np.float32(255.0)
