"""The two training-free methods of the distribution-shift stage, each on its own copy of the LM:
kNN-MoE (a routing memory per layer, then ``KNNRouter``) and Counterfactual Routing (calibrated on
the calibration split, applied at the model's total activation count)."""

from __future__ import annotations

import time

import torch

from moe_kernels.demo.context import DemoContext
from moe_kernels.demo.model import batch_loss, token_losses
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
    """Counterfactual Routing on a copy of the LM (:func:`moe_kernels.cor.evaluate_counterfactual_routing`):
    calibrated on the prose calibration split, compared with static top-k (and each half of CoR
    alone) on held-out prose at the same total activation count; hard tokens are those whose
    static loss is above its 0.7 quantile."""
    from moe_kernels import cor

    model = ctx.trained_model()
    calibration = ctx.train_batches(ctx.corpus.prose_calibration, CALIBRATION_BATCHES[ctx.mode], seed_offset=4)
    start = time.perf_counter()
    settings = cor.CalibrationSettings(strength=COR_STRENGTH)
    result = cor.evaluate_counterfactual_routing(model, calibration, held_out["prose"], token_losses, settings=settings)
    seconds = time.perf_counter() - start
    static_tokens = torch.cat([token_losses(model, batch) for batch in held_out["prose"]])
    cor.apply_counterfactual_routing(model, result.plan)
    try:
        code_loss = float(torch.cat([token_losses(model, batch) for batch in held_out["code"]]).mean())
        cor_tokens = torch.cat([token_losses(model, batch) for batch in held_out["prose"]])
    finally:
        cor.revert_counterfactual_routing(model)
    static, routed = result.losses["static"], result.losses["cor"]
    # The paired change on the hard tokens and its standard error: is the difference more than noise?
    hard = static_tokens > torch.quantile(static_tokens, 0.7)
    change = (cor_tokens - static_tokens)[hard].double()
    change_se = float(change.std() / change.numel() ** 0.5) if change.numel() > 1 else float("nan")
    numbers = {
        "hard_loss_top_k": static["hard"],
        "hard_loss_cor": routed["hard"],
        "all_loss_top_k": static["all"],
        "all_loss_cor": routed["all"],
        "total_k": routed["activations_per_token"],
        "total_k_top_k": static["activations_per_token"],
        "hard_change": float(change.mean()),
        "hard_change_se": change_se,
        "variants": result.losses,
        "layers": result.layers,
        "strength": COR_STRENGTH,
    }
    plot = cor.plot_impact_heatmap(
        result.impact,
        ctx.out / "cor_impact.png",
        k=result.plan.k,
        title="Counterfactual expert impact on hard prose tokens",
    )
    row = {
        "loss_code": code_loss,
        "loss_prose": routed["all"],
        "experts_per_token": routed["activations_per_token"] / ctx.size.layers,
        "routing_entropy": None,
        "experts_for_99": None,
        "steps": 0,
        "seconds": seconds,
    }
    return {
        "row": row,
        "numbers": numbers,
        "plots": [str(plot.relative_to(ctx.out))],
        "tables": [result.budget_markdown(), result.losses_markdown()],
        "notes": [
            f"Counterfactual Routing: calibrated and evaluated in {seconds:.1f} s on {len(calibration)} batches of "
            f"prose; per-layer budget {[int(k) for k in result.plan.k]} (total {numbers['total_k']}, top-k's "
            f"{numbers['total_k_top_k']}); hard held-out prose tokens: {static['hard']:.4f} (top-k) -> "
            f"{routed['hard']:.4f} (CoR); all prose tokens {static['all']:.4f} -> {routed['all']:.4f}",
        ],
    }
