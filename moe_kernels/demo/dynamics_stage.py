"""The demo's load-dynamics stage: the bifurcation model of adaptive softmax routing (theory and
simulation), the trained LM's routers (their load on both domains, and the feedback strength at
which adaptive scores would collapse them), and the digits experiment that tests the predicted
collapse threshold against training runs, once per seed (run by the experiments stage)."""

from __future__ import annotations

import torch
from torch import nn

from moe_kernels.balance import load_stats
from moe_kernels.demo.claims import bifurcation_claim
from moe_kernels.demo.context import DemoContext
from moe_kernels.demo.model import record_routing
from moe_kernels.demo.report import StageResult, markdown_table
from moe_kernels.dynamics import plots
from moe_kernels.dynamics.digits import linear_threshold

BIFURCATION = {
    "quick": dict(steps=4000, replicas=6, feedbacks=[0.5, 1.0, 1.5, 2.5, 3.0, 4.0]),
    "full": dict(steps=20000, replicas=16, feedbacks=None),
}


def dynamics_stage(ctx: DemoContext) -> StageResult:
    stage = StageResult("load_dynamics", "Load dynamics of softmax routing, and the trained routers' load")
    bifurcation = plots.plot_bifurcation(ctx.out / "bifurcation.png", seed=ctx.seed, **BIFURCATION[ctx.mode])
    stage.plots.append(str(bifurcation.relative_to(ctx.out)))

    layers = _lm_routers(ctx) if ctx.model is not None else []
    if layers:
        stage.tables.append(
            markdown_table(layers, ["layer", "domain", "cv", "max_over_mean", "entropy", "jain", "collapse_feedback"])
        )
    else:
        stage.notes.append("the language model's stage did not run: no router statistics")
    runs, protocol = ctx.require_runs()
    digits = [
        {"seed": run["seed"], **{key: d[key] for key in ("experts", "predicted", "measured", "with_bias")}}
        for run in runs
        for d in run["digits"]
    ]
    stage.tables.append(markdown_table(digits, ["seed", "experts", "predicted", "measured", "with_bias"]))
    stage.numbers = {"lm_routers": layers, "digits": [run["digits"] for run in runs]}
    stage.notes += [
        "bifurcation.png: the stationary load of expert 0 of two experts against the feedback strength K, theory "
        "branches (solid stable, dashed unstable) and simulated chains (dots); the pitchfork at K = 2 unfolds with "
        "the asymmetry h",
        "LM routers: each layer's load on held-out text (cv, max/mean, normalised entropy, Jain index) and the "
        "feedback strength K at which adaptive scores (s <- (1 - eps) s + eps * load, logits + K s) would destabilise "
        "its balanced routing, predicted from its logits (the linear threshold of the digits experiment)",
        "digits: an MoE classifier on scikit-learn's 8x8 digits with an adaptive-score router, fine-tuned at each K "
        "(multiples of the predicted threshold); 'measured' is where its load imbalance reaches 0.5; "
        "with AuxLossFreeBias it stays balanced",
    ]
    stage.claims = [bifurcation_claim(runs, protocol).to_dict()]
    return stage


def _lm_routers(ctx: DemoContext) -> list[dict]:
    """Per layer and domain: the trained LM's load statistics and predicted collapse feedback."""
    model = ctx.model
    rows = []
    for domain, data in (("code", ctx.corpus.code_held_out), ("prose", ctx.corpus.prose_held_out)):
        inputs, ids = record_routing(model, ctx.eval_batches(data))
        for layer, block in enumerate(model.blocks):
            stats = load_stats(ids[layer], model.size.experts)
            with torch.no_grad():
                logits = nn.functional.linear(inputs[layer], block.router.weight)
            rows.append(
                {
                    "layer": layer,
                    "domain": domain,
                    **{key: float(getattr(stats, key)) for key in ("cv", "max_over_mean", "entropy", "jain")},
                    "collapse_feedback": linear_threshold(logits),
                }
            )
    return rows
