"""kNN family, Triton kernels (CUDA, or the interpreter on CPU): ``knn_mix`` and the fused
``knn_route`` forward and backward against the float64 reference (itself checked against the
oracles in test_knn_reference.py), the fused route against the unfused kernels, zero confidence
bit-exact, the in-kernel check of the neighbour ids, and a small property test of the fused route
against the float64 oracle."""

from __future__ import annotations

import pytest
import strategies
import torch
from helpers import assert_routing_matches_oracle
from hypothesis import given, settings
from hypothesis import strategies as st
from knn_cases import MIXING_IDS, MIXINGS, ROUTINGS, mix_inputs, mixings, route_inputs, routings, unfused
from oracles import knn_route_oracle

from moe_kernels import testing
from moe_kernels.config import KnnMixing, RoutingConfig
from moe_kernels.functional.knn import knn_mix, knn_route
from moe_kernels.functional.routing import softmax_topk
from moe_kernels.reference import knn as knn_ref

pytestmark = pytest.mark.kernel

# ------------------------------------------------------------------------------------------------
# knn_mix


def _mix_kernel_vs_reference(device, dtype, options, num_tokens=67, num_experts=72, num_neighbors=5):
    router, neighbors, sims = mix_inputs(num_tokens, num_experts, num_neighbors, dtype, device)
    r_k, n_k = router.clone().requires_grad_(True), neighbors.clone().requires_grad_(True)
    with testing.poisoned_outputs():
        mixed, conf = knn_mix(r_k, n_k, sims, backend="triton", **options)
        grad = torch.randn_like(mixed)
        mixed.backward(grad)
    for name, t in (("mixed", mixed), ("conf", conf), ("grad_router", r_k.grad), ("grad_neighbors", n_k.grad)):
        testing.assert_written(t, name)
    r64, n64 = router.double().requires_grad_(True), neighbors.double().requires_grad_(True)
    want_mixed, want_conf = knn_ref.knn_mix(r64, n64, sims.double(), mixing=KnnMixing(**options))
    want_mixed.backward(grad.double())
    testing.assert_close(conf, want_conf)
    testing.assert_close(mixed, want_mixed)
    assert r_k.grad.dtype == n_k.grad.dtype == dtype
    testing.assert_close(r_k.grad, r64.grad)
    testing.assert_close(n_k.grad, n64.grad)


@pytest.mark.parametrize("options", MIXINGS, ids=MIXING_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_mix_kernel_matches_reference(kernel_device, options, dtype):
    _mix_kernel_vs_reference(kernel_device, dtype, options)


@pytest.mark.parametrize("shape", [(0, 8, 2), (1, 1, 1), (7, 257, 3), (130, 8, 32)])
def test_mix_kernel_odd_sizes(kernel_device, shape):
    _mix_kernel_vs_reference(kernel_device, torch.float32, MIXINGS[1], *shape)


def test_mix_kernel_zero_confidence_is_bit_exact_router(kernel_device):
    router, neighbors, sims = mix_inputs(16, 32, 4, device=kernel_device)
    sims[:8] = -sims[:8].abs()
    sims[8:12, 0] = float("nan")
    neighbors[:12] = float("nan")
    mixed, conf = knn_mix(router, neighbors, sims, backend="triton")
    assert (conf[:12] == 0).all()
    assert torch.equal(mixed[:12], router[:12])


# ------------------------------------------------------------------------------------------------
# knn_route


def _route_kernel_vs_reference(
    device, num_tokens, num_experts, k, options, with_bias, mixing, dtype=torch.float32, num_neighbors=5, seed=0
):
    router, ids, sims, memory, bias = route_inputs(
        num_tokens, num_experts, num_neighbors, options, with_bias, dtype, mixing=mixing, seed=seed, device=device
    )
    r_k, m_k = router.clone().requires_grad_(True), memory.clone().requires_grad_(True)
    with testing.poisoned_outputs():
        weights, chosen, conf = knn_route(r_k, ids, sims, m_k, k, bias=bias, backend="triton", **options, **mixing)
        grad = torch.randn(weights.shape, device=device)
        weights.backward(grad)
    for name, t in (
        ("weights", weights),
        ("ids", chosen),
        ("conf", conf),
        ("grad_router", r_k.grad),
        ("grad_memory", m_k.grad),
    ):
        testing.assert_written(t, name)
    assert weights.dtype == conf.dtype == torch.float32 and chosen.dtype == torch.int32
    assert weights.shape == chosen.shape == (num_tokens, k) and conf.shape == (num_tokens,)
    r64, m64 = router.double().requires_grad_(True), memory.double().requires_grad_(True)
    bias64 = None if bias is None else bias.double()
    routing, knn_mixing = RoutingConfig(**options), KnnMixing(**mixing)
    want_weights, want_ids, want_conf = knn_ref.knn_route(
        r64, ids, sims.double(), m64, k, routing=routing, bias=bias64, mixing=knn_mixing
    )
    want_weights.backward(grad.double())
    torch.testing.assert_close(chosen, want_ids, atol=0, rtol=0)
    testing.assert_close(weights, want_weights, dtype=torch.float32)
    testing.assert_close(conf, want_conf, dtype=torch.float32)
    assert r_k.grad.dtype == m_k.grad.dtype == dtype
    testing.assert_close(r_k.grad, r64.grad, msg="grad_router, kernel vs float64 reference")
    testing.assert_close(m_k.grad, m64.grad, msg="grad_memory, kernel vs float64 reference")


@routings
@mixings
def test_route_kernel_matches_reference(kernel_device, num_experts, k, options, with_bias, mixing):
    _route_kernel_vs_reference(kernel_device, 37, num_experts, k, options, with_bias, mixing)


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_route_kernel_16bit_logits(kernel_device, dtype):
    options = dict(score_func="sigmoid", num_groups=8, topk_groups=4, renormalize=True, scale=2.5)
    _route_kernel_vs_reference(kernel_device, 37, 64, 6, options, True, MIXINGS[1], dtype=dtype)


@pytest.mark.parametrize("num_experts", [8, 60, 160])
@pytest.mark.parametrize("num_tokens", [0, 1, 37])
def test_route_kernel_sizes(kernel_device, num_tokens, num_experts):
    options = dict(renormalize=True, num_groups=4, topk_groups=2, group_score="max", scale=3.0)
    _route_kernel_vs_reference(kernel_device, num_tokens, num_experts, 3, options, False, MIXINGS[0], num_neighbors=3)


def test_route_kernel_many_neighbours_and_int32_ids(kernel_device):
    router, ids, sims, memory, _ = route_inputs(21, 40, 32, num_rows=9, device=kernel_device)
    got = knn_route(router, ids.int(), sims, memory, 4, backend="triton", weighting="softmax")
    want = knn_route(router.cpu(), ids.cpu(), sims.cpu(), memory.cpu(), 4, backend="torch", weighting="softmax")
    torch.testing.assert_close(got[1].cpu(), want[1], atol=0, rtol=0)
    testing.assert_close(got[0].cpu(), want[0])
    testing.assert_close(got[2].cpu(), want[2])


def test_route_kernel_equals_unfused_kernels(kernel_device):
    name = "dsv2-groups-max"
    num_experts, k, options, with_bias = ROUTINGS[name]
    router, ids, sims, memory, bias = route_inputs(37, num_experts, 6, options, with_bias, device=kernel_device)
    weights, chosen, conf = knn_route(router, ids, sims, memory, k, bias=bias, backend="triton", **options)
    want_weights, want_ids, want_conf = unfused(router, ids, sims, memory, k, bias, options, {}, backend="triton")
    torch.testing.assert_close(chosen, want_ids, atol=0, rtol=0)
    testing.assert_close(weights, want_weights)
    testing.assert_close(conf, want_conf)


def test_route_kernel_zero_confidence_is_bit_exact_frozen_routing(kernel_device):
    router, ids, sims, memory, bias = route_inputs(16, 60, 4, dict(score_func="sigmoid"), True, device=kernel_device)
    sims[:6] = -sims[:6].abs()
    sims[6:9, 1] = float("nan")
    sims[9:12] = 0.3
    memory[ids[:12].flatten()] = float("nan")
    options = dict(score_func="sigmoid", bias=bias, num_groups=6, topk_groups=2, renormalize=True, scale=2.5)
    weights, chosen, conf = knn_route(router, ids, sims, memory, 5, min_confidence=0.4, backend="triton", **options)
    want_weights, want_ids = softmax_topk(router, 5, backend="triton", **options)
    assert (conf[:12] == 0).all()
    assert torch.equal(weights[:12], want_weights[:12]) and torch.equal(chosen[:12], want_ids[:12])


@pytest.mark.parametrize("bad_id", [-1, 4, 2**40])
def test_route_kernel_checks_neighbor_ids_itself(kernel_device, bad_id):
    """The Triton forward checks the ids in its kernel: an id outside the memory (even one far
    past it, or below 0 on a token that falls back) gathers nothing and fails the launcher's
    device assert; valid ids set nothing off."""
    from moe_kernels.ops.knn import launch_knn_route

    router, ids, sims, memory, _ = route_inputs(5, 8, 2, num_rows=4)
    args = [t.to(kernel_device) for t in (router, ids, sims, memory)]
    options = (RoutingConfig(), None, KnnMixing())  # routing, bias, mixing
    launch_knn_route(*args, 2, *options)
    bad = args[1].clone()
    bad[3, 1] = bad_id
    with pytest.raises(RuntimeError, match=r"neighbor_ids must lie in \[0, N\) = \[0, 4\)"):
        launch_knn_route(args[0], bad, *args[2:], 2, *options)
        if kernel_device == "cuda":
            torch.cuda.synchronize()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter on inf - inf
@settings(max_examples=strategies.examples(20))  # the interpreter is slow: small cases
@given(data=st.data())
def test_route_kernel_property_matches_oracle(kernel_device, data):
    num_tokens, num_neighbors = data.draw(st.sampled_from([0, 1, 7])), data.draw(st.sampled_from([1, 3]))
    num_rows, num_experts = data.draw(st.sampled_from([1, 5])), data.draw(st.sampled_from([2, 8, 60]))
    options, k = strategies.drawn_routing(data.draw, num_experts)
    mixing = dict(weighting=data.draw(st.sampled_from(["similarity", "softmax"])), temperature=0.1)
    source = strategies.drawn_generator(data.draw)
    router = torch.randn(num_tokens, num_experts, generator=source) * 2
    memory = torch.randn(num_rows, num_experts, generator=source) * 2
    ids = torch.randint(0, num_rows, (num_tokens, num_neighbors), generator=source)
    sims = torch.rand(num_tokens, num_neighbors, generator=source) * 0.95 + 0.05
    sims = strategies.with_special_values(data.draw, sims, label="sims specials")
    router, ids, sims, memory = (
        strategies.with_drawn_layout(data.draw, x).to(kernel_device) for x in (router, ids, sims, memory)
    )
    with testing.poisoned_outputs():
        weights, chosen, conf = knn_route(router, ids, sims, memory, k, backend="triton", **options, **mixing)
    _, _, want_conf, want_mixed = knn_route_oracle(
        router.cpu(), ids.cpu(), sims.cpu(), memory.cpu(), k, mixing=mixing, **options
    )
    testing.assert_close(conf.cpu(), want_conf, dtype=torch.float32)
    assert_routing_matches_oracle(weights.cpu(), chosen.cpu(), want_mixed, k, rel_tol=1e-4, abs_tol=1e-30, **options)
