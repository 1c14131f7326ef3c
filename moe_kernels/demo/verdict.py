"""Verdicts that could go either way: the statistics the claims table decides with, fixed before any
result is seen.

Every claim is measured per seed (each seed its own pretraining, fine-tuning order, sampling
stream, memory and calibration draw) as a paired difference or a ratio; the verdict comes from a
one-sided 95% interval across seeds (Student's t, ``n - 1`` degrees of freedom), and is one of
:data:`VERDICTS`:

- ``supported``: the interval lies entirely on the claim's side of its bound;
- ``not supported``: it lies entirely on the other side;
- ``inconclusive``: it straddles the bound, or there are fewer seeds than :data:`MIN_SEEDS`;
- ``not testable``: a precondition failed (no routing headroom, a budget that never moved), said
  by the caller with its reason.

Within a seed, the error of a mean over correlated positions (tokens of one sequence) comes from
a circular block bootstrap (:func:`block_bootstrap_se`), seeded, so the same inputs give the same
numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

VERDICTS = ("supported", "not supported", "inconclusive", "not testable")
MIN_SEEDS = 3
# One-sided 95% quantiles of Student's t by degrees of freedom (1-30); past 30 the expansion
# z + (z^3 + z) / (4 df) about the normal's (1.697 at 30, within 0.001 of the table there).
_T95 = (6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812, 1.796, 1.782, 1.771, 1.761, 1.753)
_T95 += (1.746, 1.740, 1.734, 1.729, 1.725, 1.721, 1.717, 1.714, 1.711, 1.708, 1.706, 1.703, 1.701, 1.699, 1.697)
_Z95 = 1.645


@dataclass(frozen=True)
class Estimate:
    """A mean across seeds with its one-sided 95% bounds: ``low`` (the mean is above it with 95%
    confidence) and ``high`` (below it); both infinite with one seed."""

    mean: float
    low: float
    high: float
    seeds: int
    values: tuple[float, ...] = ()


def t95(degrees: int) -> float:
    """The one-sided 95% quantile of Student's t with ``degrees`` of freedom (>= 1)."""
    if degrees < 1:
        raise ValueError(f"t95: degrees must be >= 1, got {degrees}")
    if degrees <= len(_T95):
        return _T95[degrees - 1]
    return _Z95 + (_Z95**3 + _Z95) / (4 * degrees)


def estimate(values: Sequence[float]) -> Estimate:
    """The mean of the per-seed ``values`` and its one-sided 95% bounds."""
    values = [float(v) for v in values]
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError(f"estimate: values must be finite and non-empty, got {values}")
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return Estimate(mean, -math.inf, math.inf, 1, tuple(values))
    spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) / math.sqrt(n)
    margin = t95(n - 1) * spread
    return Estimate(mean, mean - margin, mean + margin, n, tuple(values))


def _decide(supported: bool, refuted: bool, seeds: int, claim_side: str, bound: float) -> tuple[str, str]:
    if seeds < MIN_SEEDS:
        return "inconclusive", f"{seeds} seed(s): a verdict needs at least {MIN_SEEDS}"
    if supported:
        return "supported", f"the 95% bound is {claim_side} {bound:g}"
    if refuted:
        return "not supported", f"the 95% bound is on the other side of {bound:g}"
    return "inconclusive", f"the 95% interval straddles {bound:g}"


def below(values: Sequence[float], bound: float) -> tuple[str, str, Estimate]:
    """Claim: the mean is below ``bound`` (e.g. a loss change < 0, or a non-inferiority margin
    ``delta``). Supported iff the upper bound is < ``bound``; not supported iff the lower bound is
    >= ``bound``."""
    result = estimate(values)
    verdict, reason = _decide(result.high < bound, result.low >= bound, result.seeds, "below", bound)
    return verdict, reason, result


def above(values: Sequence[float], bound: float) -> tuple[str, str, Estimate]:
    """Claim: the mean is above ``bound`` (e.g. a share of a gain >= 0.5). Supported iff the lower
    bound is > ``bound``; not supported iff the upper bound is <= ``bound``."""
    result = estimate(values)
    verdict, reason = _decide(result.low > bound, result.high <= bound, result.seeds, "above", bound)
    return verdict, reason, result


def block_bootstrap_se(values: torch.Tensor, block: int, *, resamples: int = 1000, seed: int = 0) -> float:
    """Standard error of ``values.mean()`` (``(N,)`` per-position values, e.g. paired loss
    differences) by a circular block bootstrap: ``N / block`` blocks of ``block`` consecutive
    positions drawn with replacement, ``resamples`` times, from a generator seeded with ``seed``."""
    values = values.detach().double().reshape(-1).cpu()
    count = values.numel()
    if count < 2 or not 1 <= block <= count:
        raise ValueError(f"block_bootstrap_se: needs >= 2 values and 1 <= block <= N, got N={count}, block={block}")
    blocks = math.ceil(count / block)
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, count, (resamples, blocks), generator=generator)
    index = (starts[:, :, None] + torch.arange(block)).reshape(resamples, -1)[:, :count] % count
    return float(values[index].mean(1).std(correction=1))


@dataclass
class ClaimResult:
    """One row of the claims table, as ``results.json`` holds it: the ``paper``, the ``claim``, the
    ``criterion`` fixed before the run, the ``verdict`` (one of :data:`VERDICTS`) and its
    ``reason``, the ``estimate`` and its one-sided 95% ``interval`` (``[low, high]``), every seed's
    measured numbers, and the ``settings`` (``{name: {"value", "source"}}``, the source
    ``"paper"`` or ``"ours"`` with its reason)."""

    paper: str
    claim: str
    criterion: str
    verdict: str
    reason: str
    estimate: float | None = None
    interval: tuple[float, float] | None = None
    seeds: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    # For the plot, not in results.json: the per-seed values the estimate averages, and the
    # criterion's bound on them (None when the row has none).
    values: tuple[float, ...] = ()
    bound: float | None = None

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"ClaimResult: verdict must be one of {VERDICTS}, got {self.verdict!r}")

    def to_dict(self) -> dict:
        interval = None if self.interval is None else [float(x) for x in self.interval]
        return dict(
            paper=self.paper,
            claim=self.claim,
            criterion=self.criterion,
            verdict=self.verdict,
            reason=self.reason,
            estimate=self.estimate,
            interval=interval,
            seeds=self.seeds,
            settings=self.settings,
        )
