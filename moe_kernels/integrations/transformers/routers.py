"""The router side of the HF integration: each family's router forward on ``softmax_topk`` (each
returns what the HF router returns, ``(router_logits, weights, ids int64)``) and the
:class:`~moe_kernels.RoutingConfig` of each family's formula."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_kernels.config import RoutingConfig
from moe_kernels.functional import softmax_topk
from moe_kernels.integrations.transformers.common import BACKEND, ROUTING
from moe_kernels.layers import run_taps
from moe_kernels.routing_override import resolve_selection


def _route(router, logits, bias=None):
    """``(weights, ids, logits)``: ``softmax_topk`` under the router's taps (the logits are those
    routed from: a tap may replace them)."""
    k, bias = resolve_selection(router, router.top_k, bias)  # Counterfactual Routing's k and prior, if set
    routing, backend = router.__dict__[ROUTING], router.__dict__.get(BACKEND, "auto")

    def select(values, ids):
        return softmax_topk(values, k, routing=routing, bias=bias, ids=ids, backend=backend)

    return run_taps(router, logits, k, select)


def routing_config(router: nn.Module) -> RoutingConfig:
    """The :class:`~moe_kernels.RoutingConfig` a router patched by :func:`apply_moe_kernels` routes
    with (its family's formula from its config, or the ``routing`` given to the patch)."""
    routing = router.__dict__.get(ROUTING)
    if routing is None:
        raise ValueError(f"routing_config: {type(router).__name__} is not a router patched by apply_moe_kernels")
    return routing


def mixtral_router_forward(self, hidden_states):
    """Mixtral: softmax in float32, top-k, renormalised; float32 weights (HF keeps them so)."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states, self.weight)
    weights, ids, router_logits = _route(self, router_logits)
    return router_logits, weights, ids.long()


def softmax_router_forward(self, hidden_states):
    """Qwen2-MoE, Qwen3-MoE, OLMoE: softmax in float32, top-k, renormalised if
    ``norm_topk_prob``; weights cast to the logits' dtype, as HF does."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states, self.weight)
    weights, ids, router_logits = _route(self, router_logits)
    return router_logits, weights.to(router_logits.dtype), ids.long()


def deepseek_v3_router_forward(self, hidden_states):
    """DeepSeek-V3 (noaux_tc): float32 logits, sigmoid, selection-only correction bias, group
    top-2-sum masking, top-k, optional renormalisation (+1e-20), routed scaling; float32 weights."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))
    weights, ids, router_logits = _route(self, router_logits, bias=self.e_score_correction_bias.float())
    return router_logits, weights, ids.long()


def gpt_oss_router_forward(self, hidden_states):
    """GPT-OSS: logits with the router bias, top-k on the logits, softmax over the k values (=
    the renormalised full softmax); weights cast to the logits' dtype, as HF's softmax has them."""
    router_logits = F.linear(hidden_states, self.weight, self.bias)
    weights, ids, router_logits = _route(self, router_logits)
    return router_logits, weights.to(router_logits.dtype), ids.long()


def renormalized_routing(router) -> RoutingConfig:
    return RoutingConfig.renormalize()


def softmax_routing(router) -> RoutingConfig:
    return RoutingConfig(renormalize=bool(router.norm_topk_prob))


def deepseek_v3_routing(router) -> RoutingConfig:
    num_groups, topk_groups = router.num_group, router.topk_group
    if not num_groups or num_groups <= 1 or topk_groups is None or topk_groups >= num_groups:
        num_groups = topk_groups = None  # every group kept: no masking
    return RoutingConfig.deepseek_v3(
        num_groups=num_groups and int(num_groups),
        topk_groups=topk_groups and int(topk_groups),
        scale=float(router.routed_scaling_factor),
        renormalize=bool(router.norm_topk_prob),
    )
