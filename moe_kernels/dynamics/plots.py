"""The four figures of the load-dynamics model, as PNG files (matplotlib, Agg: a bare ``Figure``
renders without pyplot state; matplotlib is imported when a plot is drawn, never on package
import). Each function runs its simulations, draws theory and simulation together, writes
``path`` and returns it as a :class:`pathlib.Path`."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from moe_kernels.dynamics.experiments import (
    DEFAULT_CHAINS,
    DEFAULT_SWEEP,
    ChainSettings,
    SweepSettings,
    checked_settings,
    relaxation_times,
    sweep_up_and_down,
)
from moe_kernels.dynamics.simulate import simulate
from moe_kernels.dynamics.theory import (
    critical_feedback,
    fold_feedback,
    one_winner_feedback,
    relaxation_time,
)
from moe_kernels.figures import new_figure, save_png

STABLE = dict(color="black", linewidth=1.6)
UNSTABLE = dict(color="black", linewidth=1.0, linestyle="--")


def _finish(fig, ax, path, *, small_title: bool = True, **labels) -> Path:
    """Set the axes' ``labels`` (``ax.set``), a small legend (and title), and write the PNG."""
    ax.set(**labels)
    if small_title:
        ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    return save_png(fig, path)


def _plot_sweeps(ax, up: torch.Tensor, mean_up: torch.Tensor, mean_down: torch.Tensor) -> None:
    """The two ways of a hysteresis loop: ``mean_up (n,)`` over the points ``up (n,)``, and
    ``mean_down (n,)`` over them in reverse."""
    ax.plot(up.tolist(), mean_up.cpu().tolist(), "o-", markersize=3, color="tab:blue", label="sweep up")
    ax.plot(up.flip(0).tolist(), mean_down.cpu().tolist(), "s-", markersize=3, color="tab:red", label="sweep down")


def _two_expert_branches(asymmetry: float, x: torch.Tensor):
    """Fixed points of ``x = tanh((K x + h) / 2)`` parametrised by ``x``: ``K(x) = (2 artanh x -
    h) / x`` and stability ``K (1 - x^2) / 2 < 1`` (``sech^2 = 1 - tanh^2`` at a fixed point)."""
    feedback = (2 * torch.atanh(x) - asymmetry) / x
    stable = feedback * (1 - x * x) / 2 < 1
    return feedback, stable


def _plot_masked(ax, xs, ys, mask, style, label=None):
    """Plot ``ys`` against ``xs`` where ``mask``, breaking the line where it is not."""
    ys = torch.where(mask, ys, torch.full_like(ys, math.nan))
    ax.plot(xs.tolist(), ys.tolist(), label=label, **style)


def plot_bifurcation(
    path,
    *,
    asymmetries=(0.0, 0.15, 0.5),
    feedbacks=None,
    steps: int = 20000,
    replicas: int = 16,
    eps: float = 0.01,
    seed: int = 0,
    device=None,
) -> Path:
    """Stationary load of expert 0 against ``K`` for each ``h`` in ``asymmetries``: theory
    branches (solid stable, dashed unstable) and every replica's simulated load (dots), from
    :func:`simulate` with ``steps``, ``replicas`` and ``eps``."""
    feedbacks = torch.linspace(0.5, 4.0, 15) if feedbacks is None else torch.as_tensor(feedbacks).float()
    fig, ax = new_figure()
    colors = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")
    x = torch.cat([torch.linspace(-0.9999, -1e-4, 4000), torch.linspace(1e-4, 0.9999, 4000)]).double()
    k_max = float(feedbacks.max()) * 1.05
    for index, h in enumerate(asymmetries):
        color = colors[index % len(colors)]
        branch_k, stable = _two_expert_branches(h, x)
        inside = (branch_k > 0) & (branch_k <= k_max)
        load = (1 + x) / 2
        for side, label in ((x < 0, None), (x > 0, f"h = {h:g}")):  # each side is one curve in K
            _plot_masked(ax, branch_k[side], load[side], (inside & stable)[side], {**STABLE, "color": color}, label)
            _plot_masked(ax, branch_k[side], load[side], (inside & ~stable)[side], {**UNSTABLE, "color": color})
        if h == 0:  # the balanced state x = 0 is not in the parametrisation
            ax.plot([0, 2], [0.5, 0.5], **{**STABLE, "color": color})
            ax.plot([2, k_max], [0.5, 0.5], **{**UNSTABLE, "color": color})
        sim = simulate(
            feedbacks, asymmetry=float(h), steps=steps, replicas=replicas, eps=eps, seed=seed + index, device=device
        )
        ks = feedbacks.repeat_interleave(replicas)
        ax.scatter(ks.tolist(), sim.load[..., 0].reshape(-1).cpu().tolist(), s=6, color=color, alpha=0.5)
    ax.axvline(2.0, color="gray", linewidth=0.6)
    return _finish(
        fig,
        ax,
        path,
        xlabel="feedback K",
        ylabel="stationary load of expert 0",
        ylim=(0, 1),
        xlim=(0, k_max),
        title=f"Two experts: pitchfork at K = 2, unfolded by h (dots: {replicas} chains, eps = {eps})",
    )


def plot_hysteresis(
    path,
    *,
    feedback: float = 3.0,
    asymmetry_max: float = 1.0,
    points: int = 41,
    settings: SweepSettings = DEFAULT_SWEEP,
) -> Path:
    """Mean load of expert 0 while ``h`` is swept slowly up from ``-asymmetry_max`` to
    ``+asymmetry_max`` in ``points`` points and back down at fixed ``feedback > 2``
    (:func:`sweep_up_and_down`; ``settings``: a :class:`SweepSettings`), with the theory's branches
    and folds."""
    sweep = checked_settings("plot_hysteresis", settings, SweepSettings)
    up = torch.linspace(-asymmetry_max, asymmetry_max, points)
    load_up, load_down = sweep_up_and_down(feedback, up, settings=sweep)
    fig, ax = new_figure()
    x = torch.linspace(-0.9999, 0.9999, 8001).double()
    branch_h = 2 * torch.atanh(x) - feedback * x  # h at which x is a fixed point
    stable = feedback * (1 - x * x) / 2 < 1
    inside = branch_h.abs() <= asymmetry_max * 1.05
    _plot_masked(ax, branch_h, (1 + x) / 2, inside & stable, STABLE, label="theory, stable")
    _plot_masked(ax, branch_h, (1 + x) / 2, inside & ~stable, UNSTABLE, label="theory, unstable")
    _plot_sweeps(ax, up, load_up[..., 0].mean(dim=1), load_down[..., 0].mean(dim=1))
    if feedback > 2:
        fold = abs(math.acosh(feedback - 1) - math.sinh(math.acosh(feedback - 1)))
        for h in (-fold, fold):
            ax.axvline(h, color="gray", linewidth=0.6)
    return _finish(
        fig,
        ax,
        path,
        xlabel="asymmetry h = b0 - b1",
        ylabel="load of expert 0",
        ylim=(0, 1),
        title=f"Hysteresis at K = {feedback:g} ({sweep.replicas} chains, {sweep.steps_per_point} steps per point, "
        f"eps = {sweep.eps})",
    )


def plot_critical_slowing(path, *, feedbacks=None, settings: ChainSettings = DEFAULT_CHAINS) -> Path:
    """Relaxation time against ``K`` for two experts (``h = 0``): :func:`relaxation_times`
    (dots; ``settings``: a :class:`ChainSettings`) and the theory ``1 / |f'(x*)|``, which diverges
    at ``K_c = 2``."""
    chains = checked_settings("plot_critical_slowing", settings, ChainSettings)
    if feedbacks is None:
        feedbacks = [1.0, 1.3, 1.5, 1.65, 1.75, 1.85, 2.3, 2.45, 2.6, 2.8, 3.0, 3.5]
    feedbacks = [float(k) for k in feedbacks]
    measured = relaxation_times(feedbacks, settings=chains)
    fig, ax = new_figure()
    grid = [k for k in torch.linspace(min(feedbacks), max(feedbacks), 400).tolist() if abs(k - 2) > 0.02]
    theory = [relaxation_time(k) for k in grid]
    for side in ([k for k in grid if k < 2], [k for k in grid if k > 2]):
        ax.plot(side, [theory[grid.index(k)] for k in side], **STABLE)
    ax.plot(feedbacks, measured.tolist(), "o", color="tab:red", label=f"simulation ({chains.replicas} chains)")
    ax.plot([], [], **STABLE, label="theory 1 / |f'(x*)|")
    ax.axvline(2.0, color="gray", linewidth=0.6)
    return _finish(
        fig,
        ax,
        path,
        small_title=False,
        xlabel="feedback K",
        ylabel="relaxation time (units of 1/eps steps)",
        yscale="log",
        title="Critical slowing down near K_c = 2 (two experts, h = 0)",
    )


def plot_collapse(path, *, num_experts: int = 4, feedbacks=None, settings: SweepSettings = DEFAULT_SWEEP) -> Path:
    """The E-expert collapse: mean winner load while ``K`` is swept slowly up from uniform
    scores and back down (:func:`sweep_up_and_down`; ``settings``: a :class:`SweepSettings`),
    against the theory (uniform state stable below ``E``, one-winner branch from
    :func:`fold_feedback` on); the window between them is shaded."""
    sweep = checked_settings("plot_collapse", settings, SweepSettings)
    critical, fold = critical_feedback(num_experts), fold_feedback(num_experts)
    if feedbacks is None:
        feedbacks = torch.linspace(max(0.5, fold - 1.5), critical + 1.5, 31)
    up = torch.as_tensor(feedbacks, dtype=torch.float32)
    load_up, load_down = sweep_up_and_down(up, num_experts=num_experts, settings=sweep)
    fig, ax = new_figure()
    k_lo, k_hi = float(up.min()), float(up.max())
    ax.axvspan(fold, critical, color="gold", alpha=0.25, label=f"window [{fold:.2f}, {critical:g}]")
    uniform = 1 / num_experts
    ax.plot([k_lo, critical], [uniform, uniform], **STABLE, label="theory, stable")
    ax.plot([critical, k_hi], [uniform, uniform], **UNSTABLE, label="theory, unstable")
    m = torch.linspace(uniform + 1e-4, 1 - 1e-6, 6000, dtype=torch.float64)
    branch_k = one_winner_feedback(num_experts, m)
    turning = int(torch.argmin(branch_k))
    inside = branch_k <= k_hi
    upper = torch.arange(len(m)) >= turning
    _plot_masked(ax, branch_k, m, inside & upper, STABLE)
    _plot_masked(ax, branch_k, m, inside & ~upper, UNSTABLE)
    _plot_sweeps(ax, up, load_up.amax(dim=-1).mean(dim=1), load_down.amax(dim=-1).mean(dim=1))
    return _finish(
        fig,
        ax,
        path,
        xlabel="feedback K",
        ylabel="largest expert load",
        ylim=(0, 1),
        xlim=(k_lo, k_hi),
        title=f"{num_experts} experts: first-order collapse ({sweep.replicas} chains, {sweep.steps_per_point} "
        f"steps per point, eps = {sweep.eps})",
    )


def draw_all(out_dir, *, device=None) -> list[Path]:
    """The four figures with their default settings into ``out_dir`` (about 20 s on one CPU
    core): ``bifurcation.png``, ``hysteresis.png``, ``critical_slowing.png``, ``collapse.png``."""
    out_dir = Path(out_dir)
    return [
        plot_bifurcation(out_dir / "bifurcation.png", device=device),
        plot_hysteresis(out_dir / "hysteresis.png", settings=SweepSettings(device=device)),
        plot_critical_slowing(out_dir / "critical_slowing.png", settings=ChainSettings(device=device)),
        plot_collapse(out_dir / "collapse.png", settings=SweepSettings(device=device)),
    ]


if __name__ == "__main__":
    import sys

    for written in draw_all(sys.argv[1] if len(sys.argv) > 1 else "."):
        print(written)
