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
  - the experts (``experts``): ``fused_experts`` on the module's own Parameters (no copy: GPT-OSS's
    transposed ``(E, H, 2I)`` / ``(E, I, H)`` are passed as transposed views), routing weights
    cast to float32.

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

import importlib
import types
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from moe_kernels.config import GPT_OSS_ALPHA, GPT_OSS_LIMIT, RoutingConfig
from moe_kernels.integrations.transformers import experts, routers  # noqa: F401 (the two halves, as submodules)
from moe_kernels.integrations.transformers._common import (
    _BACKEND,
    _ROUTING,
    _SAVED,
    EXPERTS_IMPLEMENTATION,
    MIN_TRANSFORMERS_VERSION,
    _layout_message,
    _require_transformers,
)
from moe_kernels.integrations.transformers.experts import (
    _experts_activation,
    moe_kernels_experts_forward,
    register_experts_implementation,
)
from moe_kernels.integrations.transformers.routers import (
    _deepseek_v3_router_forward,
    _deepseek_v3_routing,
    _gpt_oss_router_forward,
    _mixtral_router_forward,
    _renormalized_routing,
    _softmax_router_forward,
    _softmax_routing,
    routing_config,
)
from moe_kernels.utils import BACKENDS

__all__ = [
    "EXPERTS_IMPLEMENTATION",
    "MIN_TRANSFORMERS_VERSION",
    "MODEL_TYPE_TO_APPLY_FN",
    "SUPPORTED_MODEL_TYPES",
    "apply_moe_kernels",
    "is_moe_kernels_applied",
    "moe_kernels_experts_forward",
    "register_experts_implementation",
    "revert_moe_kernels",
    "routing_config",
]


def _bind(module: nn.Module, function: Callable, backend: str, routing: RoutingConfig | None = None) -> None:
    # accelerate's hooks (device_map) wrap ``forward`` and call ``_old_forward``: patch inside them.
    attr = "_old_forward" if "_old_forward" in module.__dict__ else "forward"
    module.__dict__[_SAVED] = (attr, module.__dict__.get(attr))
    module.__dict__[_BACKEND] = backend
    if routing is not None:
        module.__dict__[_ROUTING] = routing
    setattr(module, attr, types.MethodType(function, module))


_ROUTER_ATTRS = ("top_k", "weight")


class _Family(NamedTuple):
    """Where a model family's MoE blocks are and how their routers are patched."""

    block: str  # the MoE block class, in transformers.models.<model_type>.modeling_<model_type>
    router_attr: str  # the block's router attribute
    router_forward: Callable  # the router's patched forward
    routing: Callable  # router -> the family's RoutingConfig, read from the model's config
    router_attrs: tuple[str, ...] = ("hidden_dim",)  # what that forward reads besides _ROUTER_ATTRS


_SOFTMAX_ATTRS = ("hidden_dim", "norm_topk_prob")
_DEEPSEEK_ATTRS = ("hidden_dim", "e_score_correction_bias", "num_group", "topk_group", "norm_topk_prob")
_DEEPSEEK_ATTRS += ("routed_scaling_factor",)
_FAMILIES = {
    "mixtral": _Family("MixtralSparseMoeBlock", "gate", _mixtral_router_forward, _renormalized_routing),
    "qwen2_moe": _Family("Qwen2MoeSparseMoeBlock", "gate", _softmax_router_forward, _softmax_routing, _SOFTMAX_ATTRS),
    "qwen3_moe": _Family("Qwen3MoeSparseMoeBlock", "gate", _softmax_router_forward, _softmax_routing, _SOFTMAX_ATTRS),
    "olmoe": _Family("OlmoeSparseMoeBlock", "gate", _softmax_router_forward, _softmax_routing, _SOFTMAX_ATTRS),
    "deepseek_v3": _Family("DeepseekV3MoE", "gate", _deepseek_v3_router_forward, _deepseek_v3_routing, _DEEPSEEK_ATTRS),
    "gpt_oss": _Family("GptOssMLP", "router", _gpt_oss_router_forward, _renormalized_routing, ("bias",)),
}


def _patch_blocks(model, backend: str, routing: RoutingConfig | None, model_type: str) -> int:
    """Patch the router and the experts of every MoE block of ``model_type``'s family in ``model``
    (all validated before any is patched); returns how many blocks."""
    family = _FAMILIES[model_type]
    block = family.block
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    block_class = getattr(module, block)
    blocks = [m for m in model.modules() if isinstance(m, block_class)]
    if not blocks:
        raise ValueError(
            f"apply_moe_kernels: no {block} found in this {model.config.model_type} model (built with "
            "trust_remote_code, or without MoE layers?); only transformers' own modeling classes are patched"
        )
    patches = []
    for moe in blocks:  # validate every block before patching any
        block_experts, router = getattr(moe, "experts", None), getattr(moe, family.router_attr, None)
        if block_experts is None or not isinstance(getattr(block_experts, "gate_up_proj", None), torch.Tensor):
            raise ImportError(_layout_message(f"{block}.experts is {type(block_experts).__name__}"))
        missing = [a for a in _ROUTER_ATTRS + family.router_attrs if not hasattr(router, a)]
        if missing:
            where = f"{block}.{family.router_attr} ({type(router).__name__})"
            raise ImportError(_layout_message(f"{where} has no {missing}"))
        if _experts_activation(block_experts) is None:
            raise ValueError(
                f"apply_moe_kernels: {type(block_experts).__name__} cannot be computed by fused_experts (activation "
                f"{type(getattr(block_experts, 'act_fn', None)).__name__}, GPT-OSS limit/alpha other than "
                f"{GPT_OSS_LIMIT}/{GPT_OSS_ALPHA}, or a custom gate); supported: silu, gelu, gelu_tanh, gpt_oss"
            )
        router_routing = routing or family.routing(router)
        router_routing.check(router.weight.shape[0], int(router.top_k), "apply_moe_kernels")
        patches += [(router, family.router_forward, router_routing), (block_experts, moe_kernels_experts_forward, None)]
    for target, function, target_routing in patches:
        _bind(target, function, backend, target_routing)
    return len(blocks)


def _family_patcher(model_type: str) -> Callable[..., int]:
    """``patch_<model_type>(model, *, backend="auto", routing=None) -> int``."""

    def patch(model, *, backend: str = "auto", routing: RoutingConfig | None = None) -> int:
        return _patch_blocks(model, backend, routing, model_type)

    patch.__name__ = patch.__qualname__ = f"patch_{model_type}"
    patch.__doc__ = f"Patch every ``{_FAMILIES[model_type].block}`` of ``model``; returns how many."
    return patch


MODEL_TYPE_TO_APPLY_FN: dict[str, Callable[..., int]] = {name: _family_patcher(name) for name in _FAMILIES}
SUPPORTED_MODEL_TYPES = tuple(MODEL_TYPE_TO_APPLY_FN)
patch_mixtral, patch_qwen2_moe, patch_qwen3_moe, patch_olmoe, patch_deepseek_v3, patch_gpt_oss = (
    MODEL_TYPE_TO_APPLY_FN.values()
)


def apply_moe_kernels(model: nn.Module, *, backend: str = "auto", routing: RoutingConfig | None = None) -> nn.Module:
    """Patch a loaded HF transformers (>= 5.13) MoE model in place to route with
    :func:`moe_kernels.softmax_topk` and compute its experts with :func:`moe_kernels.fused_experts`
    (``backend`` as for every op: ``"auto"``, ``"triton"`` or ``"torch"``). Mutates the routers' and
    experts' ``forward`` instance attributes only; parameters are shared, not copied. Returns
    ``model``.

    ``routing``: None routes each family with its own formula (the table in the module doc, read
    from the model's config); a :class:`~moe_kernels.RoutingConfig` routes every patched router
    with it instead (a selection bias the family has, DeepSeek-V3's, still applies).
    :func:`routing_config` tells a patched router's routing.

    Raises ``ValueError`` for a ``model.config.model_type`` not in :data:`SUPPORTED_MODEL_TYPES`,
    a model without the expected MoE blocks, or experts the op cannot compute; ``ImportError``
    when transformers is missing or older than :data:`MIN_TRANSFORMERS_VERSION` (or its blocks are
    laid out otherwise).
    """
    if backend not in BACKENDS:
        raise ValueError(f"apply_moe_kernels: backend must be one of {BACKENDS}, got {backend!r}")
    if routing is not None and not isinstance(routing, RoutingConfig):
        raise TypeError(
            f"apply_moe_kernels: routing must be a moe_kernels.RoutingConfig or None, got {type(routing).__name__}"
        )
    _require_transformers()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    apply_fn = MODEL_TYPE_TO_APPLY_FN.get(model_type)
    if apply_fn is None:
        raise ValueError(
            f"apply_moe_kernels: model_type {model_type!r} is not supported; supported model types: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    revert_moe_kernels(model)
    apply_fn(model, backend=backend, routing=routing)
    return model


def revert_moe_kernels(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_moe_kernels` in place (a no-op on an unpatched model); returns ``model``."""
    for module in model.modules():
        saved = module.__dict__.pop(_SAVED, None)
        if saved is None:
            continue
        module.__dict__.pop(_BACKEND, None)
        module.__dict__.pop(_ROUTING, None)
        attr, previous = saved
        if previous is None:
            module.__dict__.pop(attr, None)
        else:
            module.__dict__[attr] = previous
    return model


def is_moe_kernels_applied(model: nn.Module) -> bool:
    """Whether :func:`apply_moe_kernels` patched ``model`` (and it was not reverted since)."""
    return any(_SAVED in module.__dict__ for module in model.modules())
