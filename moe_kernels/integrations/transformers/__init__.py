"""Hugging Face transformers (>= 5.13) integration: route with :func:`moe_kernels.softmax_topk` and run
the experts with :func:`moe_kernels.fused_experts` inside a loaded HF model (extra ``[hf]``).

Importing this module imports neither transformers nor anything of it, and patches nothing:

- :func:`apply_moe_kernels` ``(model, *, backend="auto", routing=None) -> model`` patches a loaded model in
  place, dispatching on ``model.config.model_type`` (:data:`MODEL_TYPE_TO_APPLY_FN`). In every
  MoE block it replaces the ``forward`` of two submodules, on the instance (a bound method; the
  classes are untouched, so other models in the process keep HF's code):

  - the router (``gate`` / ``router``): the HF linear gate (same logits, returned first as the
    ``router_logits`` that ``output_router_logits`` records), then ``softmax_topk`` with the
    model's formula below; it returns what HF's router returns: ``(router_logits, weights,
    ids int64)``, the weights in HF's dtype;
  - the experts (``experts``): ``fused_experts`` on the module's own Parameters (GPT-OSS's
    transposed ``(E, H, 2I)`` / ``(E, I, H)`` as transposed views), routing weights cast to
    float32. On the CPU, weights that would reach it as strided views are re-laid once, in place
    (the pre-pack: same shapes and values, strides only; oneDNN's bfloat16 GEMMs reorder a
    strided operand on every call, 2-2.5x slower at decode), and :func:`revert_moe_kernels`
    makes them contiguous again. ``experts_implementation="moe_kernels"`` (below) patches
    nothing, so weights stay as loaded there.

  The blocks' own forwards stay HF's: the Qwen2-MoE shared expert and its sigmoid gate, the
  DeepSeek-V3 shared experts, Mixtral's training-time jitter, GPT-OSS's ``(hidden, router_scores)``
  return. Applying again replaces the previous patch (e.g. to change ``backend``).
- :func:`routing_config` ``(router) -> RoutingConfig``: what a patched router routes with.
- :func:`revert_moe_kernels` ``(model) -> model`` restores the original forwards exactly (the
  instance attributes are removed, so ``module.forward`` is the class's again).
- :func:`register_experts_implementation` registers the fused experts in transformers'
  ``ExpertsInterface`` as ``"moe_kernels"``, so that ``from_pretrained(...,
  experts_implementation="moe_kernels")`` or ``model.set_experts_implementation("moe_kernels")``
  runs them (the routers stay HF's: the interface covers only the experts). Experts this op
  cannot compute (no gate, a post-expert norm, another activation) fall back to HF's
  ``grouped_mm`` there, with a warning.

Routing per family, as transformers 5.23 writes it (``k = num_experts_per_tok``):

===========  ======================================================  ===========================================
model_type   HF router                                               ``softmax_topk`` call
===========  ======================================================  ===========================================
mixtral      softmax(fp32) -> top-k -> ``/= sum``; fp32 weights      ``renormalize=True``
qwen2_moe    softmax(fp32) -> top-k -> ``/= sum`` if                 ``renormalize=norm_topk_prob``, weights cast
qwen3_moe    ``norm_topk_prob`` -> cast to the logits' dtype         to the logits' dtype as HF does
olmoe
deepseek_v3  fp32 logits -> sigmoid; key = s + e_score_correction_   ``score_func="sigmoid", bias=b, num_groups=
             bias; groups by top-2 key sum, keep ``topk_group`` of   n_group, topk_groups=topk_group,
             ``n_group`` (the others masked with -inf); top-k keys;  renormalize=norm_topk_prob,
             weights = unbiased s, ``/ (sum + 1e-20)`` if            scale=routed_scaling_factor``;
             ``norm_topk_prob``, ``* routed_scaling_factor``         fp32 weights
gpt_oss      logits = linear + router bias; top-k on the logits;     ``renormalize=True`` (the same function:
             softmax over the k values in the logits' dtype          renormalised top-k of the full softmax),
                                                                     weights cast to the logits' dtype
===========  ======================================================  ===========================================

Experts: ``silu`` for the five SwiGLU families; GPT-OSS is ``activation="gpt_oss"`` (interleaved
gate/up columns of its ``(E, H, 2I)`` ``gate_up_proj``, gate clamped above at ``swiglu_limit``,
up to ``[-limit, limit]``, ``(up + 1) * gate * sigmoid(swiglu_alpha * gate)``, both biases),
which the op implements for ``swiglu_limit = 7.0`` and ``swiglu_alpha = 1.702`` only (other
values are refused).

DeepSeek-V3 group masking: transformers 5.0 filled dropped groups with 0.0 (as DeepSeek's first
reference code), so with a negative correction bias it could pick an expert of a dropped group;
since 5.12 it fills -inf, which is what ``softmax_topk`` does, so the two agree (tested with all
keys negative). Ties: ``softmax_topk`` puts the lower expert id first, ``torch.topk`` promises
no order; equal keys are practically absent in float32 but common in bf16 router logits (8-bit
mantissa), where the patched model and HF can then pick different experts of equal score.

Numerics: in float32 the patched model matches HF's to float32 rounding (the k-way combine and
the GEMMs sum in another order; ``tests/test_hf_integration.py`` has the measured differences).
In 16-bit, HF rounds each slot's weighted expert output to the activations' dtype before its
``index_add_``; ``fused_experts`` keeps the combine in float32 and rounds once, so the patched
blocks are as close to float64 as HF's or closer; where HF rounds the routing weights to the
logits' dtype (Qwen, OLMoE, GPT-OSS) the patched router does the same, so both use the same
weights.

Not covered: models built with ``trust_remote_code`` (other module classes: no block is found and
:func:`apply_moe_kernels` raises), composite (vision-language) MoE models (other
``model_type``); expert-parallel and quantized experts are untested (EP sentinel ids, ``>= E``,
become empty slots).
"""

from __future__ import annotations

from moe_kernels.integrations.transformers import experts, families, routers
from moe_kernels.integrations.transformers.common import EXPERTS_IMPLEMENTATION, MIN_TRANSFORMERS_VERSION
from moe_kernels.integrations.transformers.experts import moe_kernels_experts_forward, register_experts_implementation
from moe_kernels.integrations.transformers.families import FAMILIES, Family
from moe_kernels.integrations.transformers.patch import (
    MODEL_TYPE_TO_APPLY_FN,
    SUPPORTED_MODEL_TYPES,
    apply_moe_kernels,
    is_moe_kernels_applied,
    revert_moe_kernels,
)
from moe_kernels.integrations.transformers.routers import routing_config

__all__ = [
    "EXPERTS_IMPLEMENTATION",
    "FAMILIES",
    "MIN_TRANSFORMERS_VERSION",
    "MODEL_TYPE_TO_APPLY_FN",
    "SUPPORTED_MODEL_TYPES",
    "Family",
    "apply_moe_kernels",
    "experts",
    "families",
    "is_moe_kernels_applied",
    "moe_kernels_experts_forward",
    "register_experts_implementation",
    "revert_moe_kernels",
    "routers",
    "routing_config",
]
