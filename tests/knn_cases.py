"""Inputs and option sets shared by the kNN family's tests (``knn_mix``, ``knn_route``,
``knn_route_assignments``)."""

from __future__ import annotations

import pytest
import torch
from routing_cases import ROUTING_CASES

from moe_kernels import testing
from moe_kernels.config import KnnMixing, RoutingConfig
from moe_kernels.functional.knn import knn_mix
from moe_kernels.functional.routing import softmax_topk
from moe_kernels.reference import knn as knn_ref
from moe_kernels.reference import routing as routing_ref

MIXINGS = [
    dict(weighting="similarity"),
    dict(weighting="softmax", temperature=0.1),
    dict(weighting="similarity", min_confidence=0.5),
]
MIXING_IDS = ["similarity", "softmax", "fallback-0.5"]
mixings = pytest.mark.parametrize("mixing", MIXINGS, ids=MIXING_IDS)

# (id, E, k, routing options, with bias): a subset of the routing tests' cases, one per style.
ROUTINGS = {case[0]: case[1:] for case in ROUTING_CASES}
routings = pytest.mark.parametrize(
    "num_experts,k,options,with_bias",
    [
        pytest.param(*ROUTINGS[name], id=name)
        for name in ("softmax", "softmax-renorm", "dsv2-groups-max", "sigmoid-bias-groups-max", "sigmoid-renorm-scale")
    ],
)

# Relative gap the float64 selection keys (and group scores) of rows that mix in memory rows keep
# pairwise: the float32 mix rounds a few times on logits up to 8 in magnitude, so the keys' error
# is some 1e-6 relative; rows with conf = 0 are the router's tie-free logits themselves.
MIXED_MIN_GAP = 2e-5


def mix_inputs(num_tokens, num_experts, num_neighbors, dtype=torch.float32, device="cpu", seed=0):
    """``knn_mix`` inputs: random logits and similarities in (-0.2, 1) (some rows' mean falls
    below 0.5, a few below 0)."""
    generator = torch.Generator().manual_seed(seed)
    router = torch.randn(num_tokens, num_experts, generator=generator).to(dtype)
    neighbors = torch.randn(num_tokens, num_neighbors, num_experts, generator=generator).to(dtype)
    sims = torch.rand(num_tokens, num_neighbors, generator=generator) * 1.2 - 0.2
    return router.to(device), neighbors.to(device), sims.to(device)


def mix_op_args(router, neighbors, sims, options, use_triton):
    """The ``knn_mix`` op's forward arguments (``KNN_MIX.flat_args`` gives the registered op's)."""
    return (router, neighbors, sims, KnnMixing(**options), use_triton)


def _near_ties(mixed64, options, bias):
    keys = routing_ref.selection_keys(
        routing_ref.gate_scores(mixed64, options.get("score_func", "softmax")), None if bias is None else bias.double()
    )
    bad = testing._has_near_ties(keys, MIXED_MIN_GAP)
    num_groups = options.get("num_groups")
    if num_groups:
        grouped = keys.unflatten(-1, (num_groups, keys.shape[-1] // num_groups))
        top = (
            grouped.amax(-1) if options.get("group_score", "top2_sum") == "max" else grouped.topk(2, -1).values.sum(-1)
        )
        bad |= testing._has_near_ties(top, MIXED_MIN_GAP)
    return bad


def route_inputs(
    num_tokens,
    num_experts,
    num_neighbors,
    options=None,
    with_bias=False,
    dtype=torch.float32,
    *,
    num_rows=None,
    mixing=None,
    seed=0,
    device="cpu",
):
    """``knn_route`` inputs: router logits, ids, sims, memory and bias whose mixed logits route
    without near-ties.

    Router and memory rows are tie-free routing logits (``make_routing_logits``); similarities are
    uniform in (-0.2, 1) (some means below 0 or 0.5: conf 0), ids draw with repetition from the
    memory (rows shared by tokens); tokens whose mixed logits have a near-tie are redrawn.
    """
    options = dict(options or {})
    mixing = dict(mixing or {})
    num_rows = num_rows or max(2 * num_neighbors, num_tokens // 2, 1)
    generator = torch.Generator().manual_seed(seed)
    bias = testing.make_bias(num_experts, seed=seed + 1) if with_bias else None
    routing = RoutingConfig(**options)
    router = testing.make_routing_logits(num_tokens, num_experts, dtype, routing=routing, bias=bias, seed=seed)
    memory = testing.make_routing_logits(num_rows, num_experts, dtype, routing=routing, bias=bias, seed=seed + 7)
    ids = torch.randint(0, num_rows, (num_tokens, num_neighbors), generator=generator)
    sims = torch.rand(num_tokens, num_neighbors, generator=generator) * 1.2 - 0.2
    for _ in range(100):
        mixed, conf = knn_ref.knn_mix(router.double(), memory.double()[ids], sims.double(), mixing=KnnMixing(**mixing))
        bad = _near_ties(mixed, options, bias) & (conf > 0)
        if not bad.any():
            break
        count = int(bad.sum())
        ids[bad] = torch.randint(0, num_rows, (count, num_neighbors), generator=generator)
        sims[bad] = torch.rand(count, num_neighbors, generator=generator) * 1.2 - 0.2
    else:
        raise RuntimeError("could not draw tie-free mixed logits")
    to = dict(device=device)
    return router.to(**to), ids.to(**to), sims.to(**to), memory.to(**to), None if bias is None else bias.to(**to)


def unfused(router, ids, sims, memory, k, bias, options, mixing, backend="torch"):
    """``knn_route`` as the gather, the public ``knn_mix`` and the public ``softmax_topk``."""
    mixed, conf = knn_mix(router, memory[ids.long()], sims, backend=backend, **mixing)
    weights, chosen = softmax_topk(mixed, k, bias=bias, backend=backend, **options)
    return weights, chosen, conf


def route_op_args(router, ids, sims, memory, k, bias, options, mixing, use_triton):
    """The ``knn_route`` op's forward arguments (``KNN_ROUTE.flat_args`` gives the registered op's)."""
    return (router, ids, sims, memory, k, bias, RoutingConfig(**options), KnnMixing(**mixing), use_triton)


# (routing options, mixing, with bias) of the registration checks.
ROUTE_OPCHECK_CASES = [
    (dict(renormalize=True), MIXINGS[0], False),
    (dict(score_func="sigmoid", num_groups=4, topk_groups=2), MIXINGS[1], True),
    (dict(scale=2.0), MIXINGS[2], False),
]


def assign_inputs(num_tokens=6, num_experts=10, num_neighbors=3, memory=20, seed=0, dtype=torch.float64):
    """``knn_route_assignments`` inputs: router logits, ids, sims in [0, 1), memory logits."""
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(num_tokens, num_experts, generator=generator, dtype=dtype),
        torch.randint(0, memory, (num_tokens, num_neighbors), generator=generator),
        torch.rand(num_tokens, num_neighbors, generator=generator, dtype=dtype),
        torch.randn(memory, num_experts, generator=generator, dtype=dtype),
    )
