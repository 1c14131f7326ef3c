"""moe_kernels.dynamics: the theory against independent numerics, the simulator against the theory,
the adaptive-score router, the digits experiment (quick), the plots, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import moe_kernels
from moe_kernels import dynamics
from moe_kernels.balance import AuxLossFreeBias
from moe_kernels.dynamics import AdaptiveScoreRouter
from moe_kernels.testing import tolerance

# --- theory ----------------------------------------------------------------------------------------


def _roots_by_scan(feedback: float, asymmetry: float) -> tuple[np.ndarray, np.ndarray]:
    """Every root of tanh((K x + h) / 2) - x on [-1, 1] by a dense sign scan plus vectorised
    bisection, and the slope there by central differences: an oracle sharing no code with
    fixed_points."""
    x = np.linspace(-1, 1, 400_001)
    f = np.tanh((feedback * x + asymmetry) / 2) - x
    idx = np.nonzero(np.sign(f[:-1]) != np.sign(f[1:]))[0]
    lo, hi = x[idx], x[idx + 1]
    for _ in range(80):
        mid = (lo + hi) / 2
        same = np.sign(np.tanh((feedback * mid + asymmetry) / 2) - mid) == np.sign(
            np.tanh((feedback * lo + asymmetry) / 2) - lo
        )
        lo, hi = np.where(same, mid, lo), np.where(same, hi, mid)
    roots = (lo + hi) / 2
    step = 1e-6
    slope = (
        np.tanh((feedback * (roots + step) + asymmetry) / 2)
        - (roots + step)
        - np.tanh((feedback * (roots - step) + asymmetry) / 2)
        + (roots - step)
    ) / (2 * step)
    return roots, slope


def test_fixed_points_match_root_search():
    rng = np.random.default_rng(0)
    checked = 0
    for feedback, asymmetry in zip(rng.uniform(0.2, 5.0, 120), rng.uniform(-1.5, 1.5, 120)):
        roots, slope = _roots_by_scan(feedback, asymmetry)
        if np.any(np.abs(slope) < 1e-3):  # too close to a fold for a sign scan to resolve
            continue
        points = dynamics.fixed_points(float(feedback), float(asymmetry))
        assert len(points) == len(roots), (feedback, asymmetry)
        loads = np.array([load for load, _ in points])
        np.testing.assert_allclose(loads, (1 + roots) / 2, atol=1e-9)
        assert [stable for _, stable in points] == list(slope < 0)
        checked += 1
    assert checked > 100
    # Three fixed points somewhere in the sample (inside the cusp), one elsewhere.
    assert len(dynamics.fixed_points(3.0, 0.1)) == 3 and len(dynamics.fixed_points(3.0, 0.6)) == 1


def test_symmetric_branch_values():
    # The mean-field fixed points at E = 2: K = 2.5, 3, 4 give winner loads 0.855, 0.929, 0.979;
    # balanced below K = 2 (docs/dynamics.md).
    for feedback, load in ((2.5, 0.855), (3.0, 0.929), (4.0, 0.979)):
        points = dynamics.fixed_points(feedback)
        assert [s for _, s in points] == [True, False, True]
        assert abs(points[-1][0] - load) < 5e-4 and abs(points[0][0] - (1 - load)) < 5e-4
        assert points[1][0] == pytest.approx(0.5, abs=1e-12)
    assert dynamics.fixed_points(1.7) == [(pytest.approx(0.5, abs=1e-12), True)]


@pytest.mark.parametrize("theta", [-2.0, -0.7, 0.3, 1.0, 2.5])
def test_cusp_satisfies_fold_conditions(theta):
    feedback, asymmetry = dynamics.cusp(theta)
    x = math.tanh(theta / 2)
    drift = math.tanh((feedback * x + asymmetry) / 2) - x
    step = 1e-6
    slope = (
        math.tanh((feedback * (x + step) + asymmetry) / 2) - math.tanh((feedback * (x - step) + asymmetry) / 2)
    ) / (2 * step) - 1
    assert abs(drift) < 1e-12 and abs(slope) < 1e-8
    # Inside the cusp (|h| below the fold at this K) three fixed points, outside one.
    assert len(dynamics.fixed_points(feedback, 0.9 * asymmetry)) == 3
    assert len(dynamics.fixed_points(feedback, 1.1 * asymmetry)) == 1
    k_t, h_t = dynamics.cusp(torch.tensor([theta], dtype=torch.float64))
    assert float(k_t) == pytest.approx(feedback, rel=1e-14) and float(h_t) == pytest.approx(asymmetry, abs=1e-14)


def test_cusp_point():
    assert dynamics.cusp(0.0) == (2.0, 0.0)
    assert dynamics.fixed_points(2.0, 0.0) == [(pytest.approx(0.5, abs=1e-6), True)]


@pytest.mark.parametrize("num_experts,expected", [(2, 2.0), (3, 2.746), (4, 3.219), (8, 4.250), (16, 5.189)])
def test_fold_feedback_against_grid_search(num_experts, expected):
    fold = dynamics.fold_feedback(num_experts)
    assert round(fold, 3) == expected
    m = np.linspace(1 / num_experts, 1, 2_000_001)[1:-1]
    rest = num_experts - 1
    grid = np.log(rest * m / (1 - m)) / (m - (1 - m) / rest)
    assert fold == pytest.approx(grid.min(), abs=1e-7)
    if num_experts > 2:
        assert fold < dynamics.critical_feedback(num_experts) == num_experts


def test_critical_feedback_top1_gaussian():
    two = dynamics.critical_feedback(2, selection="top1_gaussian", noise=0.7)
    assert two == pytest.approx(0.7 * math.sqrt(math.pi))
    # E = 4: the zero-sum eigenvalue of the load Jacobian by Monte Carlo (common random numbers).
    num_experts, delta = 4, 0.05
    z = torch.randn(2_000_000, num_experts, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    shift = torch.tensor([delta, 0, 0, 0], dtype=torch.float64)
    wins = [((z + s).argmax(dim=1) == 0).double().mean() for s in (shift, -shift)]
    slope = float(wins[0] - wins[1]) / (2 * delta) * num_experts / (num_experts - 1)
    expected = dynamics.critical_feedback(num_experts, selection="top1_gaussian")
    assert 1 / slope == pytest.approx(expected, rel=0.02)


# --- simulation ------------------------------------------------------------------------------------

# Simulation vs theory, two experts, h = 0: eps = 0.01, 40000 steps (loads over the last 20000),
# 64 replicas; about 2 s on one core. The winner's load (the larger of a chain's two loads) carries
# an upward bias below K_c, the max of two noisy time averages, that shrinks as 1/sqrt(steps): at
# K = 1.5 it is 0.011-0.012 here (seeds 0-3), 0.018 with 20000 steps. Largest deviations over
# seeds 0-3: 0.0063, 0.0119, 0.0093, 0.0014, 0.0003 at K = 1, 1.5, 2.5, 3, 4.
SIM_EPS, SIM_STEPS, SIM_REPLICAS = 0.01, 40000, 64


def test_simulation_matches_theory_two_experts():
    feedbacks = [1.0, 1.5, 2.5, 3.0, 4.0]
    sim = dynamics.simulate(torch.tensor(feedbacks), steps=SIM_STEPS, replicas=SIM_REPLICAS, eps=SIM_EPS, seed=0)
    assert sim.load.shape == (5, SIM_REPLICAS, 2) and sim.load.dtype == torch.float32
    assert torch.allclose(sim.load.sum(-1), torch.ones(5, SIM_REPLICAS))
    winner = sim.winner_load.mean(dim=1)
    for index, feedback in enumerate(feedbacks):
        theory = max(load for load, stable in dynamics.fixed_points(feedback) if stable)
        assert abs(float(winner[index]) - theory) < 0.02, (feedback, float(winner[index]), theory)
    # Below K_c neither expert wins: expert 0's mean load is 0.5.
    assert torch.all((sim.load[:2, :, 0].mean(dim=1) - 0.5).abs() < 0.01)


def _one_winner_load(num_experts: int, feedback: float) -> float:
    """The stable one-winner load at feedback K (upper branch), by bisection on m."""
    lo, hi = 0.999999, 0.5
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if dynamics.one_winner_feedback(num_experts, mid) > feedback else (lo, mid)
    return (lo + hi) / 2


def test_simulation_four_experts_uniform_below_fold_collapsed_above_e():
    fold = dynamics.fold_feedback(4)
    sim = dynamics.simulate(torch.tensor([0.75 * fold, 5.0]), num_experts=4, steps=16000, replicas=32, eps=0.01)
    below, above = sim.winner_load
    assert float(below.max()) < 0.32  # uniform is 0.25
    assert float(above.min()) > 0.95
    assert float(above.mean()) == pytest.approx(_one_winner_load(4, 5.0), abs=0.01)


def test_simulation_top1_gaussian_threshold():
    critical = dynamics.critical_feedback(2, selection="top1_gaussian", noise=1.0)
    sim = dynamics.simulate(
        torch.tensor([0.6 * critical, 1.6 * critical]),
        selection="top1_gaussian",
        noise=1.0,
        steps=10000,
        replicas=32,
        eps=0.01,
        seed=3,
    )
    below, above = sim.winner_load.mean(dim=1).tolist()
    x = 0.9  # the stable state of x = erf(K x / 2) (logit-difference spread sqrt(2)), by iteration
    for _ in range(500):
        x = math.erf(1.6 * critical * x / 2)
    assert below < 0.53
    assert above == pytest.approx((1 + x) / 2, abs=0.02)


def test_simulation_with_asymmetry_matches_the_unique_fixed_point():
    sim = dynamics.simulate(1.5, asymmetry=0.5, steps=20000, replicas=32, eps=SIM_EPS, seed=1)
    ((theory, stable),) = dynamics.fixed_points(1.5, 0.5)
    assert stable and float(sim.load[0, :, 0].mean()) == pytest.approx(theory, abs=0.01)


def test_simulation_is_reproducible_and_bias_equals_asymmetry():
    kwargs = dict(steps=300, replicas=5, eps=0.05, seed=7)
    first = dynamics.simulate(torch.tensor([1.0, 3.0]), asymmetry=0.3, **kwargs)
    again = dynamics.simulate(torch.tensor([1.0, 3.0]), asymmetry=0.3, **kwargs)
    assert torch.equal(first.load, again.load) and torch.equal(first.scores, again.scores)
    as_bias = dynamics.simulate(torch.tensor([1.0, 3.0]), bias=torch.tensor([0.3, 0.0]), **kwargs)
    assert torch.equal(first.load, as_bias.load)
    other = dynamics.simulate(torch.tensor([1.0, 3.0]), asymmetry=0.3, **{**kwargs, "seed": 8})
    assert not torch.equal(first.load, other.load)
    # (P, E) bias with a scalar feedback: P points from the bias.
    per_point = dynamics.simulate(2.0, num_experts=3, bias=torch.randn(4, 3), **kwargs)
    assert per_point.load.shape == (4, 5, 3) and per_point.feedback.tolist() == [2.0] * 4


@pytest.mark.gpu
def test_simulation_on_cuda():
    feedback = torch.tensor([1.0, 3.0], device="cuda")
    first = dynamics.simulate(feedback, steps=20000, replicas=64, eps=0.01, seed=4)
    again = dynamics.simulate(feedback, steps=20000, replicas=64, eps=0.01, seed=4)
    assert first.load.device.type == "cuda" and torch.equal(first.load, again.load)
    winner = first.winner_load.mean(dim=1).cpu()
    assert abs(float(winner[1]) - dynamics.fixed_points(3.0)[-1][0]) < 0.02
    assert abs(float(first.load[0, :, 0].mean()) - 0.5) < 0.01


def test_simulation_host_syncs_do_not_grow_with_steps():
    """The argument checks read a few values back once; the step loop reads none."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.syncs = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.syncs += str(func.overloadpacket) in ("aten._local_scalar_dense", "aten.nonzero")
            return func(*args, **(kwargs or {}))

    counts = []
    for steps in (10, 60):
        with Recorder() as recorder:
            dynamics.simulate(torch.tensor([1.0, 3.0]), steps=steps, replicas=4, record_every=5)
        counts.append(recorder.syncs)
    assert counts[0] == counts[1] <= 3


def test_trajectory_and_initial_scores():
    start = torch.tensor([0.9, 0.1])
    sim = dynamics.simulate(1.0, steps=40, replicas=3, eps=0.1, initial_scores=start, record_every=10, seed=2)
    assert sim.trajectory.shape == (4, 1, 3, 2)
    assert torch.equal(sim.trajectory[-1], sim.scores)
    # Scores stay on the simplex, and the (deterministic) decay of the start is visible.
    assert torch.allclose(sim.trajectory.sum(-1), torch.ones(4, 1, 3), atol=1e-5)
    one_step = dynamics.simulate(1.0, steps=2, replicas=1, eps=0.1, initial_scores=start, record_every=1)
    first = one_step.trajectory[0, 0, 0]
    assert torch.allclose(first, 0.9 * start + 0.1 * torch.tensor([1.0, 0.0])) or torch.allclose(
        first, 0.9 * start + 0.1 * torch.tensor([0.0, 1.0])
    )


def test_hysteresis_loop_at_k3():
    # At K = 3 the folds are at |h| = 0.415: sweeping up from h = -1, expert 0 stays low past h = 0;
    # sweeping back down, it stays high past h = 0.
    h_up = torch.linspace(-1, 1, 11)
    settings = dynamics.SweepSettings(steps_per_point=2000, replicas=32, eps=0.005)
    up, scores = dynamics.adiabatic_sweep(3.0, h_up, settings=settings)
    back = settings._replace(seed=100)
    down, _ = dynamics.adiabatic_sweep(3.0, h_up.flip(0), initial_scores=scores, settings=back)
    at_zero_up, at_zero_down = float(up[5, :, 0].mean()), float(down[5, :, 0].mean())
    assert at_zero_up < 0.15 and at_zero_down > 0.85
    assert float(up[-1, :, 0].mean()) > 0.9 and float(down[-1, :, 0].mean()) < 0.1


def test_critical_slowing_down():
    times = dynamics.relaxation_times([1.0, 1.5, 3.0], settings=dynamics.ChainSettings(replicas=512, eps=0.01))
    theory = torch.tensor([dynamics.relaxation_time(k) for k in (1.0, 1.5, 3.0)], dtype=torch.float64)
    assert torch.allclose(times, theory, rtol=0.2)
    assert dynamics.relaxation_time(1.99) > 100 and dynamics.relaxation_time(2.01) > 50


# --- the adaptive-score router ---------------------------------------------------------------------


def test_adaptive_router_routes_logits_plus_feedback_scores():
    torch.manual_seed(0)
    router = AdaptiveScoreRouter(16, 6, 2, feedback=2.5, eps=0.1)
    router.scores.copy_(torch.softmax(torch.randn(6), 0))
    hidden = torch.randn(64, 16)
    scores_before = router.scores.clone()
    router.eval()
    weights, ids = router(hidden)
    assert torch.equal(router.scores, scores_before)  # eval: no update
    logits = hidden.double() @ router.weight.double().T + 2.5 * scores_before.double()
    probs = torch.softmax(logits, -1)
    ref_ids = probs.topk(2, dim=-1).indices
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert torch.equal(ids.long(), ref_ids)
    atol, rtol = tolerance(torch.float32)
    torch.testing.assert_close(weights.double(), probs.gather(1, ref_ids), atol=atol, rtol=rtol)
    router.train()
    _, ids = router(hidden)
    fractions = torch.bincount(ids.reshape(-1).long(), minlength=6).double() / ids.numel()
    expected = 0.9 * scores_before.double() + 0.1 * fractions
    torch.testing.assert_close(router.scores.double(), expected, atol=1e-6, rtol=0)


def test_adaptive_router_in_moe_trains_and_balances():
    torch.manual_seed(1)
    balancer = AuxLossFreeBias(4, rate=0.05)
    router = AdaptiveScoreRouter(8, 4, 1, feedback=1.0, eps=0.2, balancer=balancer)
    moe = moe_kernels.MoE(8, 16, 4, 1, router=router)
    out = moe(torch.randn(32, 8))
    out.square().mean().backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    assert balancer.bias.abs().sum() > 0  # updated together with the scores
    assert "balancer" in dict(router.named_children())


def test_adaptive_router_collapses_and_the_bias_holds_it(one_thread):
    # Fixed gate: feedback far above its threshold collapses the load; with the bias it does not.
    torch.manual_seed(2)
    hidden = torch.randn(256, 8)
    results = {}
    for name, balancer in (("plain", None), ("balanced", AuxLossFreeBias(2, rate=0.02))):
        router = AdaptiveScoreRouter(8, 2, 1, feedback=0.0, eps=0.05, balancer=balancer)
        with torch.no_grad():
            router.weight.copy_(torch.randn(2, 8) * 0.1)
            critical = 1 / (2 * 0.4 / float((hidden @ (router.weight[0] - router.weight[1])).std()))
        router.feedback = 3 * critical  # density of a Gaussian logit gap at 0 ~ 0.4 / std
        for _ in range(300):
            router(hidden)
        router.eval()
        results[name] = moe_kernels.balance.load_stats(router(hidden)[1], 2).fraction.max()
    assert float(results["plain"]) > 0.95 and float(results["balanced"]) < 0.6


# --- the digits experiment, quick ------------------------------------------------------------------


@pytest.mark.parametrize("num_experts", [2, 4])
def test_digits_threshold_quick(num_experts):
    """Gate frozen after 8 pretraining epochs; 5 epochs at K = 0.6, 1.5 and 2.5 times the threshold
    predicted from its logits: balanced below, collapsed above, balanced above with
    AuxLossFreeBias (rate 0.05). Seeds 0-2 gave imbalances <= 0.32 below, >= 0.97 above, <= 0.11
    with the bias, and |measured - predicted| <= 0.025."""
    from moe_kernels.dynamics.digits import sweep_digits

    sweep = sweep_digits(num_experts, [0.6, 1.5, 2.5], relative=True, pretrain_epochs=8, epochs=5, grid_points=0)
    below, above, far = sweep.rows
    assert below["imbalance"] < 0.4 and above["imbalance"] > 0.9 and far["imbalance"] > 0.95
    assert all(row["balanced_imbalance"] < 0.2 for row in sweep.rows)
    # The mean-field prediction for the same number of score updates tracks the measurement.
    assert all(abs(row["imbalance"] - row["predicted_imbalance"]) < 0.1 for row in sweep.rows)
    assert 0.6 * sweep.critical < sweep.measured < 1.5 * sweep.critical
    assert all(row["balanced_accuracy"] > 0.95 for row in sweep.rows)


# --- plots -----------------------------------------------------------------------------------------


def test_plots_write_png(tmp_path):
    sweep = dynamics.SweepSettings(steps_per_point=200, replicas=2)
    chains = dynamics.ChainSettings(replicas=16)
    paths = [
        dynamics.plot_bifurcation(tmp_path / "bifurcation.png", feedbacks=[1.0, 3.0], steps=400, replicas=2),
        dynamics.plot_hysteresis(tmp_path / "hysteresis.png", points=5, settings=sweep),
        dynamics.plot_critical_slowing(tmp_path / "slowing.png", feedbacks=[1.0, 3.0], settings=chains),
        dynamics.plot_collapse(tmp_path / "collapse.png", feedbacks=[2.0, 5.0], settings=sweep),
    ]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    with pytest.raises(
        TypeError, match=r"plot_collapse: settings must be a moe_kernels.dynamics.SweepSettings, got dict"
    ):
        dynamics.plot_collapse(tmp_path / "collapse.png", settings={"replicas": 2})


def test_import_does_not_load_matplotlib_or_sklearn():
    import subprocess
    import sys

    code = (
        "import sys, moe_kernels; moe_kernels.dynamics.simulate; moe_kernels.balance.load_stats; "
        "print([m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'sklearn')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- the benchmark's baselines ---------------------------------------------------------------------


def test_benchmark_python_loop_follows_the_rule_and_rows(monkeypatch):
    from benchmarks import bench_dynamics, common

    loads = torch.tensor(bench_dynamics.python_loop_rule(2, 8, 6000, feedback=3.0, eps=0.01))
    assert float(loads.amax(dim=1).mean()) == pytest.approx(dynamics.fixed_points(3.0)[-1][0], abs=0.03)
    monkeypatch.setattr(common, "CPU_TARGET_S", 0.005)  # a smoke run: a few calls per row
    monkeypatch.setattr(bench_dynamics, "QUICK_SIM_CASES", ((2, 16),))
    monkeypatch.setattr(bench_dynamics, "QUICK_STAT_TOKENS", (64,))
    rows = bench_dynamics.run(quick=True, device="cpu", groups=("simulate", "load_stats"))  # no transformers import
    assert [row["provider"] for row in rows[:2]] == ["moe_kernels", "python_loop"]
    assert rows[0]["chain_steps_per_s"] > 0 and rows[0]["speedup_vs_python_loop"] > 0
    ours = [row for row in rows if row["provider"] == "moe_kernels" and row["group"] == "load_stats"]
    assert len(ours) == 3 and all(row["speedup_vs_torch_bincount"] > 0 for row in ours)
    ids = torch.tensor([[0, 3], [3, -1], [2, 3]])
    for chain in (bench_dynamics.torch_bincount_stats, bench_dynamics.torch_one_hot_stats):
        counts, fraction, cv, max_over_mean, entropy, jain = chain(ids, 4)
        stats = moe_kernels.balance.load_stats(ids, 4)
        assert torch.equal(counts, stats.counts)
        torch.testing.assert_close(
            torch.stack([cv, max_over_mean, entropy, jain]),
            torch.stack([stats.cv, stats.max_over_mean, stats.entropy, stats.jain]),
        )


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(eps=-0.1), ValueError, "simulate: eps must be in \\(0, 1\\], got -0.1"),
        (dict(eps=0.0), ValueError, "eps must be in"),
        (dict(eps=1.5), ValueError, "eps must be in"),
        (dict(steps=1), ValueError, "simulate: steps must be >= 2, got 1"),
        (dict(steps=2.5), TypeError, "steps must be an int"),
        (dict(num_experts=1), ValueError, "simulate: num_experts must be >= 2, got 1"),
        (dict(replicas=0), ValueError, "replicas must be >= 1"),
        (dict(selection="top2"), ValueError, "selection must be one of"),
        (dict(selection="top1_gaussian", noise=0.0), ValueError, "noise must be a finite number > 0"),
        (dict(bias=torch.zeros(3)), ValueError, "bias must be \\(E,\\) or \\(P, E\\)"),
        (dict(asymmetry=float("nan")), ValueError, "asymmetry must be finite"),
        (dict(initial_scores=torch.zeros(3)), ValueError, "initial_scores must broadcast"),
        (dict(record_every=0), ValueError, "record_every must be >= 1"),
    ],
)
def test_simulate_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        dynamics.simulate(1.0, **{"steps": 10, **kwargs})


@pytest.mark.parametrize("feedback", [float("nan"), float("inf"), torch.tensor([1.0, float("inf")])])
def test_non_finite_feedback(feedback):
    with pytest.raises(ValueError, match="feedback must be finite"):
        dynamics.simulate(feedback, steps=10)
    if not isinstance(feedback, torch.Tensor):
        with pytest.raises(ValueError, match="fixed_points: feedback must be finite"):
            dynamics.fixed_points(feedback)
        with pytest.raises(ValueError, match="AdaptiveScoreRouter: feedback must be finite"):
            AdaptiveScoreRouter(4, 2, 1, feedback=feedback)


def test_theory_and_router_bad_input():
    with pytest.raises(ValueError, match="critical_feedback: num_experts must be >= 2, got 1"):
        dynamics.critical_feedback(1)
    with pytest.raises(ValueError, match="fold_feedback: num_experts must be >= 2"):
        dynamics.fold_feedback(1)
    with pytest.raises(TypeError, match="fold_feedback: num_experts must be an int"):
        dynamics.fold_feedback(3.0)
    with pytest.raises(ValueError, match="critical_feedback: selection must be one of"):
        dynamics.critical_feedback(2, selection="top2")
    with pytest.raises(ValueError, match="one_winner_feedback: load must be in"):
        dynamics.one_winner_feedback(4, 0.2)
    with pytest.raises(ValueError, match="AdaptiveScoreRouter: num_experts must be >= 2"):
        AdaptiveScoreRouter(4, 1, 1, feedback=1.0)
    with pytest.raises(ValueError, match="AdaptiveScoreRouter: eps must be in \\(0, 1\\], got -0.01"):
        AdaptiveScoreRouter(4, 2, 1, feedback=1.0, eps=-0.01)
    with pytest.raises(ValueError, match="balancer must be an AuxLossFreeBias over 2 experts"):
        AdaptiveScoreRouter(4, 2, 1, feedback=1.0, balancer=AuxLossFreeBias(3))
