"""Measurements built on :func:`simulate`: slow parameter sweeps (hysteresis) and relaxation times
(critical slowing down). The plots of :mod:`moe_kernels.dynamics.plots` draw these."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from moe_kernels.dynamics.simulate import simulate
from moe_kernels.dynamics.theory import fixed_points


class SweepSettings(NamedTuple):
    """How a slow sweep runs: ``steps_per_point`` steps at each point, ``replicas`` chains swept
    together, score step ``eps`` (as for :func:`simulate`), point ``i`` seeded ``seed + i``, on
    ``device``. The ``settings`` of :func:`adiabatic_sweep` and the sweep plots."""

    steps_per_point: int = 4000
    replicas: int = 32
    eps: float = 0.005
    seed: int = 0
    device: torch.device | str | None = None


class ChainSettings(NamedTuple):
    """How :func:`relaxation_times` runs its chains: ``replicas`` per point, score step ``eps``,
    ``seed``, on ``device`` (as for :func:`simulate`). The ``settings`` of
    :func:`relaxation_times` and :func:`~moe_kernels.dynamics.plot_critical_slowing`."""

    replicas: int = 512
    eps: float = 0.01
    seed: int = 0
    device: torch.device | str | None = None


DEFAULT_SWEEP = SweepSettings()
DEFAULT_CHAINS = ChainSettings()


def checked_settings(op: str, settings, kind: type):
    """``settings`` itself, or a ``TypeError`` naming ``op`` unless it is a ``kind`` (a settings
    record of this module)."""
    if not isinstance(settings, kind):
        raise TypeError(f"{op}: settings must be a moe_kernels.dynamics.{kind.__name__}, got {type(settings).__name__}")
    return settings


def adiabatic_sweep(
    feedback,
    asymmetry=0.0,
    *,
    num_experts: int = 2,
    initial_scores: torch.Tensor | None = None,
    settings: SweepSettings = DEFAULT_SWEEP,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Visit parameter points in order, each run starting from the previous point's final scores
    (a slow sweep, as in a hysteresis experiment).

    Args:
        feedback, asymmetry: numbers or 1-D sequences / tensors of the same length ``n`` (a
            number is held fixed); the ``i``-th point is ``(feedback[i], asymmetry[i])``.
        num_experts: as for :func:`simulate`.
        initial_scores: scores at the first point, broadcastable to ``(R, E)``; default ``1/E``.
        settings: a :class:`SweepSettings` (``R = settings.replicas`` chains).

    Returns:
        ``(load (n, R, E), scores (R, E))``: each point's selection fractions over the last half
        of its steps, and the final scores (to continue the sweep).
    """
    sweep = checked_settings("adiabatic_sweep", settings, SweepSettings)
    feedbacks = torch.as_tensor(feedback, dtype=torch.float32).reshape(-1)
    asymmetries = torch.as_tensor(asymmetry, dtype=torch.float32).reshape(-1)
    points = max(len(feedbacks), len(asymmetries))
    feedbacks, asymmetries = feedbacks.expand(points), asymmetries.expand(points)
    scores = initial_scores
    loads = []
    for index in range(points):
        start = None if scores is None else scores.reshape(1, sweep.replicas, num_experts)
        sim = simulate(
            float(feedbacks[index]),
            num_experts=num_experts,
            asymmetry=float(asymmetries[index]),
            steps=sweep.steps_per_point,
            replicas=sweep.replicas,
            eps=sweep.eps,
            seed=sweep.seed + index,
            initial_scores=start,
            device=sweep.device,
        )
        scores = sim.scores[0]
        loads.append(sim.load[0])
    return torch.stack(loads), scores


def sweep_up_and_down(
    feedback, asymmetry=0.0, *, num_experts: int = 2, settings: SweepSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """A hysteresis loop: :func:`adiabatic_sweep` over the points, then back over them in reverse
    order from the way up's final scores (seeded after the way up). Returns ``(load_up (n, R, E),
    load_down (n, R, E))``, ``load_down`` in the reversed order."""
    feedbacks, asymmetries = torch.as_tensor(feedback).reshape(-1), torch.as_tensor(asymmetry).reshape(-1)
    points = max(len(feedbacks), len(asymmetries))
    load_up, scores = adiabatic_sweep(feedbacks, asymmetries, num_experts=num_experts, settings=settings)
    back = settings._replace(seed=settings.seed + points)
    load_down, _ = adiabatic_sweep(
        feedbacks.flip(0), asymmetries.flip(0), num_experts=num_experts, initial_scores=scores, settings=back
    )
    return load_up, load_down


def relaxation_times(
    feedbacks, *, perturbation: float = 0.1, max_time: float = 30.0, settings: ChainSettings = DEFAULT_CHAINS
) -> torch.Tensor:
    """Measured relaxation time of two experts (``h = 0``) at each ``K``, in units of ``tau =
    eps * steps``, to compare with :func:`moe_kernels.dynamics.theory.relaxation_time`.

    Every replica starts at imbalance ``x* + delta``, where ``x*`` is the stable state with
    ``x >= 0`` and ``delta = min(perturbation, (1 - x*) / 2)`` (away from the saddle for
    ``K > 2``); the time is when the replicas' mean deviation ``mean(x) - x*`` first falls to
    ``delta / e`` (``inf`` if not within ``max_time``). Averaging the signed deviation over many
    replicas cancels the noise, leaving the mean-field decay. Close to ``K = 2`` from above the
    two wells are shallow and chains hop between them, so points there come out too long or
    ``inf``. ``settings``: a :class:`ChainSettings`.

    Returns:
        ``(P,)`` float64 times on the CPU.
    """
    chains = checked_settings("relaxation_times", settings, ChainSettings)
    eps = chains.eps
    values = [float(k) for k in torch.as_tensor(feedbacks).reshape(-1).tolist()]
    targets, deltas, starts = [], [], []
    for k in values:
        x_star = 2 * fixed_points(k)[-1][0] - 1
        delta = min(perturbation, (1 - x_star) / 2)
        targets.append(x_star)
        deltas.append(delta)
        starts.append([(1 + x_star + delta) / 2, (1 - x_star - delta) / 2])
    record_every = 5
    steps = math.ceil(max_time / eps / record_every) * record_every
    initial = torch.tensor(starts).unsqueeze(1)  # (P, 1, 2), broadcast over replicas
    sim = simulate(
        torch.tensor(values),
        steps=steps,
        initial_scores=initial,
        record_every=record_every,
        **chains._asdict(),
    )
    imbalance = (sim.trajectory[..., 0] - sim.trajectory[..., 1]).mean(dim=-1).double().cpu()  # (n, P)
    deviation = imbalance - torch.tensor(targets, dtype=torch.float64)
    reached = deviation <= torch.tensor(deltas, dtype=torch.float64) / math.e
    times = []
    for point in range(len(values)):
        hits = torch.nonzero(reached[:, point])
        times.append(math.inf if len(hits) == 0 else (int(hits[0]) + 1) * record_every * eps)
    return torch.tensor(times, dtype=torch.float64)
