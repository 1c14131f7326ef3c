"""ProbMoE family, bad input: every bad argument to ``exact_k_marginals``, ``exact_k_sample`` and
``probmoe_route`` gets a clear ``ValueError`` / ``TypeError`` naming the op and the argument."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_refused
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import examples, token_counts

import moe_kernels as mk


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(k=0), ValueError, r"k must be an int in \[1, E=6\], got 0"),
        (dict(k=7), ValueError, r"k must be an int in \[1, E=6\], got 7"),
        (dict(k=2.0), TypeError, "k must be an int, got float 2.0"),
        (dict(k=3, k_min=4), ValueError, r"k_min must be None or an int in \[0, k=3\], got 4"),
        (dict(k=3, k_min=-1), ValueError, "k_min must be None or an int"),
        (dict(k=3, seed=-1), ValueError, "seed must be None or an int"),
        (dict(k=3, backend="cuda"), ValueError, "backend must be one of"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        mk.exact_k_sample(torch.randn(4, 6), **kwargs)


@pytest.mark.parametrize(
    "logits,error,match",
    [
        (torch.ones(4, 6, dtype=torch.int64), TypeError, "logits must be float32, float16 or bfloat16"),
        (torch.randn(4, 0), ValueError, r"logits must have shape \(\.\.\., E\) with E >= 1"),
        ([[0.0, 1.0]], TypeError, "logits must be a torch.Tensor, got list"),
    ],
)
def test_bad_logits(logits, error, match):
    with pytest.raises(error, match=match):
        mk.exact_k_marginals(logits, 1)


def test_bad_route_flags():
    with pytest.raises(TypeError, match="training must be a bool"):
        mk.probmoe_route(torch.randn(2, 4), 2, training=1)
    with pytest.raises(TypeError, match="renormalize must be a bool"):
        mk.probmoe_route(torch.randn(2, 4), 2, renormalize=None)


# ------------------------------------------------------------------------------------------------
# Property: any bad argument to any ProbMoE op raises ValueError / TypeError naming the op and
# the argument.

PROBMOE_OPS = {"exact_k_marginals": mk.exact_k_marginals, "exact_k_sample": mk.exact_k_sample}


@st.composite
def bad_probmoe_call(draw):
    """``(op, kwargs, the argument the error must name)``."""
    op = draw(st.sampled_from(["exact_k_marginals", "exact_k_sample", "probmoe_route"]))
    num_tokens, num_experts = draw(token_counts), draw(st.sampled_from([1, 3, 8]))
    kwargs = dict(logits=torch.randn(num_tokens, num_experts), k=1)
    kinds = ["logits", "k", "k_min", "backend"] + (["seed"] if op != "exact_k_marginals" else [])
    kinds += ["training", "renormalize"] if op == "probmoe_route" else []
    kind = draw(st.sampled_from(kinds))
    if kind == "logits":
        kwargs["logits"] = draw(
            st.sampled_from(
                [
                    torch.ones(num_tokens, num_experts, dtype=torch.int64),
                    torch.ones(num_tokens, num_experts, dtype=torch.bool),
                    torch.ones(num_tokens, 0),
                    torch.tensor(1.0),
                    [[0.0, 1.0]],
                    None,
                ]
            )
        )
    elif kind == "k":
        kwargs["k"] = draw(st.sampled_from([0, -1, num_experts + 1, 2**40, 1.0, True, None, "1"]))
    elif kind == "k_min":
        kwargs["k_min"] = draw(st.sampled_from([-1, 2, 2**40, 1.0, True, "0"]))  # k = 1: k_min in [0, 1]
    elif kind == "seed":
        kwargs["seed"] = draw(st.sampled_from([-1, 2**63, 2**64, 1.5, "7", True]))
    elif kind == "backend":
        kwargs["backend"] = draw(st.sampled_from(["cuda", "", None]))
    else:
        kwargs[kind] = draw(st.sampled_from([1, 0, None, "yes"]))
    return op, kwargs, kind


@settings(max_examples=examples(150))
@given(call=bad_probmoe_call())
def test_property_bad_input_names_the_argument(call):
    op, kwargs, argument = call
    function = PROBMOE_OPS.get(op, mk.probmoe_route)
    assert_refused(lambda: function(**kwargs), op, argument)
