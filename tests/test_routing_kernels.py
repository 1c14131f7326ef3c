"""The Triton kernels of ``softmax_topk`` against the float64 oracle and the reference.

Runs on CUDA, or on CPU through the Triton interpreter (fp32/fp16 only: it cannot compute in
bf16); bf16 runs on GPU. One small property test draws shapes, options, layouts and non-finite
logits.
"""

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
from moe_kernels import reference, testing
from moe_kernels.config import RoutingConfig
from moe_kernels.ops import routing as routing_ops

pytestmark = pytest.mark.kernel

KERNEL_DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.gpu),
]


def _run(logits, k, bias, options):
    with testing.poisoned_outputs():
        weights, ids = moe_kernels.softmax_topk(logits, k, bias=bias, backend="triton", **options)
    testing.assert_written(weights, "weights")
    testing.assert_written(ids, "ids")
    return weights, ids


@routing_cases
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_kernel_matches_oracle(kernel_device, num_experts, k, options, with_bias, dtype):
    logits, bias = routing_inputs(131, num_experts, options, with_bias, dtype, kernel_device)
    weights, ids = _run(logits, k, bias, options)
    want_weights, want_ids = softmax_topk_oracle(logits.cpu(), k, bias=None if bias is None else bias.cpu(), **options)
    torch.testing.assert_close(ids.cpu(), want_ids, atol=0, rtol=0)
    testing.assert_close(weights.cpu(), want_weights, dtype=torch.float32)


@pytest.mark.parametrize("num_experts", [1, 2, 60, 160, 257])
@pytest.mark.parametrize("num_tokens", [0, 1, 7, 1000])
@pytest.mark.parametrize("k_kind", ["one", "all"])
def test_kernel_odd_sizes(kernel_device, num_experts, num_tokens, k_kind):
    k = 1 if k_kind == "one" else num_experts
    if kernel_device == "cpu" and num_tokens == 1000 and num_experts * k > 4000:
        num_tokens = 211  # the interpreter is slow per selection round; still many programs' worth
    logits = testing.make_routing_logits(num_tokens, num_experts, torch.float32, seed=num_experts, device=kernel_device)
    weights, ids = _run(logits, k, None, dict(renormalize=True))
    want_weights, want_ids = softmax_topk_oracle(logits.cpu(), k, renormalize=True)
    assert weights.shape == ids.shape == (num_tokens, k)
    torch.testing.assert_close(ids.cpu(), want_ids, atol=0, rtol=0)
    testing.assert_close(weights.cpu(), want_weights, dtype=torch.float32)


def test_kernel_one_row_per_program(kernel_device, monkeypatch):
    # The decode configuration (one token per program) the GPU heuristic picks for small T.
    monkeypatch.setattr(routing_ops, "MIN_PROGRAMS", 128)
    logits, bias = routing_inputs(9, 256, dict(score_func="sigmoid"), True, torch.float32, kernel_device)
    options = dict(score_func="sigmoid", num_groups=8, topk_groups=4, renormalize=True, scale=2.5)
    assert routing_ops.forward_meta(9, 256, 8, RoutingConfig(**options), True)["BLOCK_T"] == 1
    weights, ids = _run(logits, 8, bias, options)
    want_weights, want_ids = softmax_topk_oracle(logits.cpu(), 8, bias=bias.cpu(), **options)
    torch.testing.assert_close(ids.cpu(), want_ids, atol=0, rtol=0)
    testing.assert_close(weights.cpu(), want_weights)


def test_kernel_non_contiguous_and_leading_dims(kernel_device):
    logits = testing.make_routing_logits(60, 72, torch.float32, device=kernel_device)
    transposed = logits.t().contiguous().t()
    assert not transposed.is_contiguous()
    weights, ids = _run(transposed, 6, None, dict(renormalize=True))
    want_weights, want_ids = reference.softmax_topk(logits, 6, routing=RoutingConfig.renormalize())
    torch.testing.assert_close(ids, want_ids, atol=0, rtol=0)
    testing.assert_close(weights, want_weights)
    weights3, ids3 = _run(logits.reshape(3, 4, 5, 72), 6, None, dict(renormalize=True))
    assert weights3.shape == (3, 4, 5, 6)
    torch.testing.assert_close(ids3.reshape(60, 6), want_ids, atol=0, rtol=0)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter on inf - inf
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_kernel_non_finite_rows_match_reference(kernel_device, score_func):
    num_experts, k = 12, 5
    logits = non_finite_logits(score_func, device=kernel_device)
    options = dict(score_func=score_func, renormalize=True)
    weights, ids = moe_kernels.softmax_topk(logits, k, backend="triton", **options)
    want_weights, want_ids = reference.softmax_topk(logits, k, routing=RoutingConfig(**options))
    assert ((ids >= 0) & (ids < num_experts)).all()
    assert all(len(set(row)) == k for row in ids.tolist())
    torch.testing.assert_close(ids, want_ids, atol=0, rtol=0)
    torch.testing.assert_close(weights, want_weights, equal_nan=True)


def test_kernel_ties_pick_lower_ids_first(kernel_device):
    logits = torch.tensor([[0.5, 2.0, 2.0, 0.5, 2.0, -1.0]] * 3, device=kernel_device)
    _, ids = moe_kernels.softmax_topk(logits, 5, backend="triton")
    assert ids.tolist() == [[1, 2, 4, 0, 3]] * 3


@routing_cases
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_kernel_backward_matches_reference(kernel_device, num_experts, k, options, with_bias, dtype):
    logits, bias = routing_inputs(67, num_experts, options, with_bias, dtype, kernel_device)
    grad_out = torch.randn(67, k, device=kernel_device)
    x_kernel = logits.clone().requires_grad_(True)
    with testing.poisoned_outputs():
        weights, _ = moe_kernels.softmax_topk(x_kernel, k, bias=bias, backend="triton", **options)
        weights.backward(grad_out)
    assert x_kernel.grad.dtype == dtype
    x_ref = logits.double().requires_grad_(True)
    bias64 = None if bias is None else bias.double()
    ref_weights, _ = reference.softmax_topk(x_ref, k, routing=RoutingConfig(**options), bias=bias64)
    ref_weights.backward(grad_out.double())
    testing.assert_written(x_kernel.grad, "grad_logits")
    testing.assert_close(x_kernel.grad, x_ref.grad, msg="kernel gradient vs float64 reference")


def test_kernel_empty_batch(kernel_device):
    logits = torch.randn(0, 64, device=kernel_device, requires_grad=True)
    weights, ids = moe_kernels.softmax_topk(logits, 8, backend="triton")
    assert weights.shape == ids.shape == (0, 8)
    weights.sum().backward()
    assert logits.grad.shape == (0, 64)


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay():
    options = dict(score_func="sigmoid", num_groups=8, topk_groups=4, renormalize=True, scale=2.5)
    bias = testing.make_bias(256)

    def fresh_logits(seed):
        routing = RoutingConfig(**options)
        return testing.make_routing_logits(64, 256, torch.bfloat16, routing=routing, bias=bias, seed=seed).cuda()

    bias = bias.cuda()
    static_logits = fresh_logits(0)
    moe_kernels.softmax_topk(static_logits, 8, bias=bias, **options)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        weights, ids = moe_kernels.softmax_topk(static_logits, 8, bias=bias, **options)
    for seed in (1, 2):
        fresh = fresh_logits(seed)
        static_logits.copy_(fresh)
        graph.replay()
        want_weights, want_ids = reference.softmax_topk(fresh, 8, routing=RoutingConfig(**options), bias=bias)
        torch.testing.assert_close(ids, want_ids, atol=0, rtol=0)
        testing.assert_close(weights, want_weights)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter on inf - inf
@settings(max_examples=strategies.examples(40))  # the interpreter is slow: small cases
@given(data=st.data())
def test_property_kernel_matches_oracle(kernel_device, data):
    num_tokens = data.draw(st.sampled_from([0, 1, 5, 13]), label="T")
    num_experts = data.draw(st.sampled_from([1, 3, 8, 60]), label="E")
    options, k = strategies.drawn_routing(data.draw, num_experts)
    source = strategies.drawn_generator(data.draw)
    logits = torch.randn(num_tokens, num_experts, generator=source) * data.draw(st.sampled_from([0.5, 3.0]))
    logits = strategies.with_special_values(data.draw, logits, label="non-finite")
    logits = strategies.with_drawn_layout(data.draw, logits, label="layout").to(kernel_device)
    bias = (torch.randn(num_experts, generator=source) * 0.5).to(kernel_device) if data.draw(st.booleans()) else None
    with testing.poisoned_outputs():  # unwritten: NaN weights where the oracle has none, ids out of range
        weights, ids = moe_kernels.softmax_topk(logits, k, bias=bias, backend="triton", **options)
    assert_routing_matches_oracle(
        weights.cpu(), ids.cpu(), logits.cpu(), k, bias=None if bias is None else bias.cpu(), **options
    )
