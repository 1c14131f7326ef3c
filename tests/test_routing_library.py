"""``torch.library`` registration of ``softmax_topk``: opcheck, fake tensors, torch.compile.

The reference path runs in the plain CPU pass; the ``kernel`` tests repeat the checks with the
Triton kernels (CUDA, or the interpreter).
"""

from __future__ import annotations

import pytest
import torch
from routing_cases import routing_inputs
from torch._subclasses.fake_tensor import FakeTensorMode

import moe_kernels
from moe_kernels import testing
from moe_kernels.ops.routing import SoftmaxTopkFunction

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
    return (
        logits,
        k,
        options.get("renormalize", False),
        options.get("score_func", "softmax"),
        bias,
        options.get("num_groups", 0),
        options.get("topk_groups", 0),
        options.get("group_score", "top2_sum"),
        float(options.get("scale", 1.0)),
        use_triton,
    )


def _opcheck(device, use_triton, num_tokens):
    for _, num_experts, k, options, with_bias in OPCHECK_CASES:
        logits, bias = routing_inputs(num_tokens, num_experts, options, with_bias, device=device)
        for requires_grad in (False, True):
            args = _op_args(logits.clone().requires_grad_(requires_grad), k, bias, options, use_triton)
            torch.library.opcheck(torch.ops.moe_kernels.softmax_topk.default, args)
        weights, ids = torch.ops.moe_kernels.softmax_topk(*_op_args(logits, k, bias, options, use_triton))
        grad = torch.randn_like(weights)
        bwd_args = (
            grad,
            logits,
            ids,
            options.get("renormalize", False),
            options.get("score_func", "softmax"),
            float(options.get("scale", 1.0)),
            use_triton,
        )
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
        through_function = logits.clone().requires_grad_(True)
        through_op = logits.clone().requires_grad_(True)
        weights_f, ids_f = SoftmaxTopkFunction.apply(*_op_args(through_function, k, bias, options, use_triton))
        weights_o, ids_o = torch.ops.moe_kernels.softmax_topk(*_op_args(through_op, k, bias, options, use_triton))
        torch.testing.assert_close(ids_f, ids_o, atol=0, rtol=0)
        torch.testing.assert_close(weights_f, weights_o, atol=0, rtol=0)
        grad = torch.randn_like(weights_f)
        weights_f.backward(grad)
        weights_o.backward(grad)
        torch.testing.assert_close(through_function.grad, through_op.grad, atol=0, rtol=0)


def test_eager_function_matches_registered_op():
    _eager_function_matches_op("cpu", False)


@pytest.mark.kernel
def test_eager_function_matches_registered_op_kernel_path(kernel_device):
    _eager_function_matches_op(kernel_device, True)


def test_fake_kernel_shapes_without_running():
    with FakeTensorMode():
        logits = torch.empty(11, 48, dtype=torch.bfloat16)
        weights, ids = torch.ops.moe_kernels.softmax_topk(logits, 5, True, "softmax", None, 0, 0, "top2_sum", 1.0, True)
    assert weights.shape == ids.shape == (11, 5)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32


def _compile_matches_eager(device, backend):
    options = dict(score_func="sigmoid", num_groups=4, topk_groups=2, renormalize=True, scale=2.5)
    bias = testing.make_bias(32).to(device)

    def route(x):
        weights, ids = moe_kernels.softmax_topk(x, 4, bias=bias, backend=backend, **options)
        return weights * 2, ids

    compiled = torch.compile(route, fullgraph=True, dynamic=True)
    for num_tokens in (7, 19):  # two token counts: one dynamic graph, no recompile per T
        logits = testing.make_routing_logits(
            num_tokens, 32, score_func="sigmoid", bias=bias.cpu(), num_groups=4, topk_groups=2, seed=num_tokens
        ).to(device)
        want_weights, want_ids = route(logits)
        got_weights, got_ids = compiled(logits)
        torch.testing.assert_close(got_ids, want_ids, atol=0, rtol=0)
        torch.testing.assert_close(got_weights, want_weights, atol=0, rtol=0)

    def loss(x):
        return (moe_kernels.softmax_topk(x, 4, bias=bias, backend=backend, **options)[0] ** 2).sum()

    logits = testing.make_routing_logits(7, 32, score_func="sigmoid", bias=bias.cpu(), num_groups=4, topk_groups=2).to(
        device
    )
    eager_x = logits.clone().requires_grad_(True)
    loss(eager_x).backward()
    compiled_x = logits.clone().requires_grad_(True)
    torch.compile(loss, fullgraph=True)(compiled_x).backward()
    testing.assert_close(compiled_x.grad, eager_x.grad)


def test_compile_fullgraph_reference_path():
    torch._dynamo.reset()
    _compile_matches_eager("cpu", "torch")


@pytest.mark.kernel
def test_compile_fullgraph_kernel_path(kernel_device):
    torch._dynamo.reset()
    _compile_matches_eager(kernel_device, "triton")
