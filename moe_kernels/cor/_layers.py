"""The MoE layers Counterfactual Routing works on: every :class:`moe_kernels.MoE` block and every
MoE block of a Hugging Face model patched by
:func:`moe_kernels.integrations.transformers.apply_moe_kernels`, in ``model.modules()`` order."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from moe_kernels.config import RoutingConfig
from moe_kernels.nn import MoE, TopKRouter
from moe_kernels.routing_override import selection_override

# The key apply_moe_kernels leaves in a patched router's __dict__ (its RoutingConfig); read through
# the public ``routing_config`` of the integration, imported lazily (it imports no transformers).
_HF_ROUTER_ATTRS = ("gate", "router")


@dataclass(frozen=True)
class MoELayer:
    """One MoE layer of a model.

    ``block``: the module whose output is the layer's output (``MoE``, or the HF block, whose
    GPT-OSS forward returns ``(hidden, router_scores)``); ``router``: the module returning the
    routing, ``(weights (T, k), ids (T, k))`` for ``MoE`` routers, ``(router_logits, weights, ids)``
    for patched HF routers (``weights_at`` is the index of ``weights`` in that tuple);
    ``num_experts`` E; ``k`` the router's own experts per token (without a CoR override);
    ``routing`` its :class:`~moe_kernels.RoutingConfig` when it routes with ``softmax_topk``
    (None for other routers, which CoR can analyse but not re-route).
    """

    index: int
    name: str
    block: nn.Module
    router: nn.Module
    num_experts: int
    k: int
    routing: RoutingConfig | None
    weights_at: int

    @property
    def eligible_experts(self) -> int:
        """How many experts a token can select (the kept groups' experts under a group limit)."""
        return self.num_experts if self.routing is None else self.routing.eligible_experts(self.num_experts)


def _hf_router(module: nn.Module):
    """``(router, RoutingConfig)`` when ``module`` is an MoE block patched by apply_moe_kernels."""
    if "experts" not in module._modules:
        return None
    for attr in _HF_ROUTER_ATTRS:
        router = module._modules.get(attr)
        if router is not None and "_moe_kernels_routing" in router.__dict__:
            from moe_kernels.integrations.transformers import routing_config

            return router, routing_config(router)
    return None


def _looks_like_unpatched_hf_block(module: nn.Module) -> bool:
    experts = module._modules.get("experts")
    return experts is not None and hasattr(experts, "gate_up_proj") and not isinstance(module, MoE)


def find_moe_layers(model: nn.Module, op: str) -> list[MoELayer]:
    """The MoE layers of ``model`` in ``model.modules()`` order; ``ValueError`` naming ``op`` when
    there is none (with a hint when the model has HF MoE blocks that were not patched)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{op}: model must be a torch.nn.Module, got {type(model).__name__}")
    layers, unpatched = [], 0
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            router = module.router
            routing = router.routing if isinstance(router, TopKRouter) else None
            k = getattr(router, "k", None)
            if not isinstance(k, int):
                raise ValueError(f"{op}: the router of MoE block {name!r} ({type(router).__name__}) has no int k")
            layer = MoELayer(len(layers), name, module, router, module.gate_up_proj.shape[0], k, routing, 0)
            layers.append(layer)
            continue
        found = _hf_router(module)
        if found is not None:
            router, routing = found
            num_experts, k = router.weight.shape[0], int(router.top_k)
            layers.append(MoELayer(len(layers), name, module, router, num_experts, k, routing, 1))
        elif _looks_like_unpatched_hf_block(module):
            unpatched += 1
    if not layers:
        hint = (
            f" ({unpatched} Hugging Face MoE blocks are not patched: call "
            "moe_kernels.integrations.transformers.apply_moe_kernels(model) first)"
            if unpatched
            else ""
        )
        raise ValueError(
            f"{op}: the model has no MoE layers (moe_kernels.MoE blocks or HF MoE blocks patched by "
            f"apply_moe_kernels){hint}"
        )
    return layers


def is_counterfactual_routing_applied(model: nn.Module) -> bool:
    """Whether any router of ``model`` carries a Counterfactual Routing override."""
    return any(selection_override(module) is not None for module in model.modules())


def uniform_num_experts(layers: list[MoELayer], op: str) -> int:
    """The one E of every layer (a plan's prior is ``(L, E)``); ``ValueError`` when they differ."""
    counts = sorted({layer.num_experts for layer in layers})
    if len(counts) != 1:
        raise ValueError(f"{op}: every MoE layer must have the same number of experts, got {counts}")
    return counts[0]
