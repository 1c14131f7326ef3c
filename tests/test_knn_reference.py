"""kNN family, reference path: ``knn_mix``, ``knn_route`` and ``knn_route_assignments`` against
the float64 oracles (per-token loops written from the formulas), the documented properties
(zero confidence, neighbour order, non-finite similarities), and properties on random shapes,
dtypes, layouts, options and non-finite values."""

from __future__ import annotations

import pytest
import strategies
import torch
from helpers import assert_routing_matches_oracle
from hypothesis import given, settings
from hypothesis import strategies as st
from knn_cases import MIXINGS, assign_inputs, mix_inputs, mixings, route_inputs, routings, unfused
from oracles import knn_mix_oracle, knn_route_assignments_oracle, knn_route_oracle, softmax_topk_oracle
from strategies import INF, NAN

import moe_kernels as mk
from moe_kernels import testing
from moe_kernels.config import RoutingConfig
from moe_kernels.functional.knn import knn_mix, knn_route, knn_route_assignments
from moe_kernels.functional.routing import softmax_topk

# ------------------------------------------------------------------------------------------------
# knn_mix


@mixings
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mix_reference_matches_oracle(mixing, dtype):
    router, neighbors, sims = mix_inputs(41, 60, 8, dtype)
    mixed, conf = knn_mix(router, neighbors, sims, backend="torch", **mixing)
    want_mixed, want_conf = knn_mix_oracle(router, neighbors, sims, **mixing)
    assert mixed.dtype == conf.dtype == torch.float32
    testing.assert_close(conf, want_conf)
    testing.assert_close(mixed, want_mixed)


def test_mix_zero_confidence_is_bit_exact_router():
    router, neighbors, sims = mix_inputs(16, 32, 4)
    sims[:8] = -sims[:8].abs()  # mean <= 0: conf 0
    sims[8:12, 0] = float("nan")  # NaN: conf 0
    neighbors[:12] = float("nan")  # whatever the neighbours hold
    mixed, conf = knn_mix(router, neighbors, sims, backend="torch")
    assert (conf[:12] == 0).all()
    assert torch.equal(mixed[:12], router[:12])


def test_mix_single_neighbour_with_similarity_one_gives_its_logits():
    router, neighbors, _ = mix_inputs(9, 20, 1)
    sims = torch.ones(9, 1)
    for weighting in ("similarity", "softmax"):
        mixed, conf = knn_mix(router, neighbors, sims, weighting=weighting, backend="torch")
        assert (conf == 1).all()
        assert torch.equal(mixed, neighbors[:, 0])


def test_mix_invariant_to_neighbour_order():
    router, neighbors, sims = mix_inputs(13, 24, 6)
    order = torch.randperm(6)
    for options in MIXINGS:
        mixed, conf = knn_mix(router, neighbors, sims, backend="torch", **options)
        mixed_p, conf_p = knn_mix(router, neighbors[:, order], sims[:, order], backend="torch", **options)
        testing.assert_close(mixed_p, mixed)
        testing.assert_close(conf_p, conf)


# ------------------------------------------------------------------------------------------------
# knn_route


@routings
@mixings
def test_route_reference_equals_gather_mix_route(num_experts, k, options, with_bias, mixing):
    router, ids, sims, memory, bias = route_inputs(29, num_experts, 6, options, with_bias, mixing=mixing)
    router64, memory64 = router.double(), memory.double()
    weights, chosen, conf = knn_route(router64, ids, sims, memory64, k, bias=bias, backend="torch", **options, **mixing)
    want_unfused = unfused(router64, ids, sims, memory64, k, bias, options, mixing)
    assert weights.dtype == conf.dtype == torch.float64 and chosen.dtype == torch.int32
    # The same ids; values to float64 rounding (the fused CPU path sums the retrieved rows in
    # another order than knn_mix's product, which on some CPUs differs in the last bit).
    torch.testing.assert_close(chosen, want_unfused[1], atol=0, rtol=0)
    testing.assert_close(weights, want_unfused[0], dtype=torch.float64)
    testing.assert_close(conf, want_unfused[2], dtype=torch.float64)
    # ... and the independent per-token float64 oracles.
    want_weights, want_ids, _, _ = knn_route_oracle(router, ids, sims, memory, k, bias=bias, mixing=mixing, **options)
    torch.testing.assert_close(chosen, want_ids, atol=0, rtol=0)
    testing.assert_close(weights, want_weights, dtype=torch.float64)
    # float32 inputs: float32 outputs, the same ids.
    weights32, chosen32, conf32 = knn_route(
        router, ids, sims, memory, k, bias=bias, backend="torch", **options, **mixing
    )
    assert weights32.dtype == conf32.dtype == torch.float32
    torch.testing.assert_close(chosen32, want_ids, atol=0, rtol=0)
    testing.assert_close(weights32, want_weights, dtype=torch.float32)
    testing.assert_close(conf32, conf, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_zero_confidence_is_bit_exact_frozen_routing(dtype):
    router, ids, sims, memory, _ = route_inputs(16, 32, 4, dtype=dtype)
    sims[:6] = -sims[:6].abs()  # mean <= 0
    sims[6:9, 1] = float("nan")  # a NaN similarity
    sims[9:12] = 0.3  # below min_confidence
    memory[ids[:12].flatten()] = float("nan")  # whatever the memory holds
    options = dict(renormalize=True, scale=2.0)
    weights, chosen, conf = knn_route(router, ids, sims, memory, 5, min_confidence=0.4, backend="torch", **options)
    want_weights, want_ids = softmax_topk(router, 5, backend="torch", **options)
    assert (conf[:12] == 0).all()
    assert torch.equal(weights[:12], want_weights[:12]) and torch.equal(chosen[:12], want_ids[:12])


def test_route_invariant_to_neighbour_order():
    router, ids, sims, memory, _ = route_inputs(13, 24, 6)
    order = torch.randperm(6)
    for mixing in MIXINGS:
        weights, chosen, conf = knn_route(router, ids, sims, memory, 3, backend="torch", **mixing)
        weights_p, chosen_p, conf_p = knn_route(
            router, ids[:, order], sims[:, order], memory, 3, backend="torch", **mixing
        )
        torch.testing.assert_close(chosen_p, chosen, atol=0, rtol=0)
        testing.assert_close(weights_p, weights)
        testing.assert_close(conf_p, conf)


def test_route_int32_ids_equal_int64_ids():
    router, ids, sims, memory, _ = route_inputs(11, 16, 3)
    got = knn_route(router, ids.int(), sims, memory, 2, backend="torch")
    want = knn_route(router, ids, sims, memory, 2, backend="torch")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=0, rtol=0)


def test_route_nan_and_inf_similarities_are_documented():
    router, ids, sims, memory, _ = route_inputs(4, 10, 3)
    sims[0, 2] = float("nan")  # conf 0: the router's routing
    sims[1, 0] = float("inf")  # conf 1, NaN weights w: NaN mixed logits
    weights, chosen, conf = knn_route(router, ids, sims, memory, 4, backend="torch")
    want_weights, want_ids = softmax_topk(router, 4, backend="torch")
    assert conf[0] == 0 and conf[1] == 1
    assert torch.equal(weights[0], want_weights[0]) and torch.equal(chosen[0], want_ids[0])
    assert weights[1].isnan().all()
    assert sorted(chosen[1].tolist()) == sorted(set(chosen[1].tolist())) and ((chosen >= 0) & (chosen < 10)).all()


# ------------------------------------------------------------------------------------------------
# knn_route_assignments


def _dense(weights, experts, num_experts):
    """The ``(T, E)`` assignment a ``(weights, ids)`` pair holds (ids distinct, -1 slots weight 0)."""
    dense = torch.zeros(weights.shape[0], num_experts, dtype=torch.float64)
    for t in range(weights.shape[0]):
        valid = experts[t] >= 0
        assert bool((weights[t][~valid] == 0).all()) and len(set(experts[t][valid].tolist())) == int(valid.sum())
        dense[t, experts[t][valid].long()] = weights[t][valid].double()
    return dense


@pytest.mark.parametrize("routing", [dict(), dict(renormalize=True, score_func="sigmoid")])
def test_assignments_match_dense_oracle(routing):
    router, ids, sims, memory = assign_inputs()
    weights, experts, conf = knn_route_assignments(router, ids, sims, memory, 2, **routing)
    assert weights.shape == experts.shape == (6, 8)  # k * (n + 1) columns
    want_dense, want_conf = knn_route_assignments_oracle(router, ids, sims, memory, 2, **routing)
    torch.testing.assert_close(_dense(weights, experts, 10), want_dense)
    torch.testing.assert_close(conf, want_conf)


def test_assignments_zero_confidence_give_the_router_assignment():
    router, ids, sims, memory = assign_inputs()
    weights, experts, conf = knn_route_assignments(router, ids, -sims, memory, 3)
    want_w, want_ids = softmax_topk_oracle(router, 3)
    assert bool((conf == 0).all())
    assert torch.equal(experts[:, :3], want_ids) and bool((experts[:, 3:] == -1).all())
    torch.testing.assert_close(weights[:, :3], want_w)


def test_assignments_keep_negative_weights_and_take_empty_batches():
    # Regressions: a negative scale (or similarity weights of both signs) makes mixed weights
    # negative, which were dropped from the support; T = 0 raised in a reshape.
    router, ids, sims, memory = assign_inputs()
    sims[:, 0] = -0.5 * sims[:, 0]  # positive means, a negative neighbour weight
    weights, experts, _ = knn_route_assignments(router, ids, sims, memory, 2, scale=-1.0)
    want_dense, _ = knn_route_assignments_oracle(router, ids, sims, memory, 2, scale=-1.0)
    assert bool((want_dense < 0).any())
    torch.testing.assert_close(_dense(weights, experts, 10), want_dense)
    empty = knn_route_assignments(router[:0], ids[:0], sims[:0], memory, 2)
    assert [tuple(t.shape) for t in empty] == [(0, 8), (0, 8), (0,)]


def test_assignments_feed_fused_experts():
    router, ids, sims, memory = assign_inputs()
    weights, experts, _ = knn_route_assignments(router, ids, sims, memory, 2)
    hidden, gate_up, down = (
        torch.randn(6, 8, dtype=torch.float64),
        torch.randn(10, 12, 8, dtype=torch.float64),
        torch.randn(10, 8, 6, dtype=torch.float64),
    )
    out = mk.fused_experts(hidden, gate_up, down, weights, experts)
    # Every expert with a nonzero mixed weight runs, the -1 slots contribute nothing.
    dense, _ = knn_route_assignments_oracle(router, ids, sims, memory, 2)
    want = torch.zeros_like(hidden)
    for t in range(6):
        for e in torch.nonzero(dense[t]).flatten().tolist():
            h = gate_up[e] @ hidden[t]
            want[t] += dense[t, e] * (down[e] @ (torch.nn.functional.silu(h[:6]) * h[6:]))
    torch.testing.assert_close(out, want)


# ------------------------------------------------------------------------------------------------
# Properties


@st.composite
def mixing_options(draw):
    return dict(
        weighting=draw(st.sampled_from(["similarity", "softmax"])),
        temperature=draw(st.sampled_from([0.05, 0.1, 1.0])),
        min_confidence=draw(st.sampled_from([0.0, 0.0, 0.3, 1.0])),
    )


def _route_case(draw, neighbor_counts, row_counts, expert_counts):
    """``(T, n, N, E, routing options, k, mixing)`` of a kNN route drawn with ``draw``: T from
    the shared token counts, n, N and E from the given ones."""
    num_tokens = draw(strategies.token_counts, label="T")
    num_neighbors = draw(st.sampled_from(neighbor_counts), label="n")
    num_rows = draw(st.sampled_from(row_counts), label="N")
    num_experts = draw(st.sampled_from(expert_counts), label="E")
    options, k = strategies.drawn_routing(draw, num_experts)
    return num_tokens, num_neighbors, num_rows, num_experts, options, k, draw(mixing_options(), label="mixing")


def _similarities(data, source, num_tokens, num_neighbors, signs):
    """``(T, n)`` similarities: ``"positive"`` in (0.05, 1), or ``"mixed"`` in (-0.5, 1) (means
    below 0 too, and similarity weights of either sign); some rows all negative (conf 0)."""
    low = 0.05 if signs == "positive" else -0.5
    sims = torch.rand(num_tokens, num_neighbors, generator=source, dtype=torch.float64) * (1 - low) + low
    negative = torch.rand(num_tokens, generator=source) < 0.2
    return torch.where(negative[:, None], -sims.abs(), sims)


def _assert_finite_close(got, want, tolerance, what):
    """NaN and infinities where ``want`` has them, finite entries within ``tolerance``."""
    got = got.double()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{what}: NaN pattern"
    infinite = torch.isinf(want)
    assert torch.equal(got[infinite], want[infinite]), f"{what}: infinities"
    finite = torch.isfinite(want)
    excess = (got - want).abs()[finite] - tolerance[finite]
    assert not bool((excess > 0).any()), f"{what}: off by {excess.max().item()} past the tolerance"


@settings(max_examples=strategies.examples(150))
@given(data=st.data())
def test_property_knn_mix_matches_oracle(data):
    num_tokens = data.draw(strategies.token_counts, label="T")
    num_neighbors = data.draw(st.sampled_from([1, 2, 3, 8]), label="n")
    num_experts = data.draw(st.sampled_from([1, 2, 5, 60, 257]), label="E")
    router_dtype = data.draw(strategies.reference_dtypes, label="router")
    neighbor_dtype = data.draw(strategies.reference_dtypes)
    mixing = data.draw(mixing_options(), label="mixing")
    source = strategies.drawn_generator(data.draw)
    router = torch.randn(num_tokens, num_experts, generator=source).to(router_dtype)
    neighbors = torch.randn(num_tokens, num_neighbors, num_experts, generator=source).to(neighbor_dtype)
    sims = _similarities(data, source, num_tokens, num_neighbors, data.draw(st.sampled_from(["positive", "mixed"])))
    sims = sims.to(data.draw(st.sampled_from([torch.float32, torch.float64, torch.float16])))
    router = strategies.with_special_values(data.draw, router, (NAN, INF), label="router specials")
    neighbors = strategies.with_special_values(data.draw, neighbors, (NAN, INF, -INF))
    sims = strategies.with_special_values(data.draw, sims, label="sims specials")
    router, neighbors, sims = (strategies.with_drawn_layout(data.draw, x) for x in (router, neighbors, sims))

    mixed, conf = knn_mix(router, neighbors, sims, backend="torch", **mixing)

    dtype = torch.float64 if router_dtype == torch.float64 else torch.float32
    assert mixed.dtype == conf.dtype == dtype and mixed.shape == router.shape and conf.shape == (num_tokens,)
    want_mixed, want_conf = knn_mix_oracle(router, neighbors, sims, **mixing)
    testing.assert_close(conf, want_conf, dtype=dtype)
    frozen = want_conf == 0  # the router's logits themselves, bit-exactly, whatever the neighbours hold
    torch.testing.assert_close(mixed[frozen], router[frozen].to(dtype), atol=0, rtol=0, equal_nan=True)
    # The error of the mix grows with the magnitude of its terms and with the cancellation in
    # sum(sims) (similarity weights of either sign): the tolerance follows both.
    s = sims.double()
    if mixing["weighting"] == "similarity":
        condition = s.abs().sum(-1) / s.sum(-1).abs()
        share = s.abs() / s.sum(-1, keepdim=True).abs()
    else:
        condition = torch.ones(num_tokens, dtype=torch.float64)
        share = torch.softmax(s / mixing["temperature"], -1)
    terms = router.double().abs() + want_conf[:, None] * (share[..., None] * neighbors.double().abs()).sum(1)
    atol, rtol = testing.tolerance(dtype)
    tolerance = atol + 4 * rtol * terms * (num_neighbors + condition)[:, None]
    _assert_finite_close(mixed[~frozen], want_mixed[~frozen], tolerance[~frozen], "mixed")


@settings(max_examples=strategies.examples(150))
@given(data=st.data())
def test_property_knn_route_matches_oracle(data):
    case = _route_case(data.draw, [1, 2, 5], [1, 3, 17], [1, 2, 5, 8, 60, 160])
    num_tokens, num_neighbors, num_rows, num_experts, options, k, mixing = case
    router_dtype = data.draw(strategies.reference_dtypes, label="router")
    memory_dtype = data.draw(strategies.reference_dtypes)
    source = strategies.drawn_generator(data.draw)
    router = (torch.randn(num_tokens, num_experts, generator=source) * 2).to(router_dtype)
    memory = (torch.randn(num_rows, num_experts, generator=source) * 2).to(memory_dtype)
    ids = torch.randint(0, num_rows, (num_tokens, num_neighbors), generator=source)
    ids = ids.to(data.draw(st.sampled_from([torch.int32, torch.int64])))
    # Similarities of one sign: the mix is well conditioned, so the float64 keys of the oracle
    # decide the routing up to near-ties (which assert_routing_matches_oracle allows either way).
    sims = _similarities(data, source, num_tokens, num_neighbors, "positive").to(torch.float32)
    sims = strategies.with_special_values(data.draw, sims, label="sims specials")
    memory = strategies.with_special_values(data.draw, memory, (NAN,), label="memory specials")
    bias = (torch.randn(num_experts, generator=source) * 0.5) if data.draw(st.booleans(), label="bias") else None
    router, ids, sims, memory = (strategies.with_drawn_layout(data.draw, x) for x in (router, ids, sims, memory))

    weights, chosen, conf = knn_route(router, ids, sims, memory, k, bias=bias, backend="torch", **options, **mixing)

    dtype = torch.float64 if router_dtype == torch.float64 else torch.float32
    assert weights.dtype == conf.dtype == dtype and chosen.dtype == torch.int32
    assert weights.shape == chosen.shape == (num_tokens, k) and conf.shape == (num_tokens,)
    _, _, want_conf, want_mixed = knn_route_oracle(router, ids, sims, memory, k, bias=bias, mixing=mixing, **options)
    testing.assert_close(conf, want_conf, dtype=dtype)
    assert_routing_matches_oracle(weights, chosen, want_mixed, k, bias=bias, rel_tol=1e-4, abs_tol=1e-30, **options)
    # conf = 0: bit-exactly the frozen router's routing (the public softmax_topk on its logits).
    frozen = want_conf == 0
    want_weights, want_ids = softmax_topk(router, k, bias=bias, backend="torch", **options)
    torch.testing.assert_close(chosen[frozen], want_ids[frozen], atol=0, rtol=0)
    torch.testing.assert_close(weights[frozen], want_weights[frozen], atol=0, rtol=0, equal_nan=True)


@settings(max_examples=strategies.examples(100))
@given(data=st.data())
def test_property_knn_route_assignments_match_oracle(data):
    case = _route_case(data.draw, [1, 2, 4], [1, 3, 11], [1, 2, 5, 8, 60])
    num_tokens, num_neighbors, num_rows, num_experts, options, k, mixing = case
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]), label="dtype")
    seed = data.draw(strategies.seeds, label="seed")
    source = strategies.generator(seed)
    bias = testing.make_bias(num_experts, seed=seed) if data.draw(st.booleans(), label="bias") else None
    # Tie-free logits (router rows and memory rows are routed as they are): the ids are defined.
    routing = RoutingConfig(**options)
    router = testing.make_routing_logits(num_tokens, num_experts, dtype, routing=routing, bias=bias, seed=seed)
    memory = testing.make_routing_logits(num_rows, num_experts, dtype, routing=routing, bias=bias, seed=seed + 1)
    ids = torch.randint(0, num_rows, (num_tokens, num_neighbors), generator=source)
    signs = data.draw(st.sampled_from(["positive", "mixed"]), label="sims")
    sims = _similarities(data, source, num_tokens, num_neighbors, signs).to(dtype)
    sims = strategies.with_special_values(data.draw, sims, (NAN,), label="NaN sims")
    router, ids, sims, memory = (strategies.with_drawn_layout(data.draw, x) for x in (router, ids, sims, memory))

    weights, experts, conf = knn_route_assignments(
        router, ids, sims, memory, k, bias=bias, backend="torch", **options, **mixing
    )

    width = min(num_experts, k * (num_neighbors + 1))
    assert weights.shape == experts.shape == (num_tokens, width) and conf.shape == (num_tokens,)
    assert weights.dtype == conf.dtype == dtype and experts.dtype == torch.int32
    want_dense, want_conf = knn_route_assignments_oracle(
        router, ids, sims, memory, k, bias=bias, mixing=mixing, **options
    )
    testing.assert_close(conf, want_conf, dtype=dtype)
    valid = experts >= 0
    assert bool(((experts >= -1) & (experts < num_experts)).all())
    # The support first, by decreasing weight, then -1 slots.
    assert bool((valid[:, :-1] | ~valid[:, 1:]).all()), "a -1 slot before an expert"
    ordered = torch.where(valid, weights.double(), -INF)
    assert bool((ordered[:, :-1] >= ordered[:, 1:]).all()), "weights not in decreasing order"
    condition = 1 + (sims.double().abs().sum(-1) / sims.double().sum(-1).abs()).nan_to_num(posinf=0.0)
    atol, rtol = testing.tolerance(dtype)
    tolerance = atol + rtol * condition[:, None] * max(1.0, abs(options["scale"]))
    excess = (_dense(weights, experts, num_experts) - want_dense).abs() - tolerance
    assert not bool((excess > 0).any()), f"dense assignment off by {excess.max().item()} past the tolerance"
