"""CoR calibration: token stratification, layer sensitivity, expert impact and the budget, in one
call that shares the clean pass."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from torch import nn

from moe_kernels.config import is_finite_number, is_int
from moe_kernels.cor._batches import as_batch_list, calibration_run
from moe_kernels.cor._layers import find_moe_layers, is_counterfactual_routing_applied, uniform_num_experts
from moe_kernels.cor.budget import allocate_layer_budget
from moe_kernels.cor.impact import impact_from_clean
from moe_kernels.cor.losses import check_quantiles
from moe_kernels.cor.plan import CoRPlan, min_max_normalize
from moe_kernels.cor.sensitivity import (
    LayerSensitivity,
    check_delta,
    check_tokens_per_forward,
    sensitivity_from_clean,
)


class CalibrationSettings(NamedTuple):
    """The keyword arguments of :func:`calibrate` (and of
    :func:`~moe_kernels.cor.evaluate_counterfactual_routing`), with their defaults: the one
    place that names them.

    ``total_k``: the activation budget (default: the model's own total); ``strength``: the
    prior's weight lambda; ``hard_quantile`` / ``easy_quantile``: the token split;
    ``delta``: the output scaling of :func:`~moe_kernels.cor.layer_sensitivity`;
    ``tokens_per_forward``: the most tokens one what-if forward holds; ``progress``: show
    progress bars (stderr)."""

    total_k: int | None = None
    strength: float = 0.1
    hard_quantile: float = 0.7
    easy_quantile: float = 0.3
    delta: float = 0.2
    tokens_per_forward: int = 4096
    progress: bool = False

    @classmethod
    def of(cls, op: str, keywords: dict) -> CalibrationSettings:
        """The settings ``keywords`` name (the others at their defaults); ``TypeError`` naming
        ``op`` for a name that is not a setting."""
        unknown = sorted(set(keywords) - set(cls._fields))
        if unknown:
            raise TypeError(f"{op}: unexpected keyword argument(s) {unknown}; the settings are {list(cls._fields)}")
        return cls(**keywords)


def calibrate(model: nn.Module, batches, token_losses: Callable, **settings) -> CoRPlan:
    """A :class:`CoRPlan` for ``model`` from the calibration ``batches``:

    1. clean per-token losses over all batches; hard tokens above ``quantile(l, hard_quantile)``,
       easy ones below ``quantile(l, easy_quantile)``;
    2. :func:`layer_sensitivity` (``delta``) -> ``ratio (L,)``;
    3. :func:`expert_impact` -> ``impact (L, E)`` and its per-layer min-max normalisation, the prior;
    4. ``k = allocate_layer_budget(ratio, total_k, k_min=1, k_max=each layer's selectable
       experts)`` (E, or the kept groups' experts under a group limit).

    ``settings``: keywords of :class:`CalibrationSettings` (its fields, with their defaults).
    ``total_k`` defaults to the model's current total (the sum of each layer's k), so the
    activation budget is unchanged. The clean forward is shared by steps 2 and 3; the costs are
    theirs (see their docs). The plan's ``calibration`` holds the settings, token
    counts, base k and the hard / easy sensitivities. Refuses a model with a CoR plan applied
    (revert first).
    """
    plan, _ = calibrate_with_sensitivity(model, batches, token_losses, CalibrationSettings.of("calibrate", settings))
    return plan


def calibrate_with_sensitivity(
    model: nn.Module, batches, token_losses: Callable, settings: CalibrationSettings
) -> tuple[CoRPlan, LayerSensitivity]:
    """:func:`calibrate` with its ``settings``, also returning the :class:`LayerSensitivity` it computed."""
    op = "calibrate"
    if not is_finite_number(settings.strength):
        raise ValueError(f"{op}: strength must be a finite number, got {settings.strength!r}")
    quantiles = (settings.hard_quantile, settings.easy_quantile)
    check_quantiles(op, *quantiles)
    check_delta(op, settings.delta)
    check_tokens_per_forward(op, settings.tokens_per_forward)
    batches = as_batch_list(batches, op)
    layers = find_moe_layers(model, op)
    if is_counterfactual_routing_applied(model):
        raise ValueError(f"{op}: the model has a CoR plan applied; call revert_counterfactual_routing(model) first")
    num_experts = uniform_num_experts(layers, op)
    base_k = [layer.k for layer in layers]
    limits = [layer.eligible_experts for layer in layers]
    total_k = settings.total_k
    if total_k is None:
        total_k = sum(base_k)
    elif not is_int(total_k) or not len(layers) <= total_k <= sum(limits):
        raise ValueError(
            f"{op}: total_k must be an int in [L, sum of selectable experts] = [{len(layers)}, {sum(limits)}], "
            f"got {total_k!r}"
        )
    forwards = (settings.tokens_per_forward, settings.progress)
    run = calibration_run(op, model, layers, batches, token_losses, quantiles, *forwards)
    sensitivity = sensitivity_from_clean(run, settings.delta)
    impact = impact_from_clean(run, num_experts)
    k = allocate_layer_budget(sensitivity.ratio, total_k, k_min=1, k_max=limits)
    calibration = {
        "hard_quantile": settings.hard_quantile,
        "easy_quantile": settings.easy_quantile,
        "delta": settings.delta,
        "tokens": int(run.clean.all_losses().isfinite().sum()),
        "hard_tokens": int(run.hard.sum()),
        "easy_tokens": int(run.easy.sum()),
        "base_k": base_k,
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
