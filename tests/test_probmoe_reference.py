"""ProbMoE family, reference path: the law against brute-force enumeration, the sampler against
the law, the explicit backward against autograd of an independent DP, the router's weights and
gradient paths, non-finite rows, and properties of ``exact_k_marginals``, ``exact_k_sample`` and
``probmoe_route`` on random shapes, bands, dtypes, layouts and non-finite logits."""

from __future__ import annotations

import itertools
import math

import pytest
import strategies
import torch
from helpers import chi_square_pvalue
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import (
    band_mode_oracle,
    exact_k_marginals_oracle,
    log_partition_dp,
    route_gradient_paths_oracle,
    subset_law_oracle,
)
from strategies import INF, NAN

import moe_kernels as mk
from moe_kernels import testing
from moe_kernels.reference import probmoe as ref
from moe_kernels.testing import assert_close


def _bands(num_experts: int):
    """Every (k, k_min) with 1 <= k <= E and k_min in {k (exact), 0, k // 2, 1}."""
    for k in range(1, num_experts + 1):
        for k_min in sorted({k, 0, k // 2, 1}):
            yield k, k_min


LAW_CASES = [(e, k, k_min) for e in (1, 2, 3, 5, 7, 10) for k, k_min in _bands(e)]


@pytest.mark.parametrize("num_experts,k,k_min", LAW_CASES)
def test_law_matches_enumeration(num_experts, k, k_min):
    logits = torch.randn(3, num_experts, dtype=torch.float64) * 3
    marginals, log_z, _ = ref.exact_k_forward(logits, k, k_min)
    for t in range(3):
        want_m, want_log_z, law = subset_law_oracle(logits[t], k, k_min)
        torch.testing.assert_close(marginals[t], want_m, atol=1e-12, rtol=1e-9)
        torch.testing.assert_close(log_z[t], want_log_z, atol=1e-12, rtol=1e-9)
        # The probability the law gives every subset, exp(sum r_S - log Z), is the enumerated one.
        for subset, prob in law.items():
            got = math.exp(logits[t, list(subset)].sum().item() - log_z[t].item())
            assert got == pytest.approx(prob, rel=1e-9, abs=1e-15), subset


@pytest.mark.parametrize("num_experts,k", [(8, 3), (60, 4), (160, 6)])
def test_exact_k_marginals_sum_to_k_and_shift_invariant(num_experts, k):
    logits = torch.randn(16, num_experts, dtype=torch.float64) * 4
    marginals = mk.exact_k_marginals(logits, k)
    torch.testing.assert_close(marginals.sum(-1), torch.full((16,), float(k), dtype=torch.float64))
    assert bool(((marginals >= 0) & (marginals <= 1 + 1e-12)).all())
    assert_close(mk.exact_k_marginals(logits + 37.5, k), marginals)


def test_band_is_not_shift_invariant():
    logits = torch.randn(4, 8, dtype=torch.float64)
    low, high = mk.exact_k_marginals(logits - 3, 4, k_min=1), mk.exact_k_marginals(logits + 3, 4, k_min=1)
    assert bool((high.sum(-1) > low.sum(-1) + 0.5).all())  # higher logits: larger subsets


def test_k_one_is_softmax():
    logits = torch.randn(9, 12, dtype=torch.float64) * 5
    assert_close(mk.exact_k_marginals(logits, 1), torch.softmax(logits, -1))


def test_float32_large_logits_stay_accurate():
    # The documented range: float32 logits in [-80, 80], E = 512, k up to 32.
    logits = torch.rand(8, 512) * 160 - 80
    for k, k_min in ((10, 10), (32, 20)):
        got = mk.exact_k_marginals(logits, k, k_min=k_min)
        want = mk.exact_k_marginals(logits.double(), k, k_min=k_min)
        assert bool(torch.isfinite(got).all())
        assert_close(got, want, dtype=torch.float32, op="exact_k")


@pytest.mark.parametrize("k,k_min", [(3, 3), (3, 1)])
def test_sampler_matches_law(k, k_min):
    # E = 6, 200k draws at a fixed seed: every subset's frequency against the exact law.
    logits = torch.tensor([0.3, -1.2, 1.5, 0.0, -0.4, 0.9])
    ids = mk.exact_k_sample(logits.expand(200_000, 6), k, k_min=k_min, seed=1234)
    assert ids.dtype == torch.int32 and ids.shape == (200_000, k)
    assert bool(((ids >= -1) & (ids < 6)).all())
    _, _, law = subset_law_oracle(logits, k, k_min)
    assert chi_square_pvalue(ids, law) > 1e-3


def test_sample_layout_increasing_ids_then_padding():
    logits = torch.randn(500, 20)
    ids = mk.exact_k_sample(logits, 6, k_min=2, seed=7)
    for row in ids.tolist():
        chosen = [i for i in row if i >= 0]
        assert 2 <= len(chosen) <= 6 and row[: len(chosen)] == sorted(set(chosen))
        assert all(i == -1 for i in row[len(chosen) :])


def test_seed_reproducible_and_fresh_without():
    logits = torch.randn(64, 16)
    first = mk.exact_k_sample(logits, 4, seed=3)
    assert torch.equal(first, mk.exact_k_sample(logits, 4, seed=3))
    assert not torch.equal(mk.exact_k_sample(logits, 4), mk.exact_k_sample(logits, 4))
    torch.manual_seed(11)
    again = mk.exact_k_sample(logits, 4)
    torch.manual_seed(11)
    assert torch.equal(again, mk.exact_k_sample(logits, 4))


@pytest.mark.parametrize("k,k_min", [(3, 3), (4, 1), (5, 0)])
def test_backward_is_covariance_product(k, k_min):
    """The dual-number backward equals autograd's Hessian-vector product of an independent DP."""
    logits = torch.randn(5, 9, dtype=torch.float64) * 2
    grad_m, grad_log_z = torch.randn(5, 9, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    leaf = logits.clone().requires_grad_()
    log_z = log_partition_dp(leaf, k, k_min)
    (m,) = torch.autograd.grad(log_z.sum(), leaf, create_graph=True)
    (want,) = torch.autograd.grad((m * grad_m).sum() + (log_z * grad_log_z).sum(), leaf)
    assert_close(ref.exact_k_backward(logits, grad_m, grad_log_z, k, k_min), want)


def test_route_gradient_is_softmax_path_plus_covariance_path():
    """Training weights: d/dr = softmax-backward of (G * z) + Cov(z) @ (G * softmax(r))."""
    logits = torch.randn(6, 8, dtype=torch.float64) * 2
    leaf = logits.clone().requires_grad_()
    weights, ids = mk.probmoe_route(leaf, 3, seed=5)
    upstream = torch.randn_like(weights)
    (weights * upstream).sum().backward()
    softmax_path, cov_path, z = route_gradient_paths_oracle(logits, ids, upstream, 3)
    assert_close(leaf.grad, softmax_path + cov_path)
    # The covariance path reaches experts that were not selected.
    assert bool((cov_path.abs() * (1 - z)).sum(-1).gt(0).all())


def test_route_training_weights_values():
    logits = torch.randn(32, 10)
    weights, ids = mk.probmoe_route(logits, 4, seed=2)
    want = torch.softmax(logits, -1).gather(1, ids.long())
    assert_close(weights, want)
    renorm, _ = mk.probmoe_route(logits, 4, seed=2, renormalize=True)
    assert_close(renorm, want / want.sum(-1, keepdim=True))


def test_route_inference_exact_k_is_top_k():
    logits = torch.randn(32, 10)
    weights, ids = mk.probmoe_route(logits, 3, training=False, renormalize=True)
    want_w, want_ids = mk.softmax_topk(logits, 3, renormalize=True)
    assert torch.equal(ids, want_ids) and torch.equal(weights, want_w)


def test_route_inference_band_is_most_probable_subset():
    logits = torch.randn(40, 7, dtype=torch.float64) * 2
    weights, ids = mk.probmoe_route(logits, 4, k_min=2, training=False)
    for t in range(40):
        _, _, law = subset_law_oracle(logits[t], 4, 2)
        best = max(law, key=law.get)
        chosen = [i for i in ids[t].tolist() if i >= 0]
        assert sorted(chosen) == list(best)
        probs = torch.softmax(logits[t], -1)
        torch.testing.assert_close(weights[t, : len(chosen)], probs[chosen])
        assert bool((weights[t, len(chosen) :] == 0).all())


def test_non_finite_rows():
    logits = torch.randn(4, 8)
    logits[0, 3] = float("nan")
    logits[1, 5] = float("inf")
    logits[2, :6] = float("-inf")  # two experts left: exact-3 is impossible
    logits[3, 2] = float("-inf")  # an excluded expert
    marginals = mk.exact_k_marginals(logits, 3)
    assert bool(torch.isnan(marginals[:3]).all())
    assert marginals[3, 2].item() == 0.0 and marginals[3].sum().item() == pytest.approx(3.0, abs=1e-5)
    weights, ids = mk.probmoe_route(logits, 3, seed=0)
    assert bool((ids[:3] == -1).all()) and bool((weights[:3] == 0).all())
    assert 2 not in ids[3].tolist() and bool((ids[3] >= 0).all())


@pytest.mark.parametrize("num_tokens", [0, 1])
def test_tiny_batches(num_tokens):
    logits = torch.randn(num_tokens, 5, dtype=torch.float64)
    leaf = logits.clone().requires_grad_()
    weights, ids = mk.probmoe_route(leaf, 2, seed=3)
    assert weights.shape == ids.shape == (num_tokens, 2)
    assert_close(weights, torch.softmax(logits, -1).gather(1, ids.long()))
    upstream = torch.randn_like(weights)
    (weights * upstream).sum().backward()
    softmax_path, cov_path, _ = route_gradient_paths_oracle(logits, ids, upstream, 2)
    assert_close(leaf.grad, softmax_path + cov_path)


def test_leading_dims_and_non_contiguous():
    base = torch.randn(5, 12, 3)
    logits = base.transpose(1, 2)[:, :, :10]  # (5, 3, 10), non-unit expert stride
    got = mk.exact_k_marginals(logits, 4)
    assert got.shape == (5, 3, 10)
    assert_close(got, mk.exact_k_marginals(logits.contiguous(), 4))


def test_router_module_shares_gate_and_follows_mode():
    gate = torch.nn.Linear(16, 8, bias=False)
    router = mk.ProbMoERouter.from_gate(gate, 2)
    assert router.weight is gate.weight
    hidden = torch.randn(64, 16)
    router.eval()
    assert torch.equal(router(hidden)[1], mk.softmax_topk(gate(hidden), 2)[1])
    router.train()
    weights, ids = router(hidden)
    weights.sum().backward()
    assert gate.weight.grad is not None and bool(gate.weight.grad.abs().sum() > 0)
    with pytest.raises(ValueError, match="bias"):
        mk.ProbMoERouter.from_gate(torch.nn.Linear(16, 8), 2)


def test_band_enumeration_oracle_itself():
    # The oracle's own sanity: the subset probabilities of a band sum to one.
    _, _, law = subset_law_oracle(torch.randn(6), 4, 2)
    assert sum(law.values()) == pytest.approx(1.0)
    assert len(law) == sum(math.comb(6, c) for c in range(2, 5))
    assert all(len(s) in (2, 3, 4) for s in law) and len(set(law)) == len(law)
    assert set(itertools.chain.from_iterable(law)) == set(range(6))


# ------------------------------------------------------------------------------------------------
# Properties: random shapes (T = 0, 1, primes; E = 1 to 60; k = 1 and k = E), bands, dtypes,
# layouts, logit scales and -inf / NaN / +inf logits, against the float64 oracles.


@st.composite
def probmoe_problem(draw, specials=(-INF, -INF, NAN, INF), max_experts=60):
    """``(logits, k, k_min)``: logits of a drawn dtype, scale and layout, with special values."""
    num_tokens = draw(strategies.token_counts, label="T")
    num_experts = draw(st.sampled_from([e for e in (1, 2, 3, 5, 8, 13, 60) if e <= max_experts]), label="E")
    k = draw(strategies.k_for(num_experts), label="k")
    k_min = draw(st.sampled_from([None, 0, draw(st.integers(0, k))]), label="k_min")
    dtype = draw(strategies.reference_dtypes, label="dtype")
    spread = draw(st.sampled_from([1.0, 4.0, 30.0]), label="logit scale")
    source = strategies.drawn_generator(draw)
    logits = (torch.randn(num_tokens, num_experts, generator=source, dtype=torch.float64) * spread).to(dtype)
    logits = strategies.with_special_values(draw, logits, specials, max_count=4, label="specials")
    logits = strategies.with_drawn_layout(draw, logits, label="layout")
    if draw(st.booleans(), label="leading dim"):
        logits = logits.unsqueeze(0)
    return logits, k, k_min


def _invalid_rows(logits: torch.Tensor, k_min: int) -> torch.Tensor:
    """Rows with no law (the documented contract): a NaN or +inf, or fewer than k_min experts above -inf."""
    return torch.isnan(logits).any(-1) | (logits == INF).any(-1) | ((logits > -INF).sum(-1) < k_min)


@settings(max_examples=strategies.examples(200))
@given(problem=probmoe_problem())
def test_property_exact_k_marginals_match_oracle(problem):
    logits, k, k_min = problem
    marginals = mk.exact_k_marginals(logits, k, k_min=k_min, backend="torch")
    float64 = logits.dtype == torch.float64
    assert marginals.shape == logits.shape and marginals.dtype == (torch.float64 if float64 else torch.float32)
    flat = logits.reshape(-1, logits.shape[-1])
    band_low = k if k_min is None else k_min
    want = exact_k_marginals_oracle(flat, k, band_low)
    assert torch.equal(torch.isnan(marginals.reshape(flat.shape)), torch.isnan(want))
    excluded = (flat == -INF) & ~_invalid_rows(flat, band_low)[:, None]
    assert bool((marginals.reshape(flat.shape)[excluded] == 0).all())  # exactly 0, not just small
    got = marginals.reshape(flat.shape).nan_to_num(0.0)  # NaN where the oracle has NaN, checked above
    atol, rtol = testing.tolerance(torch.float64 if float64 else torch.float32, "exact_k")
    # Past the documented regime (logits ~ N(0, 2)) the log-space DP's rounding grows with the
    # magnitude of its entries, sums of up to k logits: one unit roundoff of k times the row's range.
    finite = flat.double().where(torch.isfinite(flat), NAN)
    spread = (finite.nan_to_num(-INF).amax(-1) - finite.nan_to_num(INF).amin(-1)).nan_to_num(0.0, 0.0, 0.0)
    roundoff = torch.finfo(torch.float64 if float64 else torch.float32).eps / 2
    tolerance = atol + rtol * want.abs().nan_to_num(0.0) + (roundoff * k * spread.clamp(min=0))[:, None]
    excess = (got.double() - want.nan_to_num(0.0)).abs() - tolerance
    assert not bool((excess > 0).any()), f"marginals off by {excess.max().item()} past the tolerance"


@settings(max_examples=strategies.examples(400))
@given(problem=probmoe_problem(), seed=strategies.seeds)
def test_property_exact_k_sample_is_valid(problem, seed):
    logits, k, k_min = problem
    ids = mk.exact_k_sample(logits, k, k_min=k_min, seed=seed, backend="torch")
    assert ids.shape == (*logits.shape[:-1], k) and ids.dtype == torch.int32
    assert torch.equal(ids, mk.exact_k_sample(logits, k, k_min=k_min, seed=seed, backend="torch"))
    band_low = k if k_min is None else k_min
    flat = logits.reshape(-1, logits.shape[-1]).double()
    invalid = _invalid_rows(flat, band_low).tolist()
    for row, chosen_row, no_law in zip(flat, ids.reshape(-1, k).tolist(), invalid):
        chosen = [i for i in chosen_row if i >= 0]
        if no_law:
            assert chosen == [], f"a row without a law sampled {chosen_row}"
            continue
        # Sizes in the band, increasing distinct ids, then -1; never an expert of logit -inf.
        assert band_low <= len(chosen) <= k and chosen_row[: len(chosen)] == sorted(set(chosen)), chosen_row
        assert all(i == -1 for i in chosen_row[len(chosen) :]) and all(row[i] > -INF for i in chosen), chosen_row
        possible = [i for i, r in enumerate(row.tolist()) if r > -INF]
        if band_low == k and len(possible) == k:  # one subset has all the probability
            assert chosen == possible


@settings(max_examples=strategies.examples(150))
@given(problem=probmoe_problem(), seed=strategies.seeds, renormalize=st.booleans(), training=st.booleans())
def test_property_probmoe_route_matches_oracle(problem, seed, renormalize, training):
    logits, k, k_min = problem
    band_low = k if k_min is None else k_min
    if not training:  # the most probable subset: tie-free logits, so that it is well defined
        shape, dtype = logits.shape, logits.dtype
        logits = testing.make_routing_logits(math.prod(shape[:-1]), shape[-1], dtype, seed=seed).reshape(shape)
    weights, ids = mk.probmoe_route(
        logits, k, k_min=k_min, renormalize=renormalize, training=training, seed=seed, backend="torch"
    )
    float64 = logits.dtype == torch.float64
    assert weights.shape == ids.shape == (*logits.shape[:-1], k) and ids.dtype == torch.int32
    assert weights.dtype == (torch.float64 if float64 else torch.float32)
    flat = logits.reshape(-1, logits.shape[-1]).double()
    if training:  # the sample of exact_k_sample with the same seed, weights softmax(r)[ids]
        assert torch.equal(ids, mk.exact_k_sample(logits, k, k_min=k_min, seed=seed, backend="torch"))
    else:  # exact-k: the top k; a band: the top c*, then -1
        want_ids = [band_mode_oracle(row, k, band_low) for row in flat.tolist()]
        want = torch.tensor([chosen + [-1] * (k - len(chosen)) for chosen in want_ids], dtype=torch.int32)
        torch.testing.assert_close(ids.reshape(-1, k), want.reshape(-1, k), atol=0, rtol=0)
    chosen = ids.reshape(-1, k).long()
    valid = chosen >= 0
    probs = torch.softmax(flat, -1) if flat.numel() else flat
    want_weights = torch.where(valid, probs.gather(-1, chosen.clamp(min=0)), 0.0)
    if renormalize:
        want_weights = want_weights / want_weights.sum(-1, keepdim=True).clamp_min(1e-20)
    assert_close(weights.reshape(-1, k), want_weights, dtype=weights.dtype)
