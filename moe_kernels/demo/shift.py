"""The demo's distribution-shift stage: the seeds' LMs, pretrained on source code with rare prose,
meet English prose, and every routing method of the package is measured on every held-out
position of both domains (the numbers come from the experiments stage; this stage tabulates,
plots and judges them).

Methods (each on its own copy of a seed's LM; the new domain's data is one fixed set of prose
windows, the same for the kNN memory and every fine-tuning arm; every choice a method makes is
made on the prose calibration split):

- ``zero_shot``: the frozen model;
- ``knn``: kNN-MoE, a routing memory per layer over the fixed set, then ``KNNRouter``;
- ``router_ft`` / ``full_ft``: top-k fine-tuning of the routers only / of the whole model;
- ``exact_k`` / ``dynamic_k``: whole-model fine-tuning with ProbMoE exact-k / dynamic-k (band
  ``[1, k]``) routers sharing the trained gates; ``top_1``: with one expert per token;
- Counterfactual Routing (training-free) against static top-k and placebo priors.
"""

from __future__ import annotations

import math
import statistics

from moe_kernels.demo.claims import cor_claim, knn_claims, probmoe_claims
from moe_kernels.demo.context import DemoContext
from moe_kernels.demo.report import StageResult, markdown_table
from moe_kernels.figures import new_figure, save_png

METHODS = ("zero_shot", "knn", "router_ft", "full_ft", "exact_k", "dynamic_k", "top_1")
COLUMNS = ("loss_prose", "loss_code", "experts_per_token", "routing_entropy", "experts_for_99", "positive_logits")


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def method_rows(runs: list[dict]) -> list[dict]:
    """Per method, each column's mean ± standard deviation across seeds."""
    return [
        {"method": name, **{c: _mean_sd([run["arms"][name][c] for run in runs]) for c in COLUMNS}} for name in METHODS
    ]


def plot_placebos(runs: list[dict], path) -> object:
    """Per seed, the placebo priors' paired changes on the high-entropy tokens (dots) and CoR's
    (a red bar), against static top-k (0)."""
    fig, ax = new_figure(6.4, 3.6)
    for row, run in enumerate(runs):
        placebos = run["cor"]["placebos"]["entropy"]
        ax.scatter(placebos, [row] * len(placebos), s=10, alpha=0.5, color="tab:gray")
        ax.plot([run["cor"]["cor"]["entropy"]] * 2, [row - 0.3, row + 0.3], color="tab:red", lw=2.5)
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_yticks(range(len(runs)), [f"seed {run['seed']}" for run in runs])
    ax.set(
        xlabel="paired loss change vs static top-k (nats), high-entropy tokens",
        title="Counterfactual Routing (red) against placebo priors (grey)",
    )
    return save_png(fig, path)


def plot_claims(results: list, path) -> object:
    """One panel per claim: every seed's value (dots), the mean with its one-sided 95% bounds (the
    bar), and the criterion's bound (dashed); the title carries the verdict."""
    from matplotlib.figure import Figure

    columns = 2
    rows = (len(results) + columns - 1) // columns
    fig = Figure(figsize=(11, 2.1 * rows))
    for index, claim in enumerate(results):
        ax = fig.add_subplot(rows, columns, index + 1)
        if claim.values:
            ax.scatter(claim.values, [0.0] * len(claim.values), s=18, color="tab:gray", zorder=3)
            low = claim.interval[0] if math.isfinite(claim.interval[0]) else min(claim.values)
            high = claim.interval[1] if math.isfinite(claim.interval[1]) else max(claim.values)
            ax.plot([low, high], [0.25, 0.25], color="tab:blue", lw=3)
            ax.plot([claim.estimate], [0.25], "o", color="tab:blue")
        if claim.bound is not None:
            ax.axvline(claim.bound, color="tab:red", ls="--", lw=1.2)
        ax.set_yticks([])
        ax.set_ylim(-0.5, 0.75)
        ax.set_title(f"{claim.paper.split(' (')[0]}: {claim.claim[:48]}...\n{claim.verdict}", fontsize=8)
        ax.tick_params(labelsize=7)
    return save_png(fig, path)


def shift_stage(ctx: DemoContext) -> StageResult:
    stage = StageResult("distribution_shift", "Distribution shift: source code -> English prose")
    runs, protocol = ctx.require_runs()
    rows = method_rows(runs)
    stage.numbers = {
        "methods": {name: {c: [run["arms"][name][c] for run in runs] for c in COLUMNS} for name in METHODS},
        "choices": {name: [run["arms"][name]["choice"] for run in runs] for name in METHODS},
        "cor": [run["cor"] for run in runs],
        "paired": [run["paired"] for run in runs],
    }
    stage.timings = {"per_seed": [run["timings"] for run in runs]}
    stage.tables.append(markdown_table(rows, ["method", *COLUMNS]))
    plot = plot_placebos(runs, ctx.out / "cor_placebos.png")
    stage.plots.append(str(plot.relative_to(ctx.out)))
    build = statistics.fmean(run["timings"]["knn_build"] for run in runs)
    router = statistics.fmean(run["timings"]["router_ft"] for run in runs)
    budgets = ", ".join(f"seed {run['seed']}: {run['cor']['budget']}" for run in runs)
    stage.notes += [
        f"held-out loss in nats per character on every held-out position of source code (the pretraining domain, "
        f"{runs[0]['positions']['code']:,} positions) and English prose (the new domain, "
        f"{runs[0]['positions']['prose']:,}); mean ± standard deviation over {len(runs)} seeds; routing statistics "
        "on held-out prose from the logits each router routed with (kNN-MoE's mixed ones)",
        f"fine-tuning: the same fixed set of {protocol.reference_batches * protocol.size.batch} prose windows for "
        f"every arm and the kNN memory; lr from {list(protocol.lr_grid)} and up to {protocol.max_epochs} epochs "
        "chosen on the calibration split (per seed, every arm by the same rule)",
        f"cost on the same windows (seconds, mean over seeds, not judged): kNN-MoE's memory build {build:.1f}, "
        f"router-only fine-tuning {router:.1f} (every lr and epoch of the grid; one process per seed, "
        f"{len(runs)} seeds sharing the cores)",
        f"Counterfactual Routing's per-layer budget per seed ({budgets}; static {runs[0]['cor']['budget_static']}); "
        f"placebos: {protocol.placebos} priors per seed with the plan's values shuffled across experts",
    ]
    results = [*knn_claims(runs, protocol), *probmoe_claims(runs, protocol), cor_claim(runs, protocol)]
    stage.claims = [claim.to_dict() for claim in results]
    plot = plot_claims(results, ctx.out / "claims.png")
    stage.plots.append(str(plot.relative_to(ctx.out)))
    stage.notes.append(
        "claims.png: per claim, every seed's value (grey), the mean and its one-sided 95% bounds (blue) and the "
        "criterion's bound (red, dashed); CoR's bound is the pooled placebos' 5th percentile"
    )
    return stage
