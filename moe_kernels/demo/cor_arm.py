"""Counterfactual Routing in a seed's run, placebo-controlled.

CoR is calibrated on the seed's calibration draw, then evaluated on every held-out prose position
against static top-k, as are its two halves (the layer budget alone, the prior alone) and
``placebos`` placebo plans: the plan's own budget with its prior's values shuffled across experts
within each layer (the same values, the same strength, experts chosen at random). The primary
tokens are not selected by their own static loss (selecting them so would favour any change, by
regression to the mean): all tokens, and those whose static predictive entropy (which does not
see the target) is above the protocol's quantile. The tokens above the static loss's 0.7
quantile are reported too, as the old, biased comparison.
"""

from __future__ import annotations

import torch

from moe_kernels import cor
from moe_kernels.demo.data import random_batches
from moe_kernels.demo.model import CharMoELM, token_losses
from moe_kernels.demo.protocol import ENTROPY_QUANTILE, Protocol


def shuffled_prior(prior: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``prior (L, E)`` with each layer's values permuted across experts (a placebo: the same
    values, at random experts)."""
    order = torch.stack([torch.randperm(prior.shape[1], generator=generator) for _ in range(prior.shape[0])])
    return torch.gather(prior, 1, order)


def _losses(model: CharMoELM, batches, plan: cor.CoRPlan | None) -> torch.Tensor:
    cor.revert_counterfactual_routing(model)
    if plan is not None:
        cor.apply_counterfactual_routing(model, plan)
    try:
        return torch.cat([token_losses(model, batch) for batch in batches]).double().cpu()
    finally:
        cor.revert_counterfactual_routing(model)


def predictive_entropy(model: CharMoELM, batches) -> torch.Tensor:
    """``(N,)`` float64 entropy (on the CPU) of the model's next-character distribution at every
    position."""
    with torch.no_grad():
        parts = [torch.distributions.Categorical(logits=model(context).double()).entropy() for context, _ in batches]
    return torch.cat(parts).cpu()


def cor_arm(model: CharMoELM, prose, held_out: list, static: torch.Tensor, protocol: Protocol, seed: int) -> dict:
    """The seed's CoR numbers: ``budget`` (per layer, CoR and static), ``budget_moved``, and for
    ``cor``, ``layer_only``, ``prior_only`` and every placebo the mean paired change against static
    top-k on ``all`` / ``entropy`` / ``hard_by_loss`` tokens (``placebos``: lists, for the two
    subsets).
    ``static (N,)``: the static per-token held-out losses."""
    size = model.size
    device = next(model.parameters()).device
    calibration = random_batches(prose, size.context, size.batch, protocol.cor_calibration_batches, seed * 1000 + 4)
    calibration = [tuple(t.to(device) for t in batch) for batch in calibration]
    settings = cor.CalibrationSettings(strength=protocol.cor_strength)
    plan = cor.calibrate(model, calibration, token_losses, settings)
    base_k = torch.tensor([block.router.k for block in model.blocks], dtype=torch.int64)
    entropy = predictive_entropy(model, held_out)
    subsets = {
        "all": torch.ones_like(static, dtype=torch.bool),
        "entropy": entropy > torch.quantile(entropy.float(), ENTROPY_QUANTILE).double(),
        "hard_by_loss": static > torch.quantile(static.float(), 0.7).double(),
    }

    def changes(plan_: cor.CoRPlan, batches=held_out, rows=None) -> dict:
        change = _losses(model, batches, plan_) - (static if rows is None else static[rows])
        chosen = subsets if rows is None else {name: mask[rows] for name, mask in subsets.items() if name != "all"}
        return {name: float(change[mask].mean()) for name, mask in chosen.items()}

    zero = torch.zeros_like(plan.prior)
    result = {
        "budget": [int(k) for k in plan.k],
        "budget_static": base_k.tolist(),
        "budget_moved": bool((plan.k != base_k).any()),
        "ratio": [float(x) for x in plan.ratio] if plan.ratio is not None else None,
        "cor": changes(plan),
        "layer_only": changes(cor.CoRPlan(plan.k, zero, 0.0)),
        "prior_only": changes(cor.CoRPlan(base_k, plan.prior, plan.strength)),
    }
    # The placebos run on the positions of the two subsets only (each window is scored alone).
    rows = (subsets["entropy"] | subsets["hard_by_loss"]).nonzero().squeeze(1)
    contexts, targets = (torch.cat(parts) for parts in zip(*held_out))
    picked = rows.to(contexts.device)
    subset_batches = [
        (contexts[picked[i : i + len(held_out[0][0])]], targets[picked[i : i + len(held_out[0][0])]])
        for i in range(0, picked.numel(), len(held_out[0][0]))
    ]
    generator = torch.Generator().manual_seed(seed * 1000 + 5)
    placebos = [
        changes(cor.CoRPlan(plan.k, shuffled_prior(plan.prior, generator), plan.strength), subset_batches, rows)
        for _ in range(protocol.placebos)
    ]
    result["placebos"] = {name: [p[name] for p in placebos] for name in placebos[0]}
    result["subset_tokens"] = {name: int(mask.sum()) for name, mask in subsets.items()}
    return result
