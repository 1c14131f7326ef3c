"""kNN family, bad input: every bad argument to ``knn_mix``, ``knn_route`` and
``knn_route_assignments`` gets a clear ``ValueError`` / ``TypeError`` naming the op and the
argument (never an IndexError, or a RuntimeError from a gather out of range)."""

from __future__ import annotations

import importlib

import pytest
import torch
from helpers import assert_refused
from hypothesis import given, settings
from hypothesis import strategies as st
from knn_cases import assign_inputs, route_inputs
from strategies import INF, NAN, examples, token_counts

from moe_kernels.functional.knn import knn_mix, knn_route, knn_route_assignments


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(router=torch.ones(4, 8, dtype=torch.int32)), TypeError, r"router_logits must be float32"),
        (dict(router=torch.ones(4, 8, 1)), ValueError, r"router_logits must have shape \(T, E\)"),
        (
            dict(neighbors=torch.ones(4, 3, 9)),
            ValueError,
            r"neighbor_logits must have shape \(T, n, E\) = \(4, 3, 8\), got \(4, 3, 9\)",
        ),
        (dict(sims=torch.ones(5, 3)), ValueError, r"neighbor_sims must have shape \(T, n\) = \(4, n\)"),
        (dict(sims=torch.ones(4, 0)), ValueError, r"with n >= 1"),
        (dict(sims=[[1.0]]), TypeError, r"neighbor_sims must be a torch.Tensor, got list"),
        (dict(weighting="mean"), ValueError, r"weighting must be one of \('similarity', 'softmax'\), got 'mean'"),
        (dict(temperature=0.0), ValueError, r"temperature must be a finite number > 0, got 0.0"),
        (dict(min_confidence=1.5), ValueError, r"min_confidence must be a number in \[0, 1\], got 1.5"),
    ],
)
def test_mix_bad_arguments(change, error, match):
    args = dict(router=torch.randn(4, 8), neighbors=torch.randn(4, 3, 8), sims=torch.rand(4, 3))
    options = {key: change.pop(key) for key in ("weighting", "temperature", "min_confidence") if key in change}
    args.update(change)
    with pytest.raises(error, match=match):
        knn_mix(args["router"], args["neighbors"], args["sims"], **options)


def _good_args():
    router, ids, sims, memory, _ = route_inputs(4, 8, 3, num_rows=6)
    return dict(router=router, ids=ids, sims=sims, memory=memory)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(router=torch.ones(4, 8, dtype=torch.int32)), TypeError, r"knn_route: router_logits must be float32"),
        (dict(router=torch.ones(4, 8, 1)), ValueError, r"knn_route: router_logits must have shape \(T, E\)"),
        (
            dict(memory=torch.ones(6, 9)),
            ValueError,
            r"memory_logits must have shape \(N, E\) = \(N, 8\) as router_logits",
        ),
        (
            dict(memory=torch.ones(0, 8)),
            ValueError,
            r"memory_logits must have shape \(N, E\) with N >= 1, got \(0, 8\)",
        ),
        (dict(memory=torch.ones(6, 8, dtype=torch.int64)), TypeError, r"memory_logits must be float32"),
        (dict(memory=[[1.0]]), TypeError, r"memory_logits must be a torch.Tensor, got list"),
        (dict(memory=torch.ones(6, 8, device="meta")), ValueError, r"memory_logits must be on router_logits' device"),
        (dict(sims=torch.ones(5, 3)), ValueError, r"knn_route: neighbor_sims must have shape \(T, n\) = \(4, n\)"),
        (dict(sims=torch.ones(4, 0)), ValueError, r"with n >= 1"),
        (
            dict(ids=torch.zeros(4, 2, dtype=torch.int64)),
            ValueError,
            r"neighbor_ids must have shape \(T, n\) = \(4, 3\) as neighbor_sims, got \(4, 2\)",
        ),
        (dict(ids=torch.zeros(4, 3)), TypeError, r"neighbor_ids must be int32 or int64, got torch.float32"),
        (
            dict(ids=torch.full((4, 3), 6)),
            ValueError,
            r"neighbor_ids must lie in \[0, N\) = \[0, 6\) .*got values in \[6, 6\]",
        ),
        (dict(ids=torch.full((4, 3), -1)), ValueError, r"neighbor_ids must lie in \[0, N\) = \[0, 6\)"),
        (dict(k=9), ValueError, r"knn_route: k must be an int in \[1, 8\]"),
        (dict(score_func="relu"), ValueError, r"knn_route: score_func must be one of"),
        (dict(bias=torch.zeros(7)), ValueError, r"knn_route: bias must have shape \(E,\) = \(8,\)"),
        (dict(num_groups=3, topk_groups=1), ValueError, r"knn_route: num_groups must be a positive int dividing E=8"),
        (dict(weighting="mean"), ValueError, r"knn_route: weighting must be one of \('similarity', 'softmax'\)"),
        (dict(temperature=0.0), ValueError, r"knn_route: temperature must be a finite number > 0, got 0.0"),
        (dict(min_confidence=1.5), ValueError, r"knn_route: min_confidence must be a number in \[0, 1\]"),
        (dict(backend="cuda"), ValueError, r"knn_route: backend must be one of"),
    ],
)
def test_route_bad_arguments(change, error, match):
    args = _good_args()
    tensors = {key: change.pop(key) for key in ("router", "ids", "sims", "memory") if key in change}
    args.update(tensors)
    k = change.pop("k", 2)
    with pytest.raises(error, match=match):
        knn_route(args["router"], args["ids"], args["sims"], args["memory"], k, **change)


def test_route_float64_router_needs_the_torch_backend(monkeypatch):
    # The backend is resolved with the routing checks (functional._checks.routing_call).
    module = importlib.import_module("moe_kernels.functional._checks")
    monkeypatch.setattr(module, "use_triton", lambda backend, device, name: True)
    args = _good_args()
    with pytest.raises(TypeError, match=r"knn_route: backend='triton' takes float32/float16/bfloat16 logits"):
        knn_route(args["router"].double(), args["ids"], args["sims"], args["memory"], 2, backend="triton")


def test_assignments_bad_neighbor_ids():
    router, ids, sims, memory = assign_inputs()
    with pytest.raises(ValueError, match=r"neighbor_ids must lie in \[0, N\) = \[0, 20\)"):
        knn_route_assignments(router, ids + 20, sims, memory, 2)


# ------------------------------------------------------------------------------------------------
# Property: any bad argument of any kNN op raises ValueError / TypeError naming the op and the
# argument; ids out of range are refused before anything is gathered.

KNN_OPS = ("knn_mix", "knn_route", "knn_route_assignments")


def _call(op, router, ids, sims, memory, k, **options):
    if op == "knn_mix":
        neighbors = memory[ids.long().clamp(0, memory.shape[0] - 1)] if isinstance(ids, torch.Tensor) else memory
        return knn_mix(router, options.pop("neighbor_logits", neighbors), sims, **options)
    function = knn_route if op == "knn_route" else knn_route_assignments
    return function(router, ids, sims, memory, k, **options)


@st.composite
def bad_knn_call(draw):
    """``(op, arguments, options, the argument the error must name)``."""
    op = draw(st.sampled_from(KNN_OPS))
    num_tokens, num_neighbors = draw(token_counts.filter(lambda t: t > 0)), draw(st.sampled_from([1, 3]))
    num_rows, num_experts = draw(st.sampled_from([1, 4])), draw(st.sampled_from([2, 8]))
    args = dict(
        router=torch.randn(num_tokens, num_experts),
        ids=torch.randint(0, num_rows, (num_tokens, num_neighbors)),
        sims=torch.rand(num_tokens, num_neighbors),
        memory=torch.randn(num_rows, num_experts),
        k=1,
    )
    options = {}
    kinds = ["router_logits", "neighbor_sims", "weighting", "temperature", "min_confidence", "backend"]
    if op == "knn_mix":
        kinds.append("neighbor_logits")
    else:
        kinds += ["neighbor_ids", "memory_logits", "k"]
    kind = draw(st.sampled_from(kinds))
    if kind == "router_logits":
        args["router"] = draw(
            st.sampled_from(
                [
                    torch.ones(num_tokens, num_experts, dtype=torch.int32),
                    torch.ones(num_tokens, num_experts, 1),
                    torch.ones(num_tokens, 0),
                    [[1.0]],
                ]
            )
        )
    elif kind == "neighbor_sims":
        args["sims"] = draw(
            st.sampled_from(
                [
                    torch.ones(num_tokens + 1, num_neighbors),
                    torch.ones(num_tokens, 0),
                    torch.ones(num_tokens),
                    torch.ones(num_tokens, num_neighbors, dtype=torch.int64),
                    torch.ones(num_tokens, num_neighbors, device="meta"),
                    None,
                ]
            )
        )
    elif kind == "neighbor_logits":
        options["neighbor_logits"] = draw(
            st.sampled_from(
                [
                    torch.ones(num_tokens, num_neighbors, num_experts + 1),
                    torch.ones(num_tokens, num_neighbors + 1, num_experts),
                    torch.ones(num_tokens, num_experts),
                    torch.ones(num_tokens, num_neighbors, num_experts, dtype=torch.int32),
                ]
            )
        )
    elif kind == "neighbor_ids":
        bad_id = draw(st.sampled_from([-1, -(2**31), num_rows, num_rows + 7, 2**31 - 1, 2**40]))
        dtype = draw(st.sampled_from([torch.int32, torch.int64])) if -(2**31) <= bad_id < 2**31 else torch.int64
        ids = args["ids"].to(dtype, copy=True)
        ids.view(-1)[draw(st.integers(0, ids.numel() - 1))] = bad_id
        args["ids"] = draw(
            st.sampled_from(
                [ids, args["ids"].float(), args["ids"].to(torch.int16), args["ids"][:, :0], args["ids"][:1, :]]
                if num_tokens > 1
                else [ids, args["ids"].float(), args["ids"].to(torch.int16), args["ids"][:, :0]]
            )
        )
    elif kind == "memory_logits":
        args["memory"] = draw(
            st.sampled_from(
                [
                    torch.ones(num_rows, num_experts + 1),
                    torch.ones(0, num_experts),
                    torch.ones(num_rows, num_experts, dtype=torch.int64),
                    torch.ones(num_rows, num_experts, device="meta"),
                    torch.ones(num_experts),
                ]
            )
        )
    elif kind == "k":
        args["k"] = draw(st.sampled_from([0, -1, num_experts + 1, 1.0, True, None]))
    elif kind == "weighting":
        options["weighting"] = draw(st.sampled_from(["mean", "", None]))
    elif kind == "temperature":
        options["temperature"] = draw(st.sampled_from([0.0, -0.1, NAN, INF, True, "0.1"]))
    elif kind == "min_confidence":
        options["min_confidence"] = draw(st.sampled_from([-0.1, 1.5, NAN, INF, False]))
    else:
        options["backend"] = draw(st.sampled_from(["cuda", "Torch", None]))
    return op, args, options, kind


@settings(max_examples=examples(200))
@given(call=bad_knn_call())
def test_property_bad_input_names_the_argument(call):
    op, args, options, argument = call
    assert_refused(
        lambda: _call(op, args["router"], args["ids"], args["sims"], args["memory"], args["k"], **options), op, argument
    )
