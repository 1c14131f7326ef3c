"""``cor.allocate_layer_budget`` over many random inputs, a few exact cases, and its bad input."""

from __future__ import annotations

import math
import random

import pytest
import torch

from moe_kernels import cor

DRAWS = 400


def _draw(rng: random.Random):
    """A random feasible problem: ratios (some zero, some equal), bounds and a reachable total."""
    num_layers = rng.randint(1, 10)
    ratio = [
        0.0
        if rng.random() < 0.08
        else rng.choice([1.0, 0.5 + rng.random(), 1 + rng.random() * 3, rng.expovariate(1.0)])
        for _ in range(num_layers)
    ]
    k_min = rng.randint(1, 2)
    kind = rng.choice(["none", "int", "list"])
    if kind == "none":
        k_max, high = None, [math.inf] * num_layers
    elif kind == "int":
        k_max = rng.randint(k_min, 8)
        high = [k_max] * num_layers
    else:
        k_max = [rng.randint(k_min, 8) for _ in range(num_layers)]
        high = k_max
    top = sum(high) if kind != "none" else num_layers * k_min + 40
    total = rng.randint(num_layers * k_min, int(top))
    return torch.tensor(ratio, dtype=torch.float32), total, k_min, k_max, high


def test_random_inputs_exact_total_bounds_share_and_monotone():
    rng = random.Random(0)
    unclamped = 0
    for _ in range(DRAWS):
        ratio, total, k_min, k_max, high = _draw(rng)
        k = cor.allocate_layer_budget(ratio, total, k_min=k_min, k_max=k_max)
        assert k.dtype == torch.int64 and k.shape == ratio.shape
        assert int(k.sum()) == total
        assert all(k_min <= int(v) <= h for v, h in zip(k, high)), (ratio, total, k_min, k_max, k)
        r = ratio.double()
        share = total * r / r.sum() if r.sum() > 0 else torch.full_like(r, total / len(r))
        if all(k_min <= float(s) <= h for s, h in zip(share, high)):
            unclamped += 1
            assert ((k.double() - share).abs() < 1 + 1e-9).all(), (ratio, total, k, share)
        # raising one layer's ratio never lowers its k
        layer = rng.randrange(len(ratio))
        raised = ratio.clone()
        raised[layer] = raised[layer] * rng.uniform(1.0, 4.0) + rng.choice([0.0, rng.random()])
        k_raised = cor.allocate_layer_budget(raised, total, k_min=k_min, k_max=k_max)
        assert int(k_raised[layer]) >= int(k[layer]), (ratio, raised, total, k, k_raised)
    assert unclamped > DRAWS // 6  # the within-1 property was exercised often (107 of 400 with seed 0)


@pytest.mark.parametrize(
    "ratio, total, kwargs, expected",
    [
        ([1.0, 1.0, 1.0], 4, {}, [2, 1, 1]),  # equal remainders: the lower layer first
        ([0.0, 0.0, 0.0], 7, {}, [3, 2, 2]),  # no signal: uniform
        ([3.0, 1.0], 8, {}, [6, 2]),  # exact shares
        ([10.0, 1.0, 1.0], 6, {"k_max": 3}, [3, 2, 1]),  # clamped at 3, the rest 1.5 / 1.5
        ([1.0, 0.0, 0.0], 7, {"k_max": 4}, [4, 2, 1]),  # positive layer full: zero-ratio layers share
        ([1.0, 0.0, 2.0], 9, {"k_min": 2}, [2, 2, 5]),  # zero ratio stays at k_min; 7 over 1:2 -> 2.33, 4.67
        ([5.0, 1.0], 4, {"k_max": [2, 8]}, [2, 2]),
    ],
)
def test_exact_cases(ratio, total, kwargs, expected):
    assert cor.allocate_layer_budget(torch.tensor(ratio), total, **kwargs).tolist() == expected


@pytest.mark.parametrize(
    "ratio, total, kwargs, match",
    [
        ([1.0, float("nan")], 4, {}, "ratio must be finite and >= 0"),
        ([1.0, -0.5], 4, {}, "ratio must be finite and >= 0"),
        ([1.0, float("inf")], 4, {}, "ratio must be finite and >= 0"),
        ([], 4, {}, "non-empty 1-D"),
        ([1.0, 2.0], 1, {}, r"total_k must be an int in \[L \* k_min, sum\(k_max\)\] = \[2, inf\]"),
        ([1.0, 2.0], 9, {"k_max": 4}, r"= \[2, 8\] for L=2, got 9"),
        ([1.0, 2.0], 5, {"k_min": 3}, r"= \[6, inf\]"),
        ([1.0, 2.0], 4.0, {}, "total_k must be an int"),
        ([1.0, 2.0], 4, {"k_min": 0}, "k_min must be an int >= 1"),
        ([1.0, 2.0], 4, {"k_max": [3]}, "k_max must be None, an int or 2 ints"),
        ([1.0, 2.0], 4, {"k_max": [3, 0]}, "each >= k_min=1"),
    ],
)
def test_bad_input(ratio, total, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cor.allocate_layer_budget(torch.tensor(ratio), total, **kwargs)
