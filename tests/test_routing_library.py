"""Routing family, library: gradcheck in float64, ``torch.library`` registration of
``softmax_topk`` (opcheck of the op and its backward, fake tensors), torch.compile equals eager,
the eager ``autograd.Function`` equals the registered op.

The reference path runs in the plain CPU pass; the ``kernel`` tests repeat the checks with the
Triton kernels (CUDA, or the interpreter).
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_compile_matches_eager, assert_function_matches_op
from routing_cases import routing_cases, routing_inputs
from torch._subclasses.fake_tensor import FakeTensorMode

import moe_kernels
from moe_kernels import reference, testing
from moe_kernels.config import RoutingConfig
from moe_kernels.ops.routing import SOFTMAX_TOPK

OPCHECK_CASES = [
    ("softmax", 16, 3, {}, False),
    (
        "sigmoid-bias-groups",
        32,
        4,
        dict(score_func="sigmoid", num_groups=4, topk_groups=2, renormalize=True, scale=2.5),
        True,
    ),
    ("softmax-groups-max", 24, 2, dict(num_groups=6, topk_groups=3, group_score="max"), False),
]


def _op_args(logits, k, bias, options, use_triton):
    """The op's forward arguments (``SOFTMAX_TOPK.flat_args`` gives the registered op's)."""
    return (logits, k, bias, RoutingConfig(**options), use_triton)


def _opcheck(device, use_triton, num_tokens):
    for _, num_experts, k, options, with_bias in OPCHECK_CASES:
        logits, bias = routing_inputs(num_tokens, num_experts, options, with_bias, device=device)
        for requires_grad in (False, True):
            args = _op_args(logits.clone().requires_grad_(requires_grad), k, bias, options, use_triton)
            torch.library.opcheck(torch.ops.moe_kernels.softmax_topk.default, SOFTMAX_TOPK.flat_args(args))
        weights, ids = SOFTMAX_TOPK.registered(*_op_args(logits, k, bias, options, use_triton))
        grad = torch.randn_like(weights)
        bwd_args = SOFTMAX_TOPK.flat_backward_args((grad, logits, ids, RoutingConfig(**options), use_triton))
        torch.library.opcheck(torch.ops.moe_kernels.softmax_topk_backward.default, bwd_args)


@pytest.mark.parametrize("num_tokens", [0, 1, 13])
def test_opcheck_reference_path(num_tokens):
    _opcheck("cpu", False, num_tokens)


@pytest.mark.kernel
@pytest.mark.parametrize("num_tokens", [0, 13])
def test_opcheck_kernel_path(kernel_device, num_tokens):
    _opcheck(kernel_device, True, num_tokens)


def _eager_function_matches_op(device, use_triton):
    for _, num_experts, k, options, with_bias in OPCHECK_CASES:
        logits, bias = routing_inputs(29, num_experts, options, with_bias, device=device)
        assert_function_matches_op(SOFTMAX_TOPK, _op_args(logits.requires_grad_(True), k, bias, options, use_triton))


def test_eager_function_matches_registered_op():
    _eager_function_matches_op("cpu", False)


@pytest.mark.kernel
def test_eager_function_matches_registered_op_kernel_path(kernel_device):
    _eager_function_matches_op(kernel_device, True)


def test_fake_kernel_shapes_without_running():
    with FakeTensorMode():
        logits = torch.empty(11, 48, dtype=torch.bfloat16)
        weights, ids = torch.ops.moe_kernels.softmax_topk(logits, 5, None, "softmax", True, 0, 0, "top2_sum", 1.0, True)
    assert weights.shape == ids.shape == (11, 5)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32


def _compile_matches_eager(device, backend):
    options = dict(score_func="sigmoid", num_groups=4, topk_groups=2, renormalize=True, scale=2.5)
    bias = testing.make_bias(32).to(device)

    def route(x):
        weights, ids = moe_kernels.softmax_topk(x, 4, bias=bias, backend=backend, **options)
        return weights * 2, ids

    def logits(num_tokens):
        routing = RoutingConfig(**options)
        return testing.make_routing_logits(num_tokens, 32, routing=routing, bias=bias.cpu(), seed=num_tokens).to(device)

    # Two token counts: one dynamic graph, no recompile per T; the forward is bit-exact.
    assert_compile_matches_eager(route, (logits(7),), (logits(19),), dynamic=True, forward_exact=True)
    # ... and the gradient through the compiled graph equals eager's.
    assert_compile_matches_eager(route, (logits(7).requires_grad_(True),))


def test_compile_fullgraph_reference_path():
    _compile_matches_eager("cpu", "torch")


@pytest.mark.kernel
def test_compile_fullgraph_kernel_path(kernel_device):
    _compile_matches_eager(kernel_device, "triton")


# ------------------------------------------------------------------------------------------------
# Gradients


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
    logits = testing.make_routing_logits(5, 16, torch.float64, routing=RoutingConfig(**options))
    bias = testing.make_bias(16).double()
    logits.requires_grad_(True)

    def through_op(x):  # the registered op with its explicit backward formula
        return moe_kernels.softmax_topk(x, 4, bias=bias, backend="torch", **options)[0]

    def through_autograd(x):  # the reference differentiated by autograd
        return reference.softmax_topk(x, 4, routing=RoutingConfig(**options), bias=bias)[0]

    assert torch.autograd.gradcheck(through_op, (logits,))
    assert torch.autograd.gradcheck(through_autograd, (logits,))


def test_bias_gets_no_gradient():
    logits = testing.make_routing_logits(4, 8).requires_grad_(True)
    bias = testing.make_bias(8).requires_grad_(True)
    weights, _ = moe_kernels.softmax_topk(logits, 2, bias=bias, backend="torch")
    weights.sum().backward()
    assert logits.grad is not None and bias.grad is None


@routing_cases
def test_explicit_backward_matches_autograd(num_experts, k, options, with_bias):
    logits, bias = routing_inputs(33, num_experts, options, with_bias, torch.float64)
    logits.requires_grad_(True)
    grad_out = torch.randn(33, k, dtype=torch.float64)
    routing = RoutingConfig(**options)
    weights, ids = reference.softmax_topk(logits, k, routing=routing, bias=bias)
    (want,) = torch.autograd.grad(weights, logits, grad_out)
    got = reference.softmax_topk_backward(grad_out, logits.detach(), ids, routing=routing)
    testing.assert_close(got, want)
