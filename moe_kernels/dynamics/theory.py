"""Mean-field theory of the adaptive-score routing rule (``docs/dynamics.md``, "The model").

The rule, per step: ``p = softmax(K s + b)``, one expert ``I ~ Categorical(p)``,
``s <- (1 - eps) s + eps onehot(I)``. For ``eps -> 0`` the scores follow ``ds/dt = p(s) - s``.
Two experts, ``x = s_0 - s_1`` and ``h = b_0 - b_1``::

    dx/dtau = tanh((K x + h) / 2) - x        (tau = eps * steps)

whose fixed points are expert 0's stationary load ``(1 + x) / 2``. Everything here is host-side
float64 arithmetic on a handful of numbers (no tensors on a device, no hot path).
"""

from __future__ import annotations

import math
import numbers

import torch

from moe_kernels.balance import check_num_experts

SELECTIONS = ("sample", "top1_gaussian")
# The dynamics compare experts: one alone has nothing to collapse onto.
MIN_EXPERTS = 2
# Bisection to float64 resolution: the bracket [-1, 1] halves 200 times.
_BISECTION_STEPS = 200
# Grid for the minimum over the winner's load m in fold_feedback: m = 1/E + (1 - 1/E) * u, u on a
# uniform grid of (0, 1), then refined by golden-section search around the best grid point.
_FOLD_GRID = 4001
_GOLDEN_STEPS = 200
# Quadrature for the Gaussian top-1 threshold: the integrand is negligible beyond |z| = 12.
_QUAD_POINTS = 48001
_QUAD_HALF_WIDTH = 12.0


def check_feedback(name: str, feedback) -> float:
    """``feedback`` as a finite Python float, or a ``TypeError`` / ``ValueError`` naming ``name``."""
    if isinstance(feedback, bool) or not isinstance(feedback, numbers.Real):
        raise TypeError(f"{name}: feedback must be a real number, got {type(feedback).__name__}")
    value = float(feedback)
    if not math.isfinite(value):
        raise ValueError(f"{name}: feedback must be finite, got {value}")
    return value


def _check_real(name: str, argument: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name}: {argument} must be a finite real number, got {value!r}")
    return float(value)


def _drift(x: float, feedback: float, asymmetry: float) -> float:
    """``f(x) = tanh((K x + h) / 2) - x``, the two-expert mean-field drift."""
    return math.tanh((feedback * x + asymmetry) / 2) - x


def _drift_slope(x: float, feedback: float, asymmetry: float) -> float:
    """``f'(x) = (K / 2) sech^2((K x + h) / 2) - 1``: the linear relaxation rate at a fixed point."""
    return feedback / 2 / math.cosh((feedback * x + asymmetry) / 2) ** 2 - 1


def _bisect(lo: float, hi: float, feedback: float, asymmetry: float) -> float:
    """The root of the drift in ``[lo, hi]``, where it changes sign (or vanishes at an end)."""
    f_lo = _drift(lo, feedback, asymmetry)
    for _ in range(_BISECTION_STEPS):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        f_mid = _drift(mid, feedback, asymmetry)
        if f_mid == 0:
            return mid
        if (f_mid > 0) == (f_lo > 0):
            lo, f_lo = mid, f_mid
        else:
            hi = mid
    return (lo + hi) / 2


def fixed_points(feedback, asymmetry=0.0) -> list[tuple[float, bool]]:
    """Every stationary state of the two-expert mean-field dynamics.

    Args:
        feedback: ``K``, a finite real number.
        asymmetry: ``h = b_0 - b_1``, a finite real number.

    Returns:
        ``[(load, stable), ...]`` sorted by ``load``: every solution ``x`` of
        ``x = tanh((K x + h) / 2)`` as expert 0's load ``(1 + x) / 2`` (a float), with ``stable``
        true when ``f'(x) = (K / 2) sech^2((K x + h) / 2) - 1 < 0``. One point when ``K <= 2`` or
        ``|h|`` lies outside the cusp, three inside it (two stable, one saddle); on the fold set
        itself the double root is listed once, as unstable (semi-stable), and the triple root at
        the cusp point ``(K, h) = (2, 0)`` as stable (its cubic term restores it).
    """
    feedback = check_feedback("fixed_points", feedback)
    asymmetry = _check_real("fixed_points", "asymmetry", asymmetry)
    # f is monotone between the critical points of f' = 0, which exist only for K > 2:
    # sech^2(y) = 2 / K at y = (K x + h) / 2 = +-acosh(sqrt(K / 2)).
    edges = [-1.0]
    if feedback > 2:
        y = math.acosh(math.sqrt(feedback / 2))
        edges += sorted(c for c in ((2 * y - asymmetry) / feedback, (-2 * y - asymmetry) / feedback) if -1 < c < 1)
    edges.append(1.0)
    roots: list[float] = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        f_lo, f_hi = _drift(lo, feedback, asymmetry), _drift(hi, feedback, asymmetry)
        if f_lo == 0 or f_hi == 0 or (f_lo > 0) != (f_hi > 0):
            root = _bisect(lo, hi, feedback, asymmetry)
            if not roots or abs(root - roots[-1]) > 1e-12:
                roots.append(root)
    # A double root sits exactly on an inner edge; bisection may miss it when f only touches 0.
    for edge in edges[1:-1]:
        if abs(_drift(edge, feedback, asymmetry)) < 1e-14 and all(abs(edge - r) > 1e-9 for r in roots):
            roots.append(edge)
    points = []
    for x in sorted(roots):
        slope = _drift_slope(x, feedback, asymmetry)
        cusp_point = abs(feedback - 2) < 1e-12 and abs(asymmetry) < 1e-12
        stable = slope < -1e-12 or (cusp_point and abs(x) < 1e-6)
        points.append(((1 + x) / 2, stable))
    return points


def relaxation_time(feedback, asymmetry=0.0) -> float:
    """``1 / |f'(x*)|`` in units of ``tau = eps * steps``, at the stable fixed point with the
    highest expert-0 load: how long a small perturbation takes to decay by ``e``. It diverges
    at ``K = 2`` for ``h = 0`` (critical slowing down), where it is ``inf``."""
    feedback = check_feedback("relaxation_time", feedback)
    stable = [load for load, is_stable in fixed_points(feedback, asymmetry) if is_stable]
    slope = _drift_slope(2 * stable[-1] - 1, feedback, float(asymmetry))
    return math.inf if slope == 0 else 1 / abs(slope)


def cusp(theta):
    """The fold set of the two-expert dynamics, parametrised by ``theta``: ``(K, h) =
    (1 + cosh theta, theta - sinh theta)``, where the fixed point ``x = tanh(theta / 2)`` is a
    double root (``f = f' = 0``). ``theta`` is a float (floats back) or a tensor (tensors back,
    same shape and dtype); ``theta = 0`` is the cusp point ``(2, 0)``."""
    if isinstance(theta, torch.Tensor):
        return 1 + torch.cosh(theta), theta - torch.sinh(theta)
    theta = _check_real("cusp", "theta", theta)
    return 1 + math.cosh(theta), theta - math.sinh(theta)


def _gaussian_top1_slope(num_experts: int) -> float:
    """``E * integral phi(z)^2 Phi(z)^(E-2) dz``: the zero-sum eigenvalue of the load Jacobian of
    hard top-1 routing under unit Gaussian noise on each expert's logit, at uniform scores."""
    z = torch.linspace(-_QUAD_HALF_WIDTH, _QUAD_HALF_WIDTH, _QUAD_POINTS, dtype=torch.float64)
    density = torch.exp(-(z**2)) / (2 * math.pi)
    integrand = density * torch.special.ndtr(z) ** (num_experts - 2)
    return num_experts * float(torch.trapezoid(integrand, z))


def critical_feedback(num_experts, *, selection: str = "sample", noise: float = 1.0) -> float:
    """The feedback ``K`` at which uniform routing over ``num_experts`` experts loses stability.

    ``selection="sample"`` (softmax sampling, the model's rule): the zero-sum eigenvalue of the
    linearised dynamics is ``K / E - 1``, so ``K_c = E``.

    ``selection="top1_gaussian"`` (hard top-1 of ``K s + b + noise * z``, ``z`` iid standard
    normal per expert and token, as :func:`moe_kernels.dynamics.simulate` draws it): the load
    Jacobian at uniform scores is ``a (I - 11^T / E)`` with ``a = (E / noise) * integral
    phi(z)^2 Phi(z)^(E-2) dz``, so ``K_c = 1 / a``; for two experts ``K_c = noise * sqrt(pi)``
    (the per-token logit difference has spread ``sigma = noise * sqrt(2)``, and ``K_c =
    sigma * sqrt(pi / 2)``).
    """
    num_experts = check_num_experts("critical_feedback", num_experts, MIN_EXPERTS)
    if selection == "sample":
        return float(num_experts)
    if selection != "top1_gaussian":
        raise ValueError(f"critical_feedback: selection must be one of {SELECTIONS}, got {selection!r}")
    noise = _check_real("critical_feedback", "noise", noise)
    if noise <= 0:
        raise ValueError(f"critical_feedback: noise must be > 0, got {noise}")
    return noise / _gaussian_top1_slope(num_experts)


def one_winner_feedback(num_experts, load):
    """The feedback ``K`` at which a one-winner state is stationary under softmax sampling: one
    expert at ``load = m`` in ``(1/E, 1)``, the others at ``(1 - m) / (E - 1)`` each, requires
    ``K = ln((E - 1) m / (1 - m)) / (m - (1 - m) / (E - 1))``. ``load`` is a float (float back) or
    a tensor (tensor back, same shape). The branch's minimum over ``m`` is :func:`fold_feedback`;
    above it the larger-``m`` solution is the stable (collapsed) state."""
    num_experts = check_num_experts("one_winner_feedback", num_experts, MIN_EXPERTS)
    rest = num_experts - 1
    if isinstance(load, torch.Tensor):
        return torch.log(rest * load / (1 - load)) / (load - (1 - load) / rest)
    load = _check_real("one_winner_feedback", "load", load)
    if not 1 / num_experts < load < 1:
        raise ValueError(f"one_winner_feedback: load must be in (1/E, 1) = ({1 / num_experts:.6g}, 1), got {load}")
    return math.log(rest * load / (1 - load)) / (load - (1 - load) / rest)


def fold_feedback(num_experts) -> float:
    """The lowest ``K`` at which a one-winner (collapsed) state exists under softmax sampling:
    ``min over m in (1/E, 1)`` of :func:`one_winner_feedback` (2.746 for E = 3, 3.219 for
    E = 4, 4.250 for E = 8; the limit ``m -> 1/2`` gives exactly 2 for E = 2, where the collapse
    is the pitchfork itself). For ``E > 2`` it lies below :func:`critical_feedback` ``= E``: the
    interval between them is the hysteresis window of a first-order collapse."""
    num_experts = check_num_experts("fold_feedback", num_experts, MIN_EXPERTS)
    if num_experts == 2:
        return 2.0
    low = 1 / num_experts
    # The objective is smooth and unimodal in m on (1/E, 1): locate on a grid, refine by golden
    # section between the grid neighbours of the best point.
    u = torch.linspace(0, 1, _FOLD_GRID, dtype=torch.float64)[1:-1]
    values = one_winner_feedback(num_experts, low + (1 - low) * u)
    best = int(torch.argmin(values))
    a, b = float(u[max(best - 1, 0)]), float(u[min(best + 1, len(u) - 1)])

    def objective(t: float) -> float:
        return one_winner_feedback(num_experts, low + (1 - low) * t)

    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    for _ in range(_GOLDEN_STEPS):
        if objective(c) < objective(d):
            b, d = d, c
            c = b - ratio * (b - a)
        else:
            a, c = c, d
            d = a + ratio * (b - a)
    return objective((a + b) / 2)
