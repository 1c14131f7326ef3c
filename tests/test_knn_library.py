"""kNN family, library: gradcheck in float64 (``knn_mix``, ``knn_route``,
``knn_route_assignments``), the explicit backward against autograd, ``torch.library`` opcheck of
``knn_mix``, ``knn_route`` and their backward ops, torch.compile equals eager, the eager
``autograd.Function`` equals the registered op; reference path, and the kernel path (``kernel``)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_compile_matches_eager, assert_function_matches_op
from knn_cases import (
    MIXINGS,
    ROUTE_OPCHECK_CASES,
    assign_inputs,
    mix_inputs,
    mix_op_args,
    mixings,
    route_inputs,
    route_op_args,
)

from moe_kernels import reference, testing
from moe_kernels.config import KnnMixing, RoutingConfig
from moe_kernels.functional.knn import knn_mix, knn_route, knn_route_assignments
from moe_kernels.ops.knn import KNN_MIX, KNN_ROUTE
from moe_kernels.reference import knn as knn_ref

# ------------------------------------------------------------------------------------------------
# Gradients


@mixings
def test_mix_gradcheck_float64(mixing):
    router, neighbors, sims = mix_inputs(5, 7, 3, torch.float64)
    router.requires_grad_(True)
    neighbors.requires_grad_(True)

    def through_op(r, n):
        return knn_mix(r, n, sims, backend="torch", **mixing)[0]

    def through_autograd(r, n):
        return reference.knn_mix(r, n, sims, mixing=KnnMixing(**mixing))[0]

    assert torch.autograd.gradcheck(through_op, (router, neighbors))
    assert torch.autograd.gradcheck(through_autograd, (router, neighbors))


def _route_grad_inputs():
    router, ids, sims, memory, bias = route_inputs(6, 8, 3, dict(score_func="sigmoid"), True, num_rows=5)
    ids[0] = ids[1]  # rows shared by tokens accumulate
    return router.double(), ids, sims.double(), memory.double(), bias


@mixings
@pytest.mark.parametrize(
    "options",
    [dict(renormalize=True, scale=1.5), dict(score_func="sigmoid", num_groups=2, topk_groups=1)],
    ids=["softmax-renorm", "sigmoid-groups"],
)
def test_route_gradcheck_float64(options, mixing):
    router, ids, sims, memory, bias = _route_grad_inputs()
    router.requires_grad_(True)
    memory.requires_grad_(True)

    def through_op(r, m):
        return knn_route(r, ids, sims, m, 3, bias=bias, backend="torch", **options, **mixing)[0]

    def through_autograd(r, m):
        routing = RoutingConfig(**options)
        return knn_ref.knn_route(r, ids, sims, m, 3, routing=routing, bias=bias, mixing=KnnMixing(**mixing))[0]

    assert torch.autograd.gradcheck(through_op, (router, memory))
    assert torch.autograd.gradcheck(through_autograd, (router, memory))


def test_route_explicit_backward_matches_autograd_and_memory_without_grad():
    router, ids, sims, memory, bias = _route_grad_inputs()
    options = dict(renormalize=True, score_func="sigmoid", scale=2.0)
    grad = torch.randn(6, 3, dtype=torch.float64)
    r_auto, m_auto = router.clone().requires_grad_(True), memory.clone().requires_grad_(True)
    knn_ref.knn_route(r_auto, ids, sims, m_auto, 3, routing=RoutingConfig(**options), bias=bias)[0].backward(grad)
    r_op, m_op = router.clone().requires_grad_(True), memory.clone().requires_grad_(True)
    knn_route(r_op, ids, sims, m_op, 3, bias=bias, backend="torch", **options)[0].backward(grad)
    testing.assert_close(r_op.grad, r_auto.grad)
    testing.assert_close(m_op.grad, m_auto.grad)
    # A memory that does not require grad gets none, and the router's gradient is unchanged.
    r_only = router.clone().requires_grad_(True)
    weights, _, conf = knn_route(r_only, ids, sims, memory, 3, bias=bias, backend="torch", **options)
    assert not conf.requires_grad
    weights.backward(grad)
    assert memory.grad is None
    testing.assert_close(r_only.grad, r_auto.grad)


def test_assignments_gradients_reach_router_and_memory():
    router, ids, sims, memory = assign_inputs()
    router.requires_grad_()
    memory.requires_grad_()
    assert torch.autograd.gradcheck(lambda r, m: knn_route_assignments(r, ids, sims, m, 2)[0], (router, memory))


# ------------------------------------------------------------------------------------------------
# torch.library: opcheck of every registered op, the eager Function against the registered op


def _opcheck_mix(router, neighbors, sims, mixing, use_triton, requires_grad=True):
    """opcheck of the registered ``knn_mix`` op, the router and neighbour logits requiring grad
    or not."""
    router, neighbors = router.clone().requires_grad_(requires_grad), neighbors.clone().requires_grad_(requires_grad)
    args = mix_op_args(router, neighbors, sims, mixing, use_triton)
    torch.library.opcheck(torch.ops.moe_kernels.knn_mix.default, KNN_MIX.flat_args(args))


def _opcheck_route(inputs, options, mixing, use_triton, router_grad=True, memory_grad=True):
    """opcheck of the registered ``knn_route`` op (k = 3) on ``inputs`` = ``route_inputs(...)``,
    the router and memory logits requiring grad as asked."""
    router, ids, sims, memory, bias = inputs
    router, memory = router.clone().requires_grad_(router_grad), memory.clone().requires_grad_(memory_grad)
    args = route_op_args(router, ids, sims, memory, 3, bias, options, mixing, use_triton)
    torch.library.opcheck(torch.ops.moe_kernels.knn_route.default, KNN_ROUTE.flat_args(args))


@pytest.mark.parametrize("num_tokens", [0, 1, 11])
def test_mix_opcheck_reference_path(num_tokens):
    for options in MIXINGS:
        router, neighbors, sims = mix_inputs(num_tokens, 12, 3)
        for requires_grad in (False, True):
            _opcheck_mix(router, neighbors, sims, options, False, requires_grad)
        grad = torch.randn(num_tokens, 12)
        mixing = mix_op_args(router, neighbors, sims, options, False)[3]
        backward_args = KNN_MIX.flat_backward_args((grad, sims, mixing, torch.float32, torch.float32, False))
        torch.library.opcheck(torch.ops.moe_kernels.knn_mix_backward.default, backward_args)


@pytest.mark.parametrize("num_tokens", [0, 1, 13])
def test_route_opcheck_reference_path(num_tokens):
    for options, mixing, with_bias in ROUTE_OPCHECK_CASES:
        inputs = route_inputs(num_tokens, 12, 3, options, with_bias, num_rows=7)
        for router_grad, memory_grad in ((False, False), (True, True), (True, False), (False, True)):
            _opcheck_route(inputs, options, mixing, False, router_grad, memory_grad)
        router, ids, sims, memory, bias = inputs
        args = route_op_args(router, ids, sims, memory, 3, bias, options, mixing, False)
        _, chosen, _ = torch.ops.moe_kernels.knn_route(*KNN_ROUTE.flat_args(args))
        routing, knn_mixing = args[6:8]
        for memory_grad in (False, True):
            grad = torch.randn(num_tokens, 3)
            backward_args = (grad, router, ids, sims, memory, chosen, routing, knn_mixing, memory_grad, False)
            torch.library.opcheck(
                torch.ops.moe_kernels.knn_route_backward.default, KNN_ROUTE.flat_backward_args(backward_args)
            )


def _mix_function_matches_op(device, use_triton):
    router, neighbors, sims = mix_inputs(13, 16, 3, device=device)
    for mixing in MIXINGS:
        args = mix_op_args(
            router.clone().requires_grad_(True), neighbors.clone().requires_grad_(True), sims, mixing, use_triton
        )
        assert_function_matches_op(KNN_MIX, args)


def _route_function_matches_op(device, use_triton):
    for options, mixing, with_bias in ROUTE_OPCHECK_CASES:
        router, ids, sims, memory, bias = route_inputs(13, 16, 3, options, with_bias, device=device)
        args = route_op_args(
            router.requires_grad_(True), ids, sims, memory.requires_grad_(True), 3, bias, options, mixing, use_triton
        )
        assert_function_matches_op(KNN_ROUTE, args)


def test_eager_function_matches_registered_op():
    _mix_function_matches_op("cpu", False)
    _route_function_matches_op("cpu", False)


@pytest.mark.kernel
def test_mix_kernel_opcheck_and_eager_function(kernel_device):
    _opcheck_mix(*mix_inputs(13, 16, 3, device=kernel_device), MIXINGS[0], True)
    _mix_function_matches_op(kernel_device, True)


@pytest.mark.kernel
def test_route_kernel_opcheck_and_eager_function(kernel_device):
    options, mixing, with_bias = ROUTE_OPCHECK_CASES[1]
    _opcheck_route(route_inputs(13, 16, 3, options, with_bias, device=kernel_device), options, mixing, True)
    _route_function_matches_op(kernel_device, True)


# ------------------------------------------------------------------------------------------------
# torch.compile


def test_mix_compile_fullgraph_matches_eager():
    router, neighbors, sims = mix_inputs(10, 16, 4)

    def mix(r, n):
        return knn_mix(r, n, sims, weighting="softmax", backend="torch")

    assert_compile_matches_eager(mix, (router.requires_grad_(True), neighbors.requires_grad_(True)))


def test_route_compile_fullgraph_matches_eager():
    router, ids, sims, memory, bias = route_inputs(10, 16, 4, dict(score_func="sigmoid"), True)
    options = dict(score_func="sigmoid", bias=bias, num_groups=4, topk_groups=2, renormalize=True, weighting="softmax")

    def route(r, m):
        return knn_route(r, ids, sims, m, 3, backend="torch", **options)

    assert_compile_matches_eager(route, (router.requires_grad_(True), memory.requires_grad_(True)))


def test_route_compile_checks_ids_without_a_graph_break():
    router, ids, sims, memory, _ = route_inputs(5, 8, 2, num_rows=4)
    route = assert_compile_matches_eager(lambda i: knn_route(router, i, sims, memory, 2, backend="torch")[1], (ids,))
    with pytest.raises(RuntimeError, match=r"neighbor_ids must lie in \[0, N\) = \[0, 4\)"):
        route(ids + 4)


def test_assignments_compile_fullgraph_matches_eager():
    router, ids, sims, memory = assign_inputs(dtype=torch.float32)

    def assign(r, m):
        return knn_route_assignments(r, ids, sims, m, 2, renormalize=True, backend="torch")

    assert_compile_matches_eager(assign, (router.requires_grad_(True), memory.requires_grad_(True)))
