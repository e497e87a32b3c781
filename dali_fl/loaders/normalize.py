"""Normalization constants, taken from the model's own pretrained config (timm)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and std in [0, 1] units, RGB order."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"need 3 means and 3 positive stds, got {self.mean}, {self.std}")

    def scaled(self, factor: float) -> tuple[list[float], list[float]]:
        """Mean and std in input units (x255 for uint8 input, as DALI's crop_mirror_normalize wants)."""
        return [m * factor for m in self.mean], [s * factor for s in self.std]


IMAGENET = Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def from_model(model: torch.nn.Module) -> Normalization:
    """The normalization a timm model was pretrained with (augreg ViTs use 0.5/0.5, not ImageNet's)."""
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    return Normalization(tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"]))


def from_model_name(name: str) -> Normalization:
    """Normalization of a timm model by name, without building it (falls back to ImageNet's)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or cfg.mean is None:
        return IMAGENET
    return Normalization(tuple(float(v) for v in cfg.mean), tuple(float(v) for v in cfg.std))
