"""The PyTorch reference (the CPU path of ``softmax_topk``) against the float64 oracle, and the
semantics the docstring promises."""

from __future__ import annotations

import pytest
import torch
from oracles import softmax_topk_oracle
from routing_cases import non_finite_logits, routing_cases, routing_inputs

import moe_kernels
from moe_kernels import reference, testing


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


@pytest.mark.parametrize(
    "options",
    [
        {},
        dict(renormalize=True, scale=1.7),
        dict(score_func="sigmoid"),
        dict(score_func="sigmoid", renormalize=True, num_groups=4, topk_groups=2),
    ],
    ids=["softmax", "softmax-renorm", "sigmoid", "sigmoid-renorm-groups"],
)
def test_gradcheck_float64(options):
    logits = testing.make_routing_logits(5, 16, torch.float64, score_func=options.get("score_func", "softmax"))
    bias = testing.make_bias(16).double()
    logits.requires_grad_(True)

    def through_op(x):  # the registered op with its explicit backward formula
        return moe_kernels.softmax_topk(x, 4, bias=bias, backend="torch", **options)[0]

    def through_autograd(x):  # the reference differentiated by autograd
        return reference.softmax_topk(x, 4, bias=bias, **options)[0]

    assert torch.autograd.gradcheck(through_op, (logits,))
    assert torch.autograd.gradcheck(through_autograd, (logits,))


@routing_cases
def test_explicit_backward_matches_autograd(num_experts, k, options, with_bias):
    logits, bias = routing_inputs(33, num_experts, options, with_bias, torch.float64)
    logits.requires_grad_(True)
    grad_out = torch.randn(33, k, dtype=torch.float64)
    weights, ids = reference.softmax_topk(logits, k, bias=bias, **options)
    (want,) = torch.autograd.grad(weights, logits, grad_out)
    got = reference.softmax_topk_backward(
        grad_out,
        logits.detach(),
        ids,
        renormalize=options.get("renormalize", False),
        score_func=options.get("score_func", "softmax"),
        scale=options.get("scale", 1.0),
    )
    testing.assert_close(got, want)


def test_bias_gets_no_gradient():
    logits = testing.make_routing_logits(4, 8).requires_grad_(True)
    bias = testing.make_bias(8).requires_grad_(True)
    weights, _ = moe_kernels.softmax_topk(logits, 2, bias=bias, backend="torch")
    weights.sum().backward()
    assert logits.grad is not None and bias.grad is None


def test_top_k_router_module():
    router = moe_kernels.TopKRouter(24, 16, 4, renormalize=True, backend="torch")
    hidden = torch.randn(3, 5, 24, requires_grad=True)
    weights, ids = router(hidden)
    assert weights.shape == ids.shape == (3, 5, 4)
    logits = torch.nn.functional.linear(hidden, router.weight)
    want_weights, want_ids = reference.softmax_topk(logits, 4, renormalize=True)
    torch.testing.assert_close(ids, want_ids, atol=0, rtol=0)
    testing.assert_close(weights, want_weights)
    (weights * torch.randn_like(weights)).sum().backward()
    assert router.weight.grad is not None and hidden.grad is not None


def test_top_k_router_correction_bias_selects_only():
    router = moe_kernels.TopKRouter(8, 6, 2, score_func="sigmoid", correction_bias=True, backend="torch")
    with torch.no_grad():
        router.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 5.0, 4.0]))
    hidden = torch.randn(7, 8)
    weights, ids = router(hidden)
    assert (ids == torch.tensor([4, 5], dtype=torch.int32)).all()  # the bias decides the experts
    scores = torch.sigmoid(torch.nn.functional.linear(hidden, router.weight))
    testing.assert_close(weights, scores[:, [4, 5]])  # ... but not the weights
    assert router(torch.randn(0, 8))[0].shape == (0, 2)
