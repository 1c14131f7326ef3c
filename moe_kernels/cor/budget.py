"""Compute-preserving reallocation of the activation budget across layers (CoR online stage)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import torch

from moe_kernels.config import is_int

_OP = "allocate_layer_budget"


def _ratios(ratio) -> list[float]:
    values = (
        ratio.detach().double().cpu() if isinstance(ratio, torch.Tensor) else torch.tensor(ratio, dtype=torch.float64)
    )
    if values.dim() != 1 or values.numel() == 0:
        raise ValueError(f"{_OP}: ratio must be a non-empty 1-D tensor (L,), got shape {tuple(values.shape)}")
    if torch.isnan(values).any() or (values < 0).any() or torch.isinf(values).any():
        raise ValueError(f"{_OP}: ratio must be finite and >= 0, got {values.tolist()}")
    return values.tolist()


def _upper_bounds(k_max, num_layers: int, k_min: int) -> list[float]:
    if k_max is None:
        return [math.inf] * num_layers
    if isinstance(k_max, torch.Tensor):
        k_max = k_max.tolist()
    bounds = [k_max] * num_layers if is_int(k_max) else list(k_max) if isinstance(k_max, Sequence) else None
    if bounds is None or len(bounds) != num_layers or not all(is_int(b) and b >= k_min for b in bounds):
        raise ValueError(
            f"{_OP}: k_max must be None, an int or {num_layers} ints, each >= k_min={k_min}, got {k_max!r}"
        )
    return bounds


def _clamp(value: Fraction, low: int, high: float) -> Fraction:
    return min(max(value, Fraction(low)), high) if high != math.inf else max(value, Fraction(low))


def _fill(weights: list[Fraction], low: int, high: list[float], total: int) -> list[Fraction] | None:
    """Exact ``x_l = clamp(c * w_l, low, high_l)`` with ``sum x = total``, or None when even
    ``c -> inf`` falls short. ``sum x`` is nondecreasing and piecewise linear in ``c``: find the
    piece holding ``total`` among the breakpoints ``low / w`` and ``high / w``, then solve it."""

    def filled(c: Fraction) -> list[Fraction]:
        return [_clamp(c * w, low, h) for w, h in zip(weights, high)]

    points = sorted(
        {Fraction(low) / w for w in weights if w > 0}
        | {Fraction(h) / w for w, h in zip(weights, high) if w > 0 and h != math.inf}
    )
    previous = Fraction(0)
    for point in [*points, None]:
        if point is not None and sum(filled(point)) < total:
            previous = point
            continue
        base = filled(previous)
        missing = total - sum(base)
        if missing == 0:
            return base
        # within (previous, point) the layers strictly between their bounds grow with slope w
        probe = previous + 1 if point is None else (previous + point) / 2
        slope = sum(w for w, h in zip(weights, high) if w > 0 and low < probe * w < h)
        return None if slope == 0 else filled(previous + missing / slope)
    return None


def allocate_layer_budget(ratio, total_k: int, *, k_min: int = 1, k_max=None) -> torch.Tensor:
    """Per-layer experts per token ``k (L,)`` int64 summing to exactly ``total_k``.

    ``k_l`` is ``total_k * ratio_l / sum(ratio)`` (uniform when ``sum(ratio) == 0``), clamped to
    ``[k_min, k_max_l]`` with the difference redistributed in proportion to the ratios of the
    layers left unclamped (exactly: the continuous allocation is ``clamp(c * ratio_l, k_min,
    k_max_l)`` for the ``c`` that sums it to ``total_k``, in rational arithmetic), then rounded by
    largest remainder (ties to the lower layer). When nothing is clamped each ``k_l`` is the floor
    or the ceiling of its unrounded share; raising one layer's ratio never lowers its ``k``.
    Layers of ratio 0 stay at ``k_min`` unless the others are all at ``k_max``.

    Args:
        ratio: ``(L,)`` tensor or sequence of finite numbers ``>= 0``.
        total_k: the total activation count, an int in ``[L * k_min, sum(k_max)]``.
        k_min: the fewest experts a layer selects (int ``>= 1``).
        k_max: None (no upper bound), an int, or ``L`` ints (``calibrate`` passes each layer's
            selectable experts: E, or the kept groups' experts under a group limit).

    Raises ``ValueError`` for NaN, infinite or negative ratios, bad bounds, and a ``total_k`` that
    no clamped allocation reaches.
    """
    values = _ratios(ratio)
    num_layers = len(values)
    if not is_int(k_min) or k_min < 1:
        raise ValueError(f"{_OP}: k_min must be an int >= 1, got {k_min!r}")
    high = _upper_bounds(k_max, num_layers, k_min)
    if not is_int(total_k) or not num_layers * k_min <= total_k <= sum(high):
        raise ValueError(
            f"{_OP}: total_k must be an int in [L * k_min, sum(k_max)] = [{num_layers * k_min}, {sum(high)}] "
            f"for L={num_layers}, got {total_k!r}"
        )
    weights = [Fraction(v) for v in values]
    if sum(weights) == 0:
        weights = [Fraction(1)] * num_layers
    shares = _fill(weights, k_min, high, total_k)
    if shares is None:  # the layers of positive ratio are all at k_max: the others share the rest
        rest = [i for i, w in enumerate(weights) if w == 0]
        fixed = total_k - sum(int(high[i]) for i, w in enumerate(weights) if w > 0)
        part = _fill([Fraction(1)] * len(rest), k_min, [high[i] for i in rest], fixed)
        shares = [Fraction(int(high[i])) for i in range(num_layers)]
        for i, share in zip(rest, part):
            shares[i] = share
    floors = [math.floor(share) for share in shares]
    extra = total_k - sum(floors)
    order = sorted(range(num_layers), key=lambda i: (-(shares[i] - floors[i]), i))
    for i in order[:extra]:
        floors[i] += 1
    return torch.tensor(floors, dtype=torch.int64)
