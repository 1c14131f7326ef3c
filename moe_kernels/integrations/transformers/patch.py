"""Patching a loaded transformers model in place (the mechanics of :func:`apply_moe_kernels`;
the routing per family is the package doc's table and :mod:`.families`' registry)."""

from __future__ import annotations

import importlib
import types
from collections.abc import Callable

import torch
from torch import nn

from moe_kernels.config import GPT_OSS_ALPHA, GPT_OSS_LIMIT, RoutingConfig
from moe_kernels.integrations.transformers.common import (
    ACTIVATION,
    BACKEND,
    PACKED,
    ROUTING,
    SAVED,
    layout_message,
    require_transformers,
)
from moe_kernels.integrations.transformers.experts import (
    expert_weights,
    experts_activation,
    moe_kernels_experts_forward,
)
from moe_kernels.integrations.transformers.families import FAMILIES
from moe_kernels.layers import MOE_LAYER, RUNS_TAPS, TAPS, LayerParts
from moe_kernels.routing_override import SELECTION_OVERRIDE
from moe_kernels.utils import check_backend


def _bind(module: nn.Module, function: Callable, backend: str, routing: RoutingConfig | None = None) -> None:
    # accelerate's hooks (device_map) wrap ``forward`` and call ``_old_forward``: patch inside them.
    attr = "_old_forward" if "_old_forward" in module.__dict__ else "forward"
    module.__dict__[SAVED] = (attr, module.__dict__.get(attr))
    module.__dict__[BACKEND] = backend
    if routing is not None:
        module.__dict__[ROUTING] = routing
    setattr(module, attr, types.MethodType(function, module))


# What every patched router forward reads (each family's forward reads its router_attrs too).
_ROUTER_ATTRS = ("top_k", "weight")


def _patch_blocks(model, backend: str, routing: RoutingConfig | None, model_type: str) -> int:
    """Patch the router and the experts of every MoE block of ``model_type``'s family in ``model``
    (all validated before any is patched); returns how many blocks."""
    family = FAMILIES[model_type]
    block = family.block
    block_class = getattr(importlib.import_module(family.module), block)
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
            raise ImportError(layout_message(f"{block}.experts is {type(block_experts).__name__}"))
        missing = [a for a in _ROUTER_ATTRS + family.router_attrs if not hasattr(router, a)]
        if missing:
            where = f"{block}.{family.router_attr} ({type(router).__name__})"
            raise ImportError(layout_message(f"{where} has no {missing}"))
        if experts_activation(block_experts) is None:
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
        if function is moe_kernels_experts_forward:
            pack_expert_weights(target)
        else:
            target.__dict__[RUNS_TAPS] = True
    for moe in blocks:
        moe.__dict__[MOE_LAYER] = _patched_parts(family.router_attr)
    return len(blocks)


def _patched_parts(router_attr: str) -> Callable[[nn.Module], LayerParts]:
    """A patched block's ``MOE_LAYER`` marker: ``block -> LayerParts`` of its router."""

    def parts(block: nn.Module) -> LayerParts:
        router = getattr(block, router_attr)
        return LayerParts(router, router.weight.shape[0], int(router.top_k), router.__dict__[ROUTING], 1, True)

    return parts


# What a patch, or what runs on a patched model, leaves in a module's __dict__ besides SAVED: the
# revert removes them all, so that the next apply starts from the unpatched model.
_PATCH_STATE = (BACKEND, ROUTING, ACTIVATION, MOE_LAYER, RUNS_TAPS, TAPS, SELECTION_OVERRIDE)


def pack_expert_weights(experts: nn.Module) -> tuple[str, ...]:
    """Re-lay, once, the CPU expert weights that :func:`expert_weights` would pass as strided
    views (GPT-OSS's transposed ``(E, H, 2I)`` / ``(E, I, H)``, or any non-contiguous one), so
    that fused_experts gets them contiguous: oneDNN's 16-bit GEMMs reorder a strided operand on
    every call (bfloat16 decode at GPT-OSS-like sizes ran 2-2.5x slower; float32 1.0-1.45x). The
    Parameters keep their shapes and values (only their strides change: HF's own forward computes
    the same), the copy is one layer's at a time, and :func:`revert_moe_kernels` makes them
    contiguous again. CUDA weights are left as they are (the Triton kernels take strides).
    Returns the names re-laid (recorded on the module)."""
    packed = []
    transposed = getattr(experts, "is_transposed", False)
    for name, view in zip(("gate_up_proj", "down_proj"), expert_weights(experts)):
        param = getattr(experts, name)
        if param.device.type != "cpu" or view.is_contiguous():
            continue
        laid = view.contiguous()
        with torch.no_grad():
            param.data = laid.transpose(1, 2) if transposed else laid
        packed.append(name)
    if packed:
        experts.__dict__[PACKED] = tuple(packed)
    return tuple(packed)


def _family_patcher(model_type: str) -> Callable[..., int]:
    """``patch_<model_type>(model, *, backend="auto", routing=None) -> int``."""

    def patch(model, *, backend: str = "auto", routing: RoutingConfig | None = None) -> int:
        return _patch_blocks(model, backend, routing, model_type)

    patch.__name__ = patch.__qualname__ = f"patch_{model_type}"
    patch.__doc__ = f"Patch every ``{FAMILIES[model_type].block}`` of ``model``; returns how many."
    return patch


MODEL_TYPE_TO_APPLY_FN: dict[str, Callable[..., int]] = {name: _family_patcher(name) for name in FAMILIES}
SUPPORTED_MODEL_TYPES = tuple(MODEL_TYPE_TO_APPLY_FN)


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
    first = next(iter(model.parameters()), None) if isinstance(model, nn.Module) else None
    check_backend("apply_moe_kernels", backend, None if first is None else first.device)
    if routing is not None and not isinstance(routing, RoutingConfig):
        raise TypeError(
            f"apply_moe_kernels: routing must be a moe_kernels.RoutingConfig or None, got {type(routing).__name__}"
        )
    require_transformers()
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
        patched = SAVED in module.__dict__ or MOE_LAYER in module.__dict__
        for key in _PATCH_STATE if patched else ():
            module.__dict__.pop(key, None)
        saved = module.__dict__.pop(SAVED, None)
        if saved is None:
            continue
        for name in module.__dict__.pop(PACKED, ()):  # the checkpoint's contiguous layout again
            param = getattr(module, name)
            param.data = param.data.contiguous()
        attr, previous = saved
        if previous is None:
            module.__dict__.pop(attr, None)
        else:
            module.__dict__[attr] = previous
    return model


def is_moe_kernels_applied(model: nn.Module) -> bool:
    """Whether :func:`apply_moe_kernels` patched ``model`` (and it was not reverted since)."""
    return any(SAVED in module.__dict__ for module in model.modules())
