"""Load dynamics of adaptive softmax routing (the minimal bifurcation model, arXiv 2605.29121;
derivation in ``docs/dynamics.md``): why routers collapse onto few experts, and when.

The rule, per step: ``p = softmax(K s + b)``; one expert ``I ~ Categorical(p)`` is selected;
``s <- (1 - eps) s + eps onehot(I)``. ``K`` is the dimensionless feedback strength, ``b`` a fixed
logit bias (for two experts, ``h = b_0 - b_1``); scores start at ``1/E``.

- Simulation: :func:`simulate` (``P`` parameter points x ``R`` replicas, vectorised, on the
  inputs' device), :func:`adiabatic_sweep`, :func:`relaxation_times`.
- Theory: :func:`fixed_points`, :func:`cusp`, :func:`relaxation_time` (two experts);
  :func:`critical_feedback`, :func:`fold_feedback`, :func:`one_winner_feedback` (E experts).
- Plots (PNG, matplotlib imported when drawing): :func:`plot_bifurcation`,
  :func:`plot_hysteresis`, :func:`plot_critical_slowing`, :func:`plot_collapse`.
- Training: :class:`AdaptiveScoreRouter`, the trainable case; the digits experiment in
  :mod:`moe_kernels.dynamics.digits` (needs scikit-learn, imported when run).
"""

from moe_kernels.dynamics.experiments import (
    ChainSettings,
    SweepSettings,
    adiabatic_sweep,
    relaxation_times,
    sweep_up_and_down,
)
from moe_kernels.dynamics.plots import plot_bifurcation, plot_collapse, plot_critical_slowing, plot_hysteresis
from moe_kernels.dynamics.router import AdaptiveScoreRouter
from moe_kernels.dynamics.simulate import Simulation, simulate
from moe_kernels.dynamics.theory import (
    critical_feedback,
    cusp,
    fixed_points,
    fold_feedback,
    one_winner_feedback,
    relaxation_time,
)

__all__ = [
    "AdaptiveScoreRouter",
    "ChainSettings",
    "Simulation",
    "SweepSettings",
    "adiabatic_sweep",
    "critical_feedback",
    "cusp",
    "fixed_points",
    "fold_feedback",
    "one_winner_feedback",
    "plot_bifurcation",
    "plot_collapse",
    "plot_critical_slowing",
    "plot_hysteresis",
    "relaxation_time",
    "relaxation_times",
    "simulate",
    "sweep_up_and_down",
]
