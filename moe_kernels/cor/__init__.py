"""Counterfactual Routing (CoR): a training-free re-routing of a trained MoE at an unchanged total
number of activated experts.

Offline, on a few calibration batches (:func:`calibrate`):

1. tokens are split by their clean loss into *hard* (above ``quantile(l, 0.7)``) and *easy*
   (below ``quantile(l, 0.3)``);
2. :func:`layer_sensitivity`: scaling a layer's output by ``1 - delta`` hurts hard tokens more in
   knowledge-heavy layers; ``ratio = hard / easy`` per layer;
3. :func:`expert_impact`: the loss increase of a hard token when one expert it selected at one
   layer is removed from its routing alone (batched what-ifs), averaged per (layer, expert);
4. :func:`allocate_layer_budget`: ``k_l`` in proportion to the ratio, summing to the model's total.

Online (:func:`apply_counterfactual_routing`): layer ``l`` selects ``k_l`` experts by ``scores +
bias + strength * prior[l]`` (``prior`` the per-layer min-max normalised impact) in the router's
own ``softmax_topk`` call, weights the model's own; :func:`revert_counterfactual_routing` undoes it.
:func:`evaluate_counterfactual_routing` runs it all and compares with static top-k.

**MoE layers** of a model: every :class:`moe_kernels.MoE` block in ``model.modules()`` order, and
every MoE block of a Hugging Face model patched by
:func:`moe_kernels.integrations.transformers.apply_moe_kernels`. **Batches**: a tensor or a
(nested) dict / list / tuple of tensors whose leading dimension is the sequences (those tensors
are indexed to replicate sequences); the MoE blocks see its ``B * S`` rows batch-major.
**token_losses(model, batch) -> (N,)**: per-token losses, a fixed number per sequence,
sequence-major, NaN for tokens without a loss; :func:`expert_impact` needs one per routed row
(:func:`causal_lm_token_losses` is that for causal LMs).
"""

from moe_kernels.cor._layers import MoELayer, find_moe_layers, is_counterfactual_routing_applied
from moe_kernels.cor.budget import allocate_layer_budget
from moe_kernels.cor.calibrate import calibrate
from moe_kernels.cor.evaluate import CoRResult, evaluate_counterfactual_routing, plot_impact_heatmap
from moe_kernels.cor.impact import ablate_weights, expert_impact
from moe_kernels.cor.losses import causal_lm_token_losses
from moe_kernels.cor.plan import CoRPlan, min_max_normalize
from moe_kernels.cor.routing import apply_counterfactual_routing, revert_counterfactual_routing
from moe_kernels.cor.sensitivity import LayerSensitivity, layer_sensitivity
from moe_kernels.cor.settings import CalibrationSettings
from moe_kernels.cor.toy_lm import TinyMoELM

__all__ = [
    "CalibrationSettings",
    "CoRPlan",
    "CoRResult",
    "LayerSensitivity",
    "MoELayer",
    "TinyMoELM",
    "ablate_weights",
    "allocate_layer_budget",
    "apply_counterfactual_routing",
    "calibrate",
    "causal_lm_token_losses",
    "evaluate_counterfactual_routing",
    "expert_impact",
    "find_moe_layers",
    "is_counterfactual_routing_applied",
    "layer_sensitivity",
    "min_max_normalize",
    "plot_impact_heatmap",
    "revert_counterfactual_routing",
]
