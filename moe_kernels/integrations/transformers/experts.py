"""The experts side of the HF integration: which HF v5 experts modules ``fused_experts`` can
compute, the patched experts' forward, and transformers' ``ExpertsInterface`` registration."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from moe_kernels.config import GPT_OSS_ALPHA, GPT_OSS_LIMIT
from moe_kernels.functional import fused_experts
from moe_kernels.integrations.transformers.common import (
    ACTIVATION,
    BACKEND,
    EXPERTS_IMPLEMENTATION,
    layout_message,
    require_transformers,
)

_warned_fallback: set[str] = set()
_UNSET = object()


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


def experts_activation(experts: nn.Module) -> str | None:
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


def expert_weights(experts) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts' ``gate_up_proj (E, 2I, H)`` and ``down_proj (E, H, I)`` as fused_experts takes
    them: the Parameters, or for GPT-OSS's transposed ``(E, H, 2I)`` / ``(E, I, H)`` their
    transposed views (no copy)."""
    gate_up_proj, down_proj = experts.gate_up_proj, experts.down_proj
    if getattr(experts, "is_transposed", False):
        return gate_up_proj.transpose(1, 2), down_proj.transpose(1, 2)
    return gate_up_proj, down_proj


def _run_fused_experts(experts, hidden_states, top_k_index, top_k_weights, activation, backend):
    gate_up_proj, down_proj = expert_weights(experts)
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
    hidden = hidden_states.to(dtype)  # HF's grouped_mm path casts to the weights' dtype too (autocast)
    options = dict(activation=activation, gate_up_bias=gate_up_bias, down_bias=down_bias, backend=backend)
    return fused_experts(hidden, gate_up_proj, down_proj, weights, ids, **options).to(hidden_states.dtype)


def moe_kernels_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """``ExpertsInterface`` function (and the patched experts' forward): ``hidden_states (T, H)``,
    ``top_k_index (T, k)`` int, ``top_k_weights (T, k)`` (or dense ``(T, E)``) -> ``(T, H)`` in
    hidden's dtype, by :func:`moe_kernels.fused_experts` on the module's own parameters. The
    backend is the one :func:`apply_moe_kernels` set, else ``"auto"``. Experts it cannot compute
    run HF's ``grouped_mm`` implementation instead (one warning per class)."""
    # What the module computes is fixed by its class and act_fn: found once, kept on the module
    # (a decode step calls this once per layer; the lookup imports and inspects transformers).
    # Under torch.compile the module's __dict__ is left alone (dynamo refuses its mutation).
    if torch.compiler.is_compiling():
        activation = experts_activation(self)
    else:
        activation = self.__dict__.get(ACTIVATION, _UNSET)
        if activation is _UNSET:
            activation = self.__dict__[ACTIVATION] = experts_activation(self)
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
    backend = self.__dict__.get(BACKEND, "auto")
    return _run_fused_experts(self, hidden_states, top_k_index, top_k_weights, activation, backend)


def register_experts_implementation(name: str = EXPERTS_IMPLEMENTATION) -> str:
    """Register :func:`moe_kernels_experts_forward` in transformers' ``ExpertsInterface`` under
    ``name`` (idempotent; global to the process, as every ``ExpertsInterface.register``), so that
    ``experts_implementation=name`` is accepted by ``from_pretrained`` / ``from_config`` /
    ``set_experts_implementation``. Returns ``name``."""
    require_transformers()
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError as error:
        raise ImportError(layout_message("this transformers has no ExpertsInterface")) from error
    ExpertsInterface.register(name, moe_kernels_experts_forward)
    return name
