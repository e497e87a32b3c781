"""LoRA pairs: each adapted layer's base weight, A, B and scale, as the LoRA aggregations and ranks see them."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class LoraPair:
    """One LoRA-adapted layer: the names of its base weight, A and B, and its scale."""

    base: str
    a: str
    b: str
    scale: float


def lora_pairs(model: nn.Module) -> list[LoraPair]:
    """The LoRA layers of a peft model, for aggregators that need B @ A (FedEx-LoRA)."""
    from peft.tuners.lora import LoraLayer

    pairs = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            pairs.append(LoraPair(f"{name}.base_layer.weight", f"{name}.lora_A.default.weight",
                                  f"{name}.lora_B.default.weight", float(module.scaling["default"])))
    return pairs
