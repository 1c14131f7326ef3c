"""Applying a :class:`CoRPlan` to a model's routers, and removing it."""

from __future__ import annotations

from torch import nn

from moe_kernels.config import is_finite_number, real_number
from moe_kernels.cor._layers import find_moe_layers
from moe_kernels.cor.plan import CoRPlan
from moe_kernels.routing_override import clear_selection_override, set_selection_override


def apply_counterfactual_routing(model: nn.Module, plan: CoRPlan) -> nn.Module:
    """Route every MoE layer ``l`` of ``model`` by ``plan``: it selects ``plan.k[l]`` experts by the
    key ``scores + bias + plan.strength * plan.prior[l]`` (``scores`` the router's own softmax or
    sigmoid, ``bias`` its own selection bias, e.g. DeepSeek-V3's correction bias; group limits as
    configured), in its one :func:`moe_kernels.softmax_topk` call; the weights are the model's own
    for the chosen experts (its scores there, renormalised and scaled as its router does).

    Works on ``moe_kernels.MoE`` blocks with a :class:`moe_kernels.TopKRouter` and on HF models
    patched by ``apply_moe_kernels``. Applying again replaces the previous plan;
    :func:`revert_counterfactual_routing` restores the original routing bit for bit. The prior is
    copied to each router's device now (move the model first). Returns ``model``.

    Raises ``TypeError`` / ``ValueError`` (before changing anything) for a plan of another layer
    count or E, a ``k`` beyond a layer's selectable experts, a non-finite strength, a router that
    does not route with ``softmax_topk``, or a model without MoE layers.
    """
    op = "apply_counterfactual_routing"
    if not isinstance(plan, CoRPlan):
        raise TypeError(f"{op}: plan must be a moe_kernels.cor.CoRPlan, got {type(plan).__name__}")
    real_number(op, "plan.strength", plan.strength)
    if not is_finite_number(plan.strength):
        raise ValueError(f"{op}: plan.strength must be a finite number, got {plan.strength!r}")
    try:  # the fields may have been changed since the plan was built: validate them again
        plan = CoRPlan(plan.k, plan.prior, plan.strength)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{op}: {error}") from None
    layers = find_moe_layers(model, op)
    if plan.num_layers != len(layers):
        raise ValueError(f"{op}: the plan is for {plan.num_layers} MoE layers, the model has {len(layers)}")
    for layer in layers:
        where = f"layer {layer.index} ({layer.name})"
        if layer.routing is None:
            raise ValueError(
                f"{op}: {where} routes with {type(layer.router).__name__}; CoR re-routes TopKRouter and "
                "apply_moe_kernels-patched routers only"
            )
        if plan.num_experts != layer.num_experts:
            raise ValueError(f"{op}: the plan is for E={plan.num_experts} experts, {where} has {layer.num_experts}")
        k = int(plan.k[layer.index])
        if k > layer.eligible_experts:
            raise ValueError(
                f"{op}: plan.k[{layer.index}]={k} exceeds the {layer.eligible_experts} experts {where} can select"
            )
    for layer in layers:
        weight = layer.router.weight
        prior = (plan.prior[layer.index].double() * plan.strength).float().to(weight.device)
        set_selection_override(layer.router, int(plan.k[layer.index]), prior)
    return model


def revert_counterfactual_routing(model: nn.Module) -> nn.Module:
    """Remove every Counterfactual Routing override from ``model`` (a no-op without one): each
    router makes exactly the routing call it made before. Returns ``model``."""
    for module in model.modules():
        clear_selection_override(module)
    return model
