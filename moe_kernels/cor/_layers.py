"""The MoE layers Counterfactual Routing works on (:func:`moe_kernels.layers.find_moe_layers`:
every :class:`moe_kernels.MoE` block and every MoE block of a Hugging Face model patched by
:func:`moe_kernels.integrations.transformers.apply_moe_kernels`, in ``model.modules()`` order)."""

from __future__ import annotations

from torch import nn

from moe_kernels.layers import MoELayer, find_moe_layers
from moe_kernels.routing_override import selection_override

__all__ = ["MoELayer", "find_moe_layers", "is_counterfactual_routing_applied", "uniform_num_experts"]


def is_counterfactual_routing_applied(model: nn.Module) -> bool:
    """Whether any router of ``model`` carries a Counterfactual Routing override."""
    return any(selection_override(module) is not None for module in model.modules())


def uniform_num_experts(layers: list[MoELayer], op: str) -> int:
    """The one E of every layer (a plan's prior is ``(L, E)``); ``ValueError`` when they differ."""
    counts = sorted({layer.num_experts for layer in layers})
    if len(counts) != 1:
        raise ValueError(f"{op}: every MoE layer must have the same number of experts, got {counts}")
    return counts[0]
