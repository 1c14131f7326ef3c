"""Hugging Face transformers (>= 5.13) integration: route with :func:`moe_kernels.softmax_topk` and run
the experts with :func:`moe_kernels.fused_experts` inside a loaded HF model (extra ``[hf]``).

Importing this module imports neither transformers nor anything of it, and patches nothing:

- :func:`apply_moe_kernels` ``(model, *, backend="auto") -> model`` patches a loaded model in
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
import re
import types
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moe_kernels.functional import fused_experts, softmax_topk
from moe_kernels.reference.experts import GPT_OSS_ALPHA, GPT_OSS_LIMIT
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
]

# 5.13 is the first release whose six supported families all have fused experts and a router
# module that computes the routing (5.0-5.12: DeepSeek-V3 routes in its MoE block, and 5.0 masks
# dropped groups with 0.0 where 5.12 uses -inf); the routers and experts of 5.13 match 5.23's
# up to expert-parallel plumbing (checked by diffing the classes of 5.0, 5.12, 5.13, 5.15, 5.18;
# tests/test_hf_integration.py passes under 5.13.0 too).
MIN_TRANSFORMERS_VERSION = "5.13"
EXPERTS_IMPLEMENTATION = "moe_kernels"

# Per patched module, in its __dict__: which attribute was replaced and what it held before
# (None: nothing, the class's forward showed through), and the backend its forward runs.
_SAVED = "_moe_kernels_saved_forward"
_BACKEND = "_moe_kernels_backend"
_warned_fallback: set[str] = set()


# ---------------------------------------------------------------------------------------------
# transformers version


def _require_transformers():
    """Import transformers, or raise an ImportError naming the version needed."""
    need = f"transformers>={MIN_TRANSFORMERS_VERSION}"
    try:
        import transformers
    except ImportError as error:
        raise ImportError(
            f"moe_kernels.integrations.transformers needs {need}: pip install 'moe-kernels[hf]'"
        ) from error
    version = getattr(transformers, "__version__", "0")
    match = re.match(r"(\d+)\.(\d+)", version)
    found = tuple(int(part) for part in match.groups()) if match else (0, 0)
    if found < tuple(int(part) for part in MIN_TRANSFORMERS_VERSION.split(".")):
        raise ImportError(_layout_message(f"found transformers {version}"))
    return transformers


def _layout_message(found: str) -> str:
    return (
        f"moe_kernels.integrations.transformers needs transformers>={MIN_TRANSFORMERS_VERSION}, whose MoE experts "
        f"are fused modules (gate_up_proj (E, 2I, H) / down_proj (E, H, I) parameters) routed by a router module "
        f"(DeepSeek-V3's DeepseekV3TopkRouter computes the routing since 5.13); {found}. "
        f"Upgrade with: pip install 'transformers>={MIN_TRANSFORMERS_VERSION}'"
    )


# ---------------------------------------------------------------------------------------------
# experts


def _activation_name(act_fn) -> str | None:
    """The ``fused_experts`` activation computing ``act_fn(gate) * up``, or None."""
    from transformers import activations as hf_act

    silu = tuple(c for c in (getattr(hf_act, "SiLUActivation", None), nn.SiLU) if c is not None)
    tanh = tuple(c for c in (getattr(hf_act, "GELUTanh", None), getattr(hf_act, "NewGELUActivation", None)) if c)
    if isinstance(act_fn, silu):
        return "silu"
    if tanh and isinstance(act_fn, tanh):
        return "gelu_tanh"
    if isinstance(act_fn, nn.GELU):
        return "gelu_tanh" if act_fn.approximate == "tanh" else "gelu"
    gelu = getattr(hf_act, "GELUActivation", None)
    if gelu is not None and type(act_fn) is gelu:  # erf GELU (torch's or the Python formula)
        return "gelu"
    return None


def _gpt_oss_apply_gate():
    try:
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    except ImportError:
        return None
    return GptOssExperts.__dict__.get("_apply_gate")


def _experts_activation(experts: nn.Module) -> str | None:
    """The ``fused_experts`` activation of an HF v5 experts module, or None when the op cannot
    compute it (no gate, a post-expert norm, an unknown activation or custom ``_apply_gate``,
    GPT-OSS with another clamp limit or alpha, or not the fused 3D layout)."""
    for name in ("gate_up_proj", "down_proj"):
        weight = getattr(experts, name, None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 3:
            return None
    if not getattr(experts, "has_gate", True) or getattr(experts, "has_post_expert_norm", False):
        return None
    apply_gate = getattr(type(experts), "_apply_gate", None)
    if getattr(experts, "is_concatenated", True):  # gate rows then up rows: act_fn(gate) * up
        from transformers.integrations import moe as hf_moe

        if apply_gate is not None and apply_gate is not getattr(hf_moe, "_default_apply_gate", None):
            return None
        return _activation_name(getattr(experts, "act_fn", None))
    gpt_oss_gate = _gpt_oss_apply_gate()  # interleaved gate/up: GPT-OSS's clamped SwiGLU
    if (
        gpt_oss_gate is not None
        and apply_gate is gpt_oss_gate
        and float(getattr(experts, "limit", float("nan"))) == GPT_OSS_LIMIT
        and float(getattr(experts, "alpha", float("nan"))) == GPT_OSS_ALPHA
    ):
        return "gpt_oss"
    return None


def _run_fused_experts(experts, hidden_states, top_k_index, top_k_weights, activation, backend):
    gate_up_proj, down_proj = experts.gate_up_proj, experts.down_proj
    if getattr(experts, "is_transposed", False):  # GPT-OSS: (E, H, 2I) / (E, I, H); views, no copy
        gate_up_proj, down_proj = gate_up_proj.transpose(1, 2), down_proj.transpose(1, 2)
    gate_up_bias = down_bias = None
    if getattr(experts, "has_bias", False):
        gate_up_bias, down_bias = experts.gate_up_proj_bias, experts.down_proj_bias
    ids = top_k_index
    if getattr(experts, "_is_expert_parallel", False):  # ids >= E are EP sentinels: empty slots
        ids = torch.where(ids >= gate_up_proj.shape[0], torch.full_like(ids, -1), ids)
    weights = top_k_weights
    if weights.shape != ids.shape:  # dense (T, E) scores
        weights = weights.gather(-1, ids.clamp_min(0).long())
    dtype = gate_up_proj.dtype
    weights = weights.to(torch.float64 if dtype == torch.float64 else torch.float32)
    out = fused_experts(
        hidden_states.to(dtype),  # HF's grouped_mm path casts to the weights' dtype too (autocast)
        gate_up_proj,
        down_proj,
        weights,
        ids,
        activation=activation,
        gate_up_bias=gate_up_bias,
        down_bias=down_bias,
        backend=backend,
    )
    return out.to(hidden_states.dtype)


def moe_kernels_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """``ExpertsInterface`` function (and the patched experts' forward): ``hidden_states (T, H)``,
    ``top_k_index (T, k)`` int, ``top_k_weights (T, k)`` (or dense ``(T, E)``) -> ``(T, H)`` in
    hidden's dtype, by :func:`moe_kernels.fused_experts` on the module's own parameters. The
    backend is the one :func:`apply_moe_kernels` set, else ``"auto"``. Experts it cannot compute
    run HF's ``grouped_mm`` implementation instead (one warning per class)."""
    activation = _experts_activation(self)
    if activation is None:
        name = type(self).__name__
        if name not in _warned_fallback:
            _warned_fallback.add(name)
            warnings.warn(
                f"moe_kernels: {name} is not computable by fused_experts (no gate, post-expert norm, or "
                "an unsupported activation); running transformers' grouped_mm experts instead",
                stacklevel=2,
            )
        from transformers.integrations.moe import grouped_mm_experts_forward

        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    backend = self.__dict__.get(_BACKEND, "auto")
    return _run_fused_experts(self, hidden_states, top_k_index, top_k_weights, activation, backend)


def register_experts_implementation(name: str = EXPERTS_IMPLEMENTATION) -> str:
    """Register :func:`moe_kernels_experts_forward` in transformers' ``ExpertsInterface`` under
    ``name`` (idempotent; global to the process, as every ``ExpertsInterface.register``), so that
    ``experts_implementation=name`` is accepted by ``from_pretrained`` / ``from_config`` /
    ``set_experts_implementation``. Returns ``name``."""
    _require_transformers()
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError as error:
        raise ImportError(_layout_message("this transformers has no ExpertsInterface")) from error
    ExpertsInterface.register(name, moe_kernels_experts_forward)
    return name


# ---------------------------------------------------------------------------------------------
# routers: each returns what the HF router returns, (router_logits, weights, ids int64)


def _route(router, logits, **routing):
    return softmax_topk(logits, router.top_k, backend=router.__dict__.get(_BACKEND, "auto"), **routing)


def _mixtral_router_forward(self, hidden_states):
    """Mixtral: softmax in float32, top-k, renormalised; float32 weights (HF keeps them so)."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states, self.weight)
    weights, ids = _route(self, router_logits, renormalize=True)
    return router_logits, weights, ids.long()


def _softmax_router_forward(self, hidden_states):
    """Qwen2-MoE, Qwen3-MoE, OLMoE: softmax in float32, top-k, renormalised if
    ``norm_topk_prob``; weights cast to the logits' dtype, as HF does."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states, self.weight)
    weights, ids = _route(self, router_logits, renormalize=bool(self.norm_topk_prob))
    return router_logits, weights.to(router_logits.dtype), ids.long()


def _deepseek_v3_groups(router) -> dict:
    num_groups, topk_groups = router.num_group, router.topk_group
    if not num_groups or num_groups <= 1 or topk_groups is None or topk_groups >= num_groups:
        return {}  # every group kept: no masking
    return {"num_groups": int(num_groups), "topk_groups": int(topk_groups)}


def _deepseek_v3_router_forward(self, hidden_states):
    """DeepSeek-V3 (noaux_tc): float32 logits, sigmoid, selection-only correction bias, group
    top-2-sum masking, top-k, optional renormalisation (+1e-20), routed scaling; float32 weights."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))
    weights, ids = _route(
        self,
        router_logits,
        score_func="sigmoid",
        bias=self.e_score_correction_bias.float(),
        renormalize=bool(self.norm_topk_prob),
        scale=float(self.routed_scaling_factor),
        **_deepseek_v3_groups(self),
    )
    return router_logits, weights, ids.long()


def _gpt_oss_router_forward(self, hidden_states):
    """GPT-OSS: logits with the router bias, top-k on the logits, softmax over the k values (=
    the renormalised full softmax); weights cast to the logits' dtype, as HF's softmax has them."""
    router_logits = F.linear(hidden_states, self.weight, self.bias)
    weights, ids = _route(self, router_logits, renormalize=True)
    return router_logits, weights.to(router_logits.dtype), ids.long()


# ---------------------------------------------------------------------------------------------
# patching


def _bind(module: nn.Module, function: Callable, backend: str) -> None:
    # accelerate's hooks (device_map) wrap ``forward`` and call ``_old_forward``: patch inside them.
    attr = "_old_forward" if "_old_forward" in module.__dict__ else "forward"
    module.__dict__[_SAVED] = (attr, module.__dict__.get(attr))
    module.__dict__[_BACKEND] = backend
    setattr(module, attr, types.MethodType(function, module))


_ROUTER_ATTRS = ("top_k", "weight")


def _patch_blocks(
    model, backend, *, modeling: str, block: str, router_attr: str, router_forward, router_attrs=("hidden_dim",)
) -> int:
    module = importlib.import_module(f"transformers.models.{modeling}")
    block_class = getattr(module, block)
    blocks = [m for m in model.modules() if isinstance(m, block_class)]
    if not blocks:
        raise ValueError(
            f"apply_moe_kernels: no {block} found in this {model.config.model_type} model (built with "
            "trust_remote_code, or without MoE layers?); only transformers' own modeling classes are patched"
        )
    patches = []
    for moe in blocks:  # validate every block before patching any
        experts, router = getattr(moe, "experts", None), getattr(moe, router_attr, None)
        if experts is None or not isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor):
            raise ImportError(_layout_message(f"{block}.experts is {type(experts).__name__}"))
        missing = [a for a in _ROUTER_ATTRS + tuple(router_attrs) if not hasattr(router, a)]
        if missing:
            raise ImportError(_layout_message(f"{block}.{router_attr} ({type(router).__name__}) has no {missing}"))
        if _experts_activation(experts) is None:
            raise ValueError(
                f"apply_moe_kernels: {type(experts).__name__} cannot be computed by fused_experts (activation "
                f"{type(getattr(experts, 'act_fn', None)).__name__}, GPT-OSS limit/alpha other than "
                f"{GPT_OSS_LIMIT}/{GPT_OSS_ALPHA}, or a custom gate); supported: silu, gelu, gelu_tanh, gpt_oss"
            )
        patches += [(router, router_forward), (experts, moe_kernels_experts_forward)]
    for target, function in patches:
        _bind(target, function, backend)
    return len(blocks)


def patch_mixtral(model, *, backend: str = "auto") -> int:
    """Patch every ``MixtralSparseMoeBlock``; returns how many."""
    return _patch_blocks(model, backend, modeling="mixtral.modeling_mixtral", block="MixtralSparseMoeBlock",
                         router_attr="gate", router_forward=_mixtral_router_forward)


def patch_qwen2_moe(model, *, backend: str = "auto") -> int:
    """Patch every ``Qwen2MoeSparseMoeBlock`` (its shared expert and gate stay HF's); returns how many."""
    return _patch_blocks(model, backend, modeling="qwen2_moe.modeling_qwen2_moe", block="Qwen2MoeSparseMoeBlock",
                         router_attr="gate", router_forward=_softmax_router_forward,
                         router_attrs=("hidden_dim", "norm_topk_prob"))


def patch_qwen3_moe(model, *, backend: str = "auto") -> int:
    """Patch every ``Qwen3MoeSparseMoeBlock``; returns how many."""
    return _patch_blocks(model, backend, modeling="qwen3_moe.modeling_qwen3_moe", block="Qwen3MoeSparseMoeBlock",
                         router_attr="gate", router_forward=_softmax_router_forward,
                         router_attrs=("hidden_dim", "norm_topk_prob"))


def patch_olmoe(model, *, backend: str = "auto") -> int:
    """Patch every ``OlmoeSparseMoeBlock``; returns how many."""
    return _patch_blocks(model, backend, modeling="olmoe.modeling_olmoe", block="OlmoeSparseMoeBlock",
                         router_attr="gate", router_forward=_softmax_router_forward,
                         router_attrs=("hidden_dim", "norm_topk_prob"))


def patch_deepseek_v3(model, *, backend: str = "auto") -> int:
    """Patch every ``DeepseekV3MoE`` (dense layers and shared experts stay HF's); returns how many."""
    return _patch_blocks(model, backend, modeling="deepseek_v3.modeling_deepseek_v3", block="DeepseekV3MoE",
                         router_attr="gate", router_forward=_deepseek_v3_router_forward,
                         router_attrs=("hidden_dim", "e_score_correction_bias", "num_group", "topk_group",
                                       "norm_topk_prob", "routed_scaling_factor"))


def patch_gpt_oss(model, *, backend: str = "auto") -> int:
    """Patch every ``GptOssMLP``; returns how many."""
    return _patch_blocks(model, backend, modeling="gpt_oss.modeling_gpt_oss", block="GptOssMLP",
                         router_attr="router", router_forward=_gpt_oss_router_forward, router_attrs=("bias",))


MODEL_TYPE_TO_APPLY_FN: dict[str, Callable[..., int]] = {
    "mixtral": patch_mixtral,
    "qwen2_moe": patch_qwen2_moe,
    "qwen3_moe": patch_qwen3_moe,
    "olmoe": patch_olmoe,
    "deepseek_v3": patch_deepseek_v3,
    "gpt_oss": patch_gpt_oss,
}
SUPPORTED_MODEL_TYPES = tuple(MODEL_TYPE_TO_APPLY_FN)


def apply_moe_kernels(model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Patch a loaded HF transformers (>= 5.13) MoE model in place to route with
    :func:`moe_kernels.softmax_topk` and compute its experts with :func:`moe_kernels.fused_experts`
    (``backend`` as for every op: ``"auto"``, ``"triton"`` or ``"torch"``). Mutates the routers' and
    experts' ``forward`` instance attributes only; parameters are shared, not copied. Returns
    ``model``.

    Raises ``ValueError`` for a ``model.config.model_type`` not in :data:`SUPPORTED_MODEL_TYPES`,
    a model without the expected MoE blocks, or experts the op cannot compute; ``ImportError``
    when transformers is missing or older than :data:`MIN_TRANSFORMERS_VERSION` (or its blocks are
    laid out otherwise).
    """
    if backend not in BACKENDS:
        raise ValueError(f"apply_moe_kernels: backend must be one of {BACKENDS}, got {backend!r}")
    _require_transformers()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    apply_fn = MODEL_TYPE_TO_APPLY_FN.get(model_type)
    if apply_fn is None:
        raise ValueError(
            f"apply_moe_kernels: model_type {model_type!r} is not supported; supported model types: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    revert_moe_kernels(model)
    apply_fn(model, backend=backend)
    return model


def revert_moe_kernels(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_moe_kernels` in place (a no-op on an unpatched model); returns ``model``."""
    for module in model.modules():
        saved = module.__dict__.pop(_SAVED, None)
        if saved is None:
            continue
        module.__dict__.pop(_BACKEND, None)
        attr, previous = saved
        if previous is None:
            module.__dict__.pop(attr, None)
        else:
            module.__dict__[attr] = previous
    return model


def is_moe_kernels_applied(model: nn.Module) -> bool:
    """Whether :func:`apply_moe_kernels` patched ``model`` (and it was not reverted since)."""
    return any(_SAVED in module.__dict__ for module in model.modules())
