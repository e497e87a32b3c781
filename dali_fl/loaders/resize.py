"""Resizing on the training device (`--resize-to N`): the checks, and the torch kernel of the memmap kind.

A native-size store (e.g. `prep --image-size 32`) can be served at N x N by resizing each batch on the
device before crop, flip and normalize, instead of reading a store that `prep` resized offline. Both
paths use the interpolation recorded in the store's manifest. On the CPU the memmap kind runs the very
kernel prep runs (bit-exact); on CUDA, the float kernel rounded back to uint8 (asserted within one
intensity level by a GPU test). The dali kind's `fn.resize` is not prep's kernel: see
`dali_fl.loaders.dali.resize_node` for how far it differs (shrinking: up to 17 levels at the border).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from dali_fl.data.store import Store
from dali_fl.errors import DaliFlError

# A 1024 px ViT-B/16 input is 4,096 tokens, 16x the attention of 224 px: far beyond any run's need.
MAX_RESIZE_TO = 1024


def check_resize_to(value: object) -> Optional[int]:
    """`value` as the target side, or a DaliFlError unless it is None or an integer in 1..MAX_RESIZE_TO."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= MAX_RESIZE_TO:
        raise DaliFlError(f"--resize-to {value!r} must be an integer in 1..{MAX_RESIZE_TO} (the side of the "
                          "square images the model sees)")
    return int(value)


def refuse_resize(kind: str) -> DaliFlError:
    """The error for `--resize-to` with a kind that has no resize step."""
    return DaliFlError(f"--resize-to needs the dali or memmap loader; {kind} reproduces the old pipeline, "
                       "which has no resize step")


def interpolation(store: Store) -> str:
    """The interpolation the store's images were (or would have been) resized with: prep's choice."""
    return str(store.manifest.get("interpolation", "bilinear"))


def input_size(store: Store, resize_to: Optional[int]) -> int:
    """The side of the images the model sees: the resize target when set, else the store's."""
    return store.image_size if resize_to is None else int(resize_to)


def resize_nhwc(x: torch.Tensor, size: int, method: str) -> torch.Tensor:
    """Resize a uint8 NHWC batch to (size, size) on its device, as `prep` resizes (antialiased, uint8 out)."""
    nchw = x.permute(0, 3, 1, 2)  # a channels_last view: torch's fast uint8 path on the CPU
    if x.device.type == "cpu":
        # The same uint8 kernel dali_fl.data.resize.resize_batch runs at prep time: bit-identical to the store.
        out = F.interpolate(nchw, size=(size, size), mode=method, align_corners=False, antialias=True)
    else:  # CUDA's antialiased kernels take floating point only
        out = F.interpolate(nchw.float(), size=(size, size), mode=method, align_corners=False, antialias=True)
    if out.dtype != torch.uint8:
        out = out.round_().clamp_(0, 255).to(torch.uint8)
    return out.permute(0, 2, 3, 1).contiguous()
