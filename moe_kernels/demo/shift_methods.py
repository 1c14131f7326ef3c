"""The two training-free methods of the distribution-shift stage, each on its own copy of the LM:
kNN-MoE (a routing memory per layer, then ``KNNRouter``) and Counterfactual Routing (calibrated on
the calibration split, applied at the model's total activation count)."""

from __future__ import annotations

import time

import torch

from moe_kernels.demo.context import DemoContext
from moe_kernels.demo.model import batch_loss, token_losses
from moe_kernels.demo.report import markdown_table
from moe_kernels.knn import KNNRouter, build_routing_memory, faiss_available

# Calibration batches of Counterfactual Routing, by mode.
CALIBRATION_BATCHES = {"quick": 2, "full": 6}
COR_STRENGTH = 0.1
NEIGHBORS = 8


def knn_method(ctx: DemoContext, reference_batches: int):
    """A copy of the LM with a ``KNNRouter`` per layer over a memory built on the prose reference
    split; returns ``(model, info)`` with the build time, memory size and held-out confidence."""
    model = ctx.trained_model()
    reference = ctx.train_batches(ctx.corpus.prose_reference, reference_batches, seed_offset=3)
    start = time.perf_counter()
    built = build_routing_memory(
        model, reference, batch_loss, steps=20, lr=0.1, index="flat" if faiss_available() else "torch", progress=False
    )
    seconds = time.perf_counter() - start
    for name, memory in built.memories.items():
        block = model.get_submodule(name)
        block.router = KNNRouter(
            block.router.weight, memory, ctx.size.k, n_neighbors=NEIGHBORS, routing=block.router.routing
        )
    confidences = []
    with torch.no_grad():
        for context, _ in ctx.eval_batches(ctx.corpus.prose_held_out):
            model(context)
            confidences.append(torch.stack([block.router.last_confidence for block in model.blocks]))
    memory = next(iter(built.memories.values()))
    return model, {
        "build_seconds": seconds,
        "memory_entries": memory.num_entries,
        "memory_index": memory.index_kind,
        "reference_loss_before": built.loss_before,
        "reference_loss_after": built.loss_after,
        "mean_confidence": float(torch.cat(confidences, dim=1).mean()),
    }


def cor_method(ctx: DemoContext, held_out: dict) -> dict:
    """Counterfactual Routing on a copy of the LM: calibrate on the prose calibration split, apply
    at the same total activation count, compare with static top-k on the hard held-out prose tokens
    (base loss above its 0.7 quantile) and on all of them."""
    from moe_kernels import cor

    model = ctx.trained_model()
    calibration = ctx.train_batches(ctx.corpus.prose_calibration, CALIBRATION_BATCHES[ctx.mode], seed_offset=4)
    start = time.perf_counter()
    plan = cor.calibrate(model, calibration, token_losses, strength=COR_STRENGTH)
    seconds = time.perf_counter() - start
    base = torch.cat([token_losses(model, batch) for batch in held_out["prose"]])
    hard = base > torch.quantile(base, 0.7)
    cor.apply_counterfactual_routing(model, plan)
    try:
        routed = torch.cat([token_losses(model, batch) for batch in held_out["prose"]])
        code = torch.cat([token_losses(model, batch) for batch in held_out["code"]])
    finally:
        cor.revert_counterfactual_routing(model)
    total_k = int(plan.k.sum())
    numbers = {
        "hard_loss_top_k": float(base[hard].mean()),
        "hard_loss_cor": float(routed[hard].mean()),
        "all_loss_top_k": float(base.mean()),
        "all_loss_cor": float(routed.mean()),
        "total_k": total_k,
        "total_k_top_k": ctx.size.k * ctx.size.layers,
        "k_per_layer": [int(k) for k in plan.k],
        "strength": COR_STRENGTH,
    }
    plot = _prior_heat_map(plan.prior, ctx.out / "cor_impact.png")
    row = {
        "loss_code": float(code.mean()),
        "loss_prose": float(routed.mean()),
        "experts_per_token": total_k / ctx.size.layers,
        "routing_entropy": None,
        "experts_for_99": None,
        "steps": 0,
        "seconds": seconds,
    }
    budget = [{"layer": layer, "k_top_k": ctx.size.k, "k_cor": int(k)} for layer, k in enumerate(plan.k)]
    return {
        "row": row,
        "numbers": numbers,
        "plots": [str(plot.relative_to(ctx.out))],
        "tables": [markdown_table(budget, ["layer", "k_top_k", "k_cor"])],
        "notes": [
            f"Counterfactual Routing: calibrated in {seconds:.1f} s on {len(calibration)} batches of prose; "
            f"per-layer budget {numbers['k_per_layer']} (total {total_k} = top-k's {numbers['total_k_top_k']}); "
            f"hard held-out prose tokens (top 30% by the frozen model's loss): {numbers['hard_loss_top_k']:.4f} -> "
            f"{numbers['hard_loss_cor']:.4f}; all prose tokens {numbers['all_loss_top_k']:.4f} -> "
            f"{numbers['all_loss_cor']:.4f}",
        ],
    }


def _prior_heat_map(prior: torch.Tensor, path):
    """The per-layer min-max normalised counterfactual impact (the plan's prior) as a PNG."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 1.2 + 0.45 * prior.shape[0]))
    ax = fig.subplots()
    image = ax.imshow(prior.float().cpu().numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set(xlabel="expert", ylabel="MoE layer", title="Counterfactual expert impact on hard tokens (per layer, 0-1)")
    ax.set_yticks(range(prior.shape[0]))
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
