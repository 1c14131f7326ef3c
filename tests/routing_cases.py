"""Routing configurations shared by the reference, kernel and registration tests."""

from __future__ import annotations

import pytest
import torch

from moe_kernels import testing
from moe_kernels.config import RoutingConfig

# (id, E, k, options, with_bias): every routing style, groups and bias, odd E.
ROUTING_CASES = [
    ("softmax", 60, 4, {}, False),
    ("softmax-renorm", 8, 2, dict(renormalize=True), False),
    ("sigmoid-renorm-scale", 257, 7, dict(score_func="sigmoid", renormalize=True, scale=2.5), False),
    ("softmax-bias", 64, 8, {}, True),
    ("dsv2-groups-max", 160, 6, dict(num_groups=8, topk_groups=3, group_score="max", scale=16.0), False),
    (
        "dsv3-sigmoid-bias-top2",
        256,
        8,
        dict(score_func="sigmoid", num_groups=8, topk_groups=4, renormalize=True, scale=2.5),
        True,
    ),
    (
        "sigmoid-bias-groups-max",
        60,
        5,
        dict(score_func="sigmoid", num_groups=6, topk_groups=2, group_score="max"),
        True,
    ),
]

routing_cases = pytest.mark.parametrize(
    "num_experts,k,options,with_bias", [pytest.param(*case[1:], id=case[0]) for case in ROUTING_CASES]
)


def routing_inputs(num_tokens, num_experts, options, with_bias, dtype=torch.float32, device="cpu", seed=0):
    """Tie-free logits and the bias (or None) for one case."""
    bias = testing.make_bias(num_experts, seed=seed + 1) if with_bias else None
    routing = RoutingConfig(**options)
    logits = testing.make_routing_logits(num_tokens, num_experts, dtype, routing=routing, bias=bias, seed=seed)
    return logits.to(device), None if bias is None else bias.to(device)


def non_finite_logits(score_func: str, device="cpu") -> torch.Tensor:
    """(6, 12) logits with a NaN (row 0), all NaN (1), a +inf (2), all -inf (3), a -inf (4) and
    every other entry NaN (5)."""
    logits = testing.make_routing_logits(6, 12, routing=RoutingConfig(score_func=score_func), device=device)
    logits[0, 3] = float("nan")
    logits[1, :] = float("nan")
    logits[2, 7] = float("inf")
    logits[3, :] = float("-inf")
    logits[4, 2] = float("-inf")
    logits[5, ::2] = float("nan")
    return logits
