"""CoR end to end on a causal LM (what the demo calls): calibrate, then compare the per-token losses
of static top-k and of CoR (and of each half of it) at the same total activation count."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moe_kernels.cor._batches import as_batch_list, call_losses
from moe_kernels.cor._layers import find_moe_layers
from moe_kernels.cor.budget import allocate_layer_budget
from moe_kernels.cor.calibrate import calibrate_with_sensitivity
from moe_kernels.cor.losses import stratify
from moe_kernels.cor.plan import CoRPlan
from moe_kernels.cor.routing import apply_counterfactual_routing, revert_counterfactual_routing
from moe_kernels.cor.sensitivity import LayerSensitivity
from moe_kernels.cor.settings import DEFAULT_SETTINGS, CalibrationSettings, checked_settings
from moe_kernels.figures import new_figure, save_png

# The routings compared, in report order: static top-k, each half of CoR alone, CoR.
VARIANTS = ("static", "layer_budget_only", "prior_only", "cor")


@dataclass
class CoRResult:
    """What :func:`evaluate_counterfactual_routing` measured.

    ``plan``: the calibrated :class:`CoRPlan`; ``sensitivity``: its :class:`LayerSensitivity`;
    ``layers``: the budget table, one dict per MoE layer (``layer``, ``name``, ``num_experts``,
    ``k_static``, ``k_cor``, ``ratio``, ``hard_sensitivity``, ``easy_sensitivity``,
    ``top_expert``: the expert of largest impact); ``impact (L, E)`` float32: the raw
    counterfactual expert impact; ``losses``: per variant of :data:`VARIANTS` the mean eval loss
    over ``all`` tokens and over the ``hard`` ones (eval tokens above ``quantile(l, hard_quantile)``
    of the static losses), with ``tokens``, ``hard_tokens`` and ``activations_per_token``.
    """

    plan: CoRPlan
    sensitivity: LayerSensitivity
    layers: list[dict]
    impact: torch.Tensor
    losses: dict[str, dict]

    def to_dict(self) -> dict:
        """JSON-able values (the plan as :meth:`CoRPlan.to_dict`)."""
        return {"plan": self.plan.to_dict(), "layers": self.layers, "losses": self.losses}

    def budget_markdown(self) -> str:
        """The per-layer budget table as Markdown."""
        head = "| layer | name | E | k static | k CoR | ratio | hard sens. | easy sens. | top expert |"
        lines = [head, "|" + "---|" * 9]
        for row in self.layers:
            lines.append(
                f"| {row['layer']} | {row['name']} | {row['num_experts']} | {row['k_static']} | {row['k_cor']} | "
                f"{row['ratio']:.4g} | {row['hard_sensitivity']:.4g} | {row['easy_sensitivity']:.4g} | "
                f"{row['top_expert']} |"
            )
        return "\n".join(lines)

    def losses_markdown(self) -> str:
        """The loss comparison as Markdown (mean loss, lower is better)."""
        lines = ["| routing | activations / token | all tokens | hard tokens |", "|---|---|---|---|"]
        for name, row in self.losses.items():
            lines.append(f"| {name} | {row['activations_per_token']} | {row['all']:.4f} | {row['hard']:.4f} |")
        return "\n".join(lines)


def _eval_losses(model, batches, token_losses, plan: CoRPlan | None) -> torch.Tensor:
    revert_counterfactual_routing(model)
    if plan is not None:
        apply_counterfactual_routing(model, plan)
    try:
        with torch.no_grad():
            return torch.cat([call_losses(model, batch, token_losses, None, "evaluate") for batch in batches])
    finally:
        revert_counterfactual_routing(model)


def evaluate_counterfactual_routing(
    model: nn.Module,
    calibration_batches,
    eval_batches,
    token_losses: Callable,
    *,
    plan: CoRPlan | None = None,
    settings: CalibrationSettings = DEFAULT_SETTINGS,
) -> CoRResult:
    """Calibrate CoR on ``calibration_batches`` (or use ``plan``), then evaluate on
    ``eval_batches``: static top-k, the layer budget alone (``plan.k``, no prior), the prior alone
    (static k, the plan's prior) and CoR, all at the same total activation count. "Static" is the
    model's own routing when ``total_k`` is its own total (the default), else the uniform
    largest-remainder split of ``total_k`` without prior.

    ``token_losses`` as for :func:`calibrate` (e.g. :func:`causal_lm_token_losses`); ``settings``
    as for :func:`calibrate` (a :class:`~moe_kernels.cor.CalibrationSettings`), its
    ``hard_quantile`` also splitting the eval tokens. The model is
    left without a CoR plan (every variant is reverted after its forwards). Cost: :func:`calibrate`'s,
    plus four forwards per eval batch. Returns a :class:`CoRResult`; :func:`plot_impact_heatmap` draws its ``impact``.
    """
    op = "evaluate_counterfactual_routing"
    settings = checked_settings(op, settings)
    eval_batches = as_batch_list(eval_batches, op)
    layers = find_moe_layers(model, op)
    base_k = torch.tensor([layer.k for layer in layers], dtype=torch.int64)
    sensitivity = None
    if plan is None:
        plan, sensitivity = calibrate_with_sensitivity(model, calibration_batches, token_losses, settings)
    else:
        apply_counterfactual_routing(model, plan)  # validates the plan against the model
        revert_counterfactual_routing(model)
    if sensitivity is None:
        calibration = plan.calibration
        zeros = [0.0] * plan.num_layers
        sensitivity = LayerSensitivity(
            plan.ratio if plan.ratio is not None else torch.zeros(plan.num_layers),
            torch.tensor(calibration.get("hard_sensitivity", zeros), dtype=torch.float32),
            torch.tensor(calibration.get("easy_sensitivity", zeros), dtype=torch.float32),
        )
    zero_prior = torch.zeros_like(plan.prior)
    static = None
    static_k = base_k
    if plan.total_k != int(base_k.sum()):
        limits = [layer.eligible_experts for layer in layers]
        static_k = allocate_layer_budget(torch.ones(plan.num_layers), plan.total_k, k_max=limits)
        static = CoRPlan(static_k, zero_prior, 0.0)
    variants = {
        "static": static,
        "layer_budget_only": CoRPlan(plan.k, zero_prior, 0.0),
        "prior_only": CoRPlan(static_k, plan.prior, plan.strength),
        "cor": plan,
    }
    per_variant = {name: _eval_losses(model, eval_batches, token_losses, variant) for name, variant in variants.items()}
    hard, _ = stratify(per_variant["static"], settings.hard_quantile, None, op)
    losses = {}
    for name, values in per_variant.items():
        finite = torch.isfinite(values)
        k = static_k if variants[name] is None else variants[name].k
        losses[name] = {
            "all": float(values[finite].mean()),
            "hard": float(values[hard].mean()) if hard.any() else float("nan"),
            "tokens": int(finite.sum()),
            "hard_tokens": int(hard.sum()),
            "activations_per_token": int(k.sum()),
        }
    impact = plan.impact if plan.impact is not None else torch.zeros_like(plan.prior)
    table = [
        {
            "layer": layer.index,
            "name": layer.name,
            "num_experts": layer.num_experts,
            "k_static": int(static_k[layer.index]),
            "k_cor": int(plan.k[layer.index]),
            "ratio": float(sensitivity.ratio[layer.index]),
            "hard_sensitivity": float(sensitivity.hard[layer.index]),
            "easy_sensitivity": float(sensitivity.easy[layer.index]),
            "top_expert": int(impact[layer.index].argmax()),
        }
        for layer in layers
    ]
    return CoRResult(plan, sensitivity, table, impact, losses)


def plot_impact_heatmap(
    impact: torch.Tensor, path: str | os.PathLike, *, k=None, title: str = "counterfactual expert impact"
) -> Path:
    """Draw ``impact (L, E)`` as a heat map (layers down, experts across; a diverging colour scale
    centred on 0) into the PNG ``path``; ``k (L,)`` labels each layer with its budget. Uses
    :mod:`moe_kernels.figures` (matplotlib imported when drawing: ``moe_kernels.cor`` does not need it).
    Returns the path."""
    values = torch.as_tensor(impact).detach().double().cpu()
    if values.dim() != 2:
        raise ValueError(f"plot_impact_heatmap: impact must be (L, E), got shape {tuple(values.shape)}")
    num_layers, num_experts = values.shape
    bound = float(values.abs().max()) or 1.0
    fig, ax = new_figure(max(5.0, min(2 + 0.25 * num_experts, 16)), max(3.0, min(1.5 + 0.4 * num_layers, 12)))
    image = ax.imshow(values.numpy(), cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="mean loss increase when ablated")
    labels = [f"{l}" if k is None else f"{l} (k={int(k[l])})" for l in range(num_layers)]
    ax.set_yticks(range(num_layers), labels)
    ax.set(xlabel="expert", ylabel="MoE layer", title=title)
    return save_png(fig, path)
