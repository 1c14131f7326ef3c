"""CoR calibration: token stratification, layer sensitivity, expert impact and the budget, in one
call that shares the clean pass."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from moe_kernels.config import is_int
from moe_kernels.cor._batches import calibration_run
from moe_kernels.cor._layers import MoELayer, is_counterfactual_routing_applied, uniform_num_experts
from moe_kernels.cor.budget import allocate_layer_budget
from moe_kernels.cor.impact import impact_from_clean
from moe_kernels.cor.plan import CoRPlan, min_max_normalize
from moe_kernels.cor.sensitivity import LayerSensitivity, sensitivity_from_clean
from moe_kernels.cor.settings import DEFAULT_SETTINGS, CalibrationSettings, checked_settings


def calibrate(
    model: nn.Module, batches, token_losses: Callable, settings: CalibrationSettings = DEFAULT_SETTINGS
) -> CoRPlan:
    """A :class:`CoRPlan` for ``model`` from the calibration ``batches``:

    1. clean per-token losses over all batches; hard tokens above ``quantile(l, hard_quantile)``,
       easy ones below ``quantile(l, easy_quantile)``;
    2. :func:`layer_sensitivity` (``delta``) -> ``ratio (L,)``;
    3. :func:`expert_impact` -> ``impact (L, E)`` and its per-layer min-max normalisation, the prior;
    4. ``k = allocate_layer_budget(ratio, total_k, k_min=1, k_max=each layer's selectable
       experts)`` (E, or the kept groups' experts under a group limit).

    ``settings``: a :class:`CalibrationSettings` (every field is read). ``total_k`` defaults to
    the model's current total (the sum of each layer's k), so the
    activation budget is unchanged. The clean forward is shared by steps 2 and 3; the costs are
    theirs (see their docs). The plan's ``calibration`` holds the settings, token counts, base k
    and the hard / easy sensitivities. Refuses a model with a CoR plan applied (revert first).
    """
    plan, _ = calibrate_with_sensitivity(model, batches, token_losses, checked_settings("calibrate", settings))
    return plan


def calibrate_with_sensitivity(
    model: nn.Module, batches, token_losses: Callable, settings: CalibrationSettings
) -> tuple[CoRPlan, LayerSensitivity]:
    """:func:`calibrate` with its checked ``settings``, also returning the :class:`LayerSensitivity`
    it computed."""
    op = "calibrate"
    if is_counterfactual_routing_applied(model):
        raise ValueError(f"{op}: the model has a CoR plan applied; call revert_counterfactual_routing(model) first")

    def check_layers(layers: list[MoELayer]) -> None:
        uniform_num_experts(layers, op)
        _total_k(op, layers, settings.total_k)

    run = calibration_run(op, model, batches, token_losses, settings, check_layers)
    layers = run.layers
    sensitivity = sensitivity_from_clean(run)
    impact = impact_from_clean(run)
    limits = [layer.eligible_experts for layer in layers]
    k = allocate_layer_budget(sensitivity.ratio, _total_k(op, layers, settings.total_k), k_min=1, k_max=limits)
    calibration = {
        "hard_quantile": settings.hard_quantile,
        "easy_quantile": settings.easy_quantile,
        "delta": settings.delta,
        "tokens": int(run.clean.all_losses().isfinite().sum()),
        "hard_tokens": int(run.hard.sum()),
        "easy_tokens": int(run.easy.sum()),
        "base_k": [layer.k for layer in layers],
        "layer_names": [layer.name for layer in layers],
        "hard_sensitivity": sensitivity.hard.tolist(),
        "easy_sensitivity": sensitivity.easy.tolist(),
    }
    plan = CoRPlan(
        k=k,
        prior=min_max_normalize(impact),
        strength=settings.strength,
        ratio=sensitivity.ratio,
        impact=impact,
        calibration=calibration,
    )
    return plan, sensitivity


def _total_k(op: str, layers: list[MoELayer], total_k: int | None) -> int:
    """The activation budget: ``total_k`` checked against the layers, or their own total when None."""
    if total_k is None:
        return sum(layer.k for layer in layers)
    limit = sum(layer.eligible_experts for layer in layers)
    if not is_int(total_k) or not len(layers) <= total_k <= limit:
        raise ValueError(
            f"{op}: total_k must be an int in [L, sum of selectable experts] = [{len(layers)}, {limit}], "
            f"got {total_k!r}"
        )
    return total_k
