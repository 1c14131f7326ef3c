"""The claims table's verdict logic on synthetic per-seed numbers: every verdict reachable, the
boundaries exact, the interval's quantiles right, the block bootstrap seeded and sensible."""

from __future__ import annotations

import math

import pytest
import torch

from moe_kernels.demo import verdict as v


def test_t_quantiles():
    assert v.t95(1) == 6.314 and v.t95(4) == 2.132 and v.t95(30) == 1.697
    assert abs(v.t95(31) - 1.696) < 2e-3 and abs(v.t95(120) - 1.658) < 2e-3
    with pytest.raises(ValueError):
        v.t95(0)


def test_estimate_is_the_t_interval():
    result = v.estimate([1.0, 2.0, 3.0])
    margin = 2.920 * 1.0 / math.sqrt(3)
    assert result.mean == 2.0 and math.isclose(result.high, 2.0 + margin) and math.isclose(result.low, 2.0 - margin)
    one = v.estimate([0.5])
    assert one.low == -math.inf and one.high == math.inf
    with pytest.raises(ValueError):
        v.estimate([1.0, math.nan])


@pytest.mark.parametrize(
    "values,bound,expected",
    [
        ([-0.03, -0.02, -0.025], 0.0, "supported"),  # clearly below
        ([0.03, 0.02, 0.025], 0.0, "not supported"),  # clearly above
        ([-0.03, 0.02, 0.0], 0.0, "inconclusive"),  # straddles
        ([-0.03, -0.02], 0.0, "inconclusive"),  # too few seeds
        ([0.01, 0.01, 0.01], 0.02, "supported"),  # non-inferior within delta
        ([0.02, 0.02, 0.02], 0.02, "not supported"),  # at the margin exactly: not below it
    ],
)
def test_below(values, bound, expected):
    assert v.below(values, bound)[0] == expected


@pytest.mark.parametrize(
    "values,bound,expected",
    [
        ([0.7, 0.8, 0.75], 0.5, "supported"),
        ([0.2, 0.3, 0.25], 0.5, "not supported"),
        ([0.4, 0.6, 0.5], 0.5, "inconclusive"),
        ([0.5, 0.5, 0.5], 0.5, "not supported"),  # exactly at the bound: not above it
    ],
)
def test_above(values, bound, expected):
    assert v.above(values, bound)[0] == expected


def test_every_verdict_is_reachable_and_the_record_checks_it():
    reached = {v.below([-1.0, -1.1, -0.9], 0)[0], v.below([1.0, 1.1, 0.9], 0)[0], v.below([1.0, -1.0, 0.1], 0)[0]}
    assert reached == {"supported", "not supported", "inconclusive"}
    row = v.ClaimResult("p", "c", "crit", "not testable", "no headroom")
    assert row.to_dict()["verdict"] == "not testable"
    with pytest.raises(ValueError, match="verdict must be one of"):
        v.ClaimResult("p", "c", "crit", "reproduced", "")


def test_block_bootstrap_is_seeded_and_grows_with_correlation():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(4096, generator=g)
    assert v.block_bootstrap_se(noise, 16, seed=1) == v.block_bootstrap_se(noise, 16, seed=1)
    iid = v.block_bootstrap_se(noise, 1, seed=1)
    assert abs(iid - 1 / 64) < 0.2 / 64  # sigma / sqrt(N)
    correlated = noise.reshape(-1, 1).repeat(1, 16).reshape(-1)[:4096]  # runs of 16 equal values
    assert v.block_bootstrap_se(correlated, 32, seed=1) > 2.5 * v.block_bootstrap_se(correlated, 1, seed=1)
    with pytest.raises(ValueError):
        v.block_bootstrap_se(noise[:1], 1)
