"""Load-dynamics simulator and load-balancing toolkit benchmark.

Three groups, each row timed against its baselines on the same inputs in the same run:

================  ==============  ===============================================================
group             provider        what runs
================  ==============  ===============================================================
simulate          moe_kernels     :func:`moe_kernels.dynamics.simulate`: all chains advance
                                  together, a few tensor ops per step
                  python_loop     the rule in plain Python (``math.exp``, ``random.random``), one
                                  chain after another; timed on a slice of the chains and steps
                                  and reported per chain-step
load_stats        moe_kernels     :func:`moe_kernels.balance.load_stats` (one scatter-add)
                  torch_bincount  the chain usually written: mask out -1 with boolean indexing,
                                  ``torch.bincount``, then the statistics (both sync on CUDA)
                  torch_one_hot   ``one_hot`` of the ids summed over tokens, then the statistics
switch_aux_loss   moe_kernels     :func:`moe_kernels.balance.switch_aux_loss` on given ids
                  torch_one_hot   the same loss with the counts from ``one_hot(ids).sum``
                  hf_transformers ``load_balancing_loss_func`` of transformers' Mixtral (when
                                  installed); it recomputes softmax and top-k from the logits
================  ==============  ===============================================================

Losses and statistics are timed forward only. ``chain_steps_per_s`` (simulate) and
``speedup`` (baseline median / moe_kernels median, on the moe_kernels row against each
baseline: ``speedup_vs_<provider>``) are derived columns. CPU timings depend on the thread count:
``--threads N`` sets torch's intra-op threads for the run (recorded as ``torch_threads``).

    python -m benchmarks.bench_dynamics --quick --threads 1
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch

from benchmarks.command import bench_parser, main_for
from benchmarks.common import resolve_device, time_fn
from moe_kernels import balance, dynamics

OP_NAME = "dynamics"
GROUPS = ("simulate", "load_stats", "switch_aux_loss")
TABLE_COLUMNS = (
    "model",
    "T",
    "provider",
    "median_us",
    "p20_us",
    "p80_us",
    "chain_steps_per_s",
    "speedup_vs_python_loop",
    "speedup_vs_torch_bincount",
    "speedup_vs_torch_one_hot",
    "speedup_vs_hf_transformers",
    "timer",
)
# (E, chains) of the simulator; steps per timed call.
SIM_CASES = ((2, 64), (2, 1024), (2, 16384), (8, 1024))
QUICK_SIM_CASES = ((2, 64), (2, 1024), (8, 1024))
SIM_STEPS, QUICK_SIM_STEPS = 2000, 500
# The Python loop runs this many chain-steps per timed call (its rate does not depend on the split).
PYTHON_CHAIN_STEPS = 4000
# (E, k) routing shapes and token counts of the statistics and the loss.
STAT_SHAPES = ((8, 2), (64, 6), (256, 8))
STAT_TOKENS, QUICK_STAT_TOKENS = (1, 64, 1024, 16384), (64, 4096)
FEEDBACK, EPS = 3.0, 0.01
# one_hot materialises T * k * E int64 values: beyond this many the torch_one_hot rows are skipped.
ONE_HOT_MAX_ELEMENTS = 1 << 24


def python_loop_rule(
    num_experts: int, chains: int, steps: int, *, feedback: float = FEEDBACK, eps: float = EPS, seed: int = 0
) -> list[list[float]]:
    """The routing rule in plain Python: each chain's selection fractions over the last half of
    its steps (softmax sampling by inverse CDF)."""
    rng = random.Random(seed)
    loads = []
    for _ in range(chains):
        scores = [1 / num_experts] * num_experts
        counts = [0] * num_experts
        for step in range(steps):
            logits = [feedback * s for s in scores]
            top = max(logits)
            weights = [math.exp(v - top) for v in logits]
            threshold = rng.random() * sum(weights)
            chosen, running = num_experts - 1, 0.0
            for expert, weight in enumerate(weights):
                running += weight
                if threshold < running:
                    chosen = expert
                    break
            scores = [(1 - eps) * s for s in scores]
            scores[chosen] += eps
            if step >= steps // 2:
                counts[chosen] += 1
        loads.append([c / (steps - steps // 2) for c in counts])
    return loads


def _row(group: str, label: str, size: int, provider: str, timing: dict, **extra) -> dict:
    return {"op": OP_NAME, "group": group, "model": label, "T": size, "provider": provider, **timing, **extra}


def _speedups(rows: list[dict]) -> None:
    """``speedup_vs_<baseline>`` on the moe_kernels row of one point (per chain-step for simulate)."""
    key = "chain_steps_per_s" if "chain_steps_per_s" in rows[0] else None
    ours = next(row for row in rows if row["provider"] == "moe_kernels")
    for row in rows:
        if row is ours:
            continue
        if key:
            ours[f"speedup_vs_{row['provider']}"] = ours[key] / row[key]
        else:
            ours[f"speedup_vs_{row['provider']}"] = row["median_us"] / ours["median_us"]


def _simulate_row(label: str, chains: int, provider: str, timing: dict, ran_chains: int, steps: int) -> dict:
    """A simulate row: ``timing`` of ``ran_chains`` chains of ``steps`` steps (the Python loop runs
    fewer chains than the point's ``chains``), and the chain steps per second it makes."""
    rate = ran_chains * steps / timing["median_us"] * 1e6
    return _row("simulate", label, chains, provider, timing, steps=steps, chain_steps_per_s=rate)


def bench_simulate(device: torch.device, quick: bool) -> list[dict]:
    steps = QUICK_SIM_STEPS if quick else SIM_STEPS
    rows = []
    for num_experts, chains in QUICK_SIM_CASES if quick else SIM_CASES:
        label = f"simulate E={num_experts}"
        timing = time_fn(
            lambda: dynamics.simulate(
                FEEDBACK, num_experts=num_experts, replicas=chains, steps=steps, eps=EPS, device=device
            ),
            device=device,
        )
        py_chains = max(1, min(chains, PYTHON_CHAIN_STEPS // steps))
        py_steps = PYTHON_CHAIN_STEPS // py_chains
        python_timing = time_fn(lambda: python_loop_rule(num_experts, py_chains, py_steps), device=torch.device("cpu"))
        point = [
            _simulate_row(label, chains, "moe_kernels", timing, chains, steps),
            _simulate_row(label, chains, "python_loop", python_timing, py_chains, py_steps),
        ]
        _speedups(point)
        rows += point
    return rows


def _stats_from_counts(values: torch.Tensor, num_experts: int) -> tuple:
    total = values.sum()
    fraction = values / total
    mean = total / num_experts
    entropy = -torch.special.xlogy(fraction, fraction).sum() / math.log(num_experts)
    return (
        fraction,
        values.std(correction=0) / mean,
        values.amax() / mean,
        entropy,
        total * total / (num_experts * (values * values).sum()),
    )


def torch_bincount_stats(ids: torch.Tensor, num_experts: int) -> tuple:
    flat = ids.reshape(-1)
    counts = torch.bincount(flat[flat >= 0].long(), minlength=num_experts)
    return (counts, *_stats_from_counts(counts.float(), num_experts))


def torch_one_hot_stats(ids: torch.Tensor, num_experts: int) -> tuple:
    flat = ids.reshape(-1).long()
    hot = torch.nn.functional.one_hot(flat.clamp_min(0), num_experts) * (flat >= 0).unsqueeze(1)
    counts = hot.sum(0)
    return (counts, *_stats_from_counts(counts.float(), num_experts))


def torch_one_hot_aux_loss(logits: torch.Tensor, ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    counts = torch.nn.functional.one_hot(ids.long(), num_experts).sum((0, 1)).float()
    return num_experts / logits.shape[0] * torch.dot(counts, torch.softmax(logits.float(), -1).mean(0))


def _hf_loss():
    try:
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    except ImportError:
        return None
    return load_balancing_loss_func


def _inputs(num_experts: int, k: int, tokens: int, device: torch.device):
    gen = torch.Generator().manual_seed(tokens)
    logits = (torch.randn(tokens, num_experts, generator=gen) * 2).to(device)
    ids = torch.topk(logits, k, dim=-1).indices.to(torch.int32)
    return logits, ids


def _one_hot_fits(tokens: int, k: int, num_experts: int) -> bool:
    if tokens * k * num_experts <= ONE_HOT_MAX_ELEMENTS:
        return True
    print(
        f"torch_one_hot skipped at E={num_experts} k={k} T={tokens}: one_hot would hold "
        f"{tokens * k * num_experts} int64 values"
    )
    return False


def bench_load_stats(device: torch.device, quick: bool) -> list[dict]:
    rows = []
    for num_experts, k in STAT_SHAPES:
        label = f"load_stats E={num_experts} k={k}"
        for tokens in QUICK_STAT_TOKENS if quick else STAT_TOKENS:
            _, ids = _inputs(num_experts, k, tokens, device)
            expected = balance.load_stats(ids, num_experts).counts
            point = []
            chains = [("moe_kernels", balance.load_stats), ("torch_bincount", torch_bincount_stats)]
            if _one_hot_fits(tokens, k, num_experts):
                chains.append(("torch_one_hot", torch_one_hot_stats))
            for name, fn in chains:
                assert torch.equal(fn(ids, num_experts)[0], expected), name
                point.append(
                    _row("load_stats", label, tokens, name, time_fn(lambda fn=fn: fn(ids, num_experts), device=device))
                )
            _speedups(point)
            rows += point
    return rows


def bench_switch_aux_loss(device: torch.device, quick: bool) -> list[dict]:
    hf_loss = _hf_loss()
    rows = []
    for num_experts, k in STAT_SHAPES:
        label = f"switch_aux_loss E={num_experts} k={k}"
        for tokens in QUICK_STAT_TOKENS if quick else STAT_TOKENS:
            logits, ids = _inputs(num_experts, k, tokens, device)
            calls = {"moe_kernels": lambda: balance.switch_aux_loss(logits, ids, num_experts)}
            if _one_hot_fits(tokens, k, num_experts):
                calls["torch_one_hot"] = lambda: torch_one_hot_aux_loss(logits, ids, num_experts)
            if hf_loss is not None:
                calls["hf_transformers"] = lambda: hf_loss((logits,), num_experts, k)
            expected = calls["moe_kernels"]()
            point = []
            for name, call in calls.items():
                torch.testing.assert_close(call(), expected, atol=1e-5, rtol=1e-5, msg=name)
                point.append(_row("switch_aux_loss", label, tokens, name, time_fn(call, device=device)))
            _speedups(point)
            rows += point
    return rows


def run(*, quick: bool = False, device: str | torch.device | None = None, groups: Sequence[str] = GROUPS) -> list[dict]:
    """Benchmark the chosen groups and return the rows (see the module doc)."""
    device = resolve_device(device)
    benches = {"simulate": bench_simulate, "load_stats": bench_load_stats, "switch_aux_loss": bench_switch_aux_loss}
    rows = []
    for group in groups:
        rows += benches[group](device, quick)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    quick_help = f"{QUICK_SIM_STEPS} simulator steps, 3 chain counts, T in {QUICK_STAT_TOKENS}"
    parser = bench_parser("bench_dynamics", __doc__, quick_help)
    parser.add_argument("--groups", nargs="+", choices=GROUPS, default=GROUPS, help="groups to time (default: all)")
    return main_for(OP_NAME, parser, argv, run, TABLE_COLUMNS)


if __name__ == "__main__":
    raise SystemExit(main())
