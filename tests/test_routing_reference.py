"""Routing family, PyTorch path: the reference (the oracle; ``backend="torch"`` off the CPU) and
``TopKRouter`` against the float64 oracle, the semantics the docstring promises, and properties
on random shapes, dtypes, layouts, ties and non-finite logits."""

from __future__ import annotations

import pytest
import strategies
import torch
from helpers import assert_routing_matches_oracle
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import softmax_topk_oracle
from routing_cases import non_finite_logits, routing_cases, routing_inputs

import moe_kernels
from moe_kernels import testing
from moe_kernels.config import RoutingConfig


@routing_cases
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_reference_matches_oracle(num_experts, k, options, with_bias, dtype):
    logits, bias = routing_inputs(97, num_experts, options, with_bias, dtype)
    weights, ids = moe_kernels.softmax_topk(logits, k, bias=bias, backend="torch", **options)
    want_weights, want_ids = softmax_topk_oracle(logits, k, bias=bias, **options)
    assert weights.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert ids.dtype == torch.int32
    torch.testing.assert_close(ids, want_ids, atol=0, rtol=0)
    testing.assert_close(weights, want_weights)


@pytest.mark.parametrize("num_experts", [1, 2, 60, 160, 257])
@pytest.mark.parametrize("num_tokens", [0, 1, 7, 1000])
@pytest.mark.parametrize("k_kind", ["one", "all"])
def test_reference_odd_sizes(num_experts, num_tokens, k_kind):
    k = 1 if k_kind == "one" else num_experts
    logits = testing.make_routing_logits(num_tokens, num_experts, seed=num_tokens)
    weights, ids = moe_kernels.softmax_topk(logits, k, renormalize=True, backend="torch")
    want_weights, want_ids = softmax_topk_oracle(logits, k, renormalize=True)
    assert weights.shape == ids.shape == (num_tokens, k)
    torch.testing.assert_close(ids, want_ids, atol=0, rtol=0)
    testing.assert_close(weights, want_weights)


def test_leading_dims_kept_and_non_contiguous_input():
    logits = testing.make_routing_logits(2 * 3 * 5, 40).reshape(2, 3, 5, 40)
    weights, ids = moe_kernels.softmax_topk(logits, 3, backend="torch")
    assert weights.shape == ids.shape == (2, 3, 5, 3)
    transposed = logits.reshape(30, 40).t().contiguous().t()  # (30, 40) with strides (1, 30)
    assert not transposed.is_contiguous()
    weights_t, ids_t = moe_kernels.softmax_topk(transposed, 3, backend="torch")
    torch.testing.assert_close(ids_t, ids.reshape(30, 3), atol=0, rtol=0)
    torch.testing.assert_close(weights_t, weights.reshape(30, 3), atol=0, rtol=0)


def test_equal_keys_pick_lower_ids_first():
    logits = torch.tensor([[0.5, 2.0, 2.0, 0.5, 2.0, -1.0]])
    _, ids = moe_kernels.softmax_topk(logits, 5, backend="torch")
    assert ids.tolist() == [[1, 2, 4, 0, 3]]


def test_equal_sigmoid_logits_tie_to_the_lower_id_anywhere_in_the_batch():
    # Regression: torch.sigmoid's vectorised and scalar CPU paths round differently, so equal
    # logits of one row got scores 1 ulp apart (here row 21 of 31) and the higher id won.
    logits = (torch.randn(31, 3, generator=torch.Generator().manual_seed(5894), dtype=torch.float64) * 30).float()
    logits[:, 1] = logits[:, 0]
    weights, ids = moe_kernels.softmax_topk(logits, 3, score_func="sigmoid", backend="torch")
    assert ids[21].tolist() == [2, 0, 1]
    assert_routing_matches_oracle(weights, ids, logits, 3, score_func="sigmoid")  # scores below 1e-35 tie


def test_bias_changes_selection_not_weights():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 10.0])
    weights, ids = moe_kernels.softmax_topk(logits, 2, bias=bias, backend="torch")
    scores = torch.softmax(logits, -1)[0]
    assert ids.tolist() == [[3, 0]]
    torch.testing.assert_close(weights[0], scores[[3, 0]])


def test_dropped_groups_never_chosen_even_with_negative_keys():
    # Group 1 (experts 2, 3) wins; its keys are negative after the bias. HF's DeepSeek-V3 code
    # masks dropped groups with 0.0 and would then pick expert 0 or 1; -inf masking never does.
    logits = torch.tensor([[0.0, 0.0, 5.0, 4.0]])
    bias = torch.tensor([-3.0, -3.0, -2.0, -2.0])
    _, ids = moe_kernels.softmax_topk(
        logits, 2, score_func="sigmoid", bias=bias, num_groups=2, topk_groups=1, group_score="max", backend="torch"
    )
    assert sorted(ids[0].tolist()) == [2, 3]


def test_renormalize_and_scale():
    logits = testing.make_routing_logits(16, 32)
    weights, _ = moe_kernels.softmax_topk(logits, 4, renormalize=True, scale=2.5, backend="torch")
    torch.testing.assert_close(weights.sum(-1), torch.full((16,), 2.5))


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_non_finite_rows_give_valid_distinct_ids(score_func):
    num_experts, k = 12, 5
    logits = non_finite_logits(score_func)
    weights, ids = moe_kernels.softmax_topk(logits, k, score_func=score_func, renormalize=True, backend="torch")
    assert ((ids >= 0) & (ids < num_experts)).all()
    assert all(len(set(row)) == k for row in ids.tolist())
    if score_func == "softmax":
        # NaN, +inf and all -inf rows have NaN scores (as torch.softmax); the rest are finite.
        assert torch.isnan(weights[[0, 1, 2, 3, 5]]).all()
        assert torch.isfinite(weights[4]).all() and 2 not in ids[4].tolist()
        assert ids[1].tolist() == list(range(k))  # every key NaN -> -inf: lowest ids first
    else:
        assert 3 not in ids[0].tolist() and torch.isfinite(weights[0]).all()  # NaN expert ranks last
        assert ids[2, 0].item() == 7 and torch.isfinite(weights[2]).all()  # sigmoid(+inf) = 1
        assert torch.isfinite(weights[3]).all() and torch.isfinite(weights[4]).all()
        assert set(ids[5].tolist()) <= set(range(1, num_experts, 2))  # the non-NaN experts first


def test_top_k_router_module_against_float64_oracle():
    # The gate and the routing against float64 computed here, not through the reference the
    # module calls: the logits of an independent float64 linear, the oracle's ids and weights,
    # and the gradients of the weights by autograd through plain torch.softmax in float64.
    router = moe_kernels.TopKRouter(24, 16, 4, routing=RoutingConfig.renormalize(), backend="torch")
    hidden = torch.randn(3, 5, 24, requires_grad=True)
    weights, ids = router(hidden)
    assert weights.shape == ids.shape == (3, 5, 4)
    x64 = hidden.detach().double().requires_grad_(True)
    w64 = router.weight.detach().double().requires_grad_(True)
    logits64 = x64 @ w64.T
    # Fixed seed: no two scores of a token within 1e-4 of each other, so the ids are well defined.
    assert not testing._has_near_ties(torch.softmax(logits64.detach(), -1), 1e-4).any()
    want_weights, want_ids = softmax_topk_oracle(logits64.detach(), 4, renormalize=True)
    torch.testing.assert_close(ids, want_ids, atol=0, rtol=0)
    testing.assert_close(weights, want_weights)
    grad = torch.randn(3, 5, 4)
    (weights * grad).sum().backward()
    picked = torch.softmax(logits64, -1).gather(-1, want_ids.long())
    ((picked / picked.sum(-1, keepdim=True)) * grad.double()).sum().backward()
    testing.assert_close(router.weight.grad, w64.grad)
    testing.assert_close(hidden.grad, x64.grad)


def test_top_k_router_correction_bias_selects_only():
    router = moe_kernels.TopKRouter(8, 6, 2, routing=RoutingConfig.llama4(), correction_bias=True, backend="torch")
    with torch.no_grad():
        router.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 5.0, 4.0]))
    hidden = torch.randn(7, 8)
    weights, ids = router(hidden)
    assert (ids == torch.tensor([4, 5], dtype=torch.int32)).all()  # the bias decides the experts
    scores = torch.sigmoid(torch.nn.functional.linear(hidden, router.weight))
    testing.assert_close(weights, scores[:, [4, 5]])  # ... but not the weights
    assert router(torch.randn(0, 8))[0].shape == (0, 2)


# ------------------------------------------------------------------------------------------------
# Properties: random shapes (T = 0, 1, primes; odd E; k = 1 and k = E), every routing option,
# dtypes, layouts, exact ties and NaN / +-inf logits, against the float64 oracle.


@settings(max_examples=strategies.examples(600))
@given(data=st.data())
def test_property_softmax_topk_matches_oracle(data):
    num_tokens = data.draw(strategies.token_counts, label="T")
    num_experts = data.draw(st.sampled_from([1, 2, 3, 8, 60, 160, 257]), label="E")
    options, k = strategies.drawn_routing(data.draw, num_experts)
    dtype = data.draw(strategies.reference_dtypes, label="dtype")
    spread = data.draw(st.sampled_from([0.5, 3.0, 30.0]), label="logit scale")
    source = strategies.drawn_generator(data.draw)
    logits = (torch.randn(num_tokens, num_experts, generator=source, dtype=torch.float64) * spread).to(dtype)
    for src, dst in data.draw(strategies.duplicated_columns(num_experts), label="ties"):
        logits[:, dst] = logits[:, src]
    logits = strategies.with_special_values(data.draw, logits, label="non-finite")
    bias = None
    if data.draw(st.booleans(), label="bias"):
        bias_dtype = data.draw(st.sampled_from([torch.float32, torch.float64])) if dtype == torch.float64 else None
        bias = (torch.randn(num_experts, generator=source) * 0.5).to(bias_dtype or torch.float32)
    logits = strategies.with_drawn_layout(data.draw, logits, label="layout")
    if data.draw(st.booleans(), label="leading dim"):
        logits = logits.unsqueeze(0)  # (1, T, E): leading dims kept, strides as they are

    if data.draw(st.booleans(), label="as RoutingConfig"):  # the config, or its fields as keywords
        weights, ids = moe_kernels.softmax_topk(
            logits, k, routing=moe_kernels.RoutingConfig(**options), bias=bias, backend="torch"
        )
    else:
        weights, ids = moe_kernels.softmax_topk(logits, k, bias=bias, backend="torch", **options)

    assert weights.shape == ids.shape == (*logits.shape[:-1], k)
    assert weights.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and ids.dtype == torch.int32
    float64 = dtype == torch.float64
    assert_routing_matches_oracle(
        weights,
        ids,
        logits,
        k,
        bias=bias,
        rel_tol=1e-10 if float64 else 1e-5,
        abs_tol=1e-300 if float64 else 1e-35,
        weights_dtype=weights.dtype,
        **options,
    )
