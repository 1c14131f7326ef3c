"""The MoE layers of a model, and the taps that watch (and, for replay, decide) their routing.

An MoE layer this package drives is a :class:`moe_kernels.MoE` block, or a transformers MoE block
patched by :func:`moe_kernels.integrations.transformers.apply_moe_kernels`. Each carries the
``MOE_LAYER`` marker (a class attribute of ``MoE``, an entry of the patched block's ``__dict__``):
a function ``block -> LayerParts``. :func:`find_moe_layers` reads it, so that modules below
:mod:`moe_kernels.nn` (``balance``) find the layers without importing the classes.

A *tap* is attached to a layer's router (in its ``__dict__``: parameters, buffers, ``state_dict``
and the class are untouched). The routers of this package (``TopKRouter``, ``ProbMoERouter``,
``KNNRouter`` and the patched transformers routers) run :func:`run_taps` around their selection:
a tap may replace the logits (kNN memory building), force the selected ids (routing replay), and
sees the ids and logits chosen (routing records, load metrics). Without a tap the router's forward
pays one dictionary lookup.

This module imports only torch and :mod:`moe_kernels.config`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import nn

from moe_kernels.config import RoutingConfig

# A block's marker: ``block -> LayerParts`` (see the module doc).
MOE_LAYER = "_moe_kernels_moe_layer"
# A router's taps, in its __dict__: a tuple, in attachment order.
TAPS = "_moe_kernels_taps"
# True on a router class (or in a patched router's __dict__) whose forward runs run_taps.
RUNS_TAPS = "_moe_kernels_runs_taps"


@dataclass(frozen=True)
class LayerParts:
    """What a block's marker tells: its ``router``, ``num_experts`` E, the router's own ``k``
    (without a Counterfactual Routing override), its ``routing`` when it routes with
    ``softmax_topk`` (else None), ``weights_at`` (the index of the weights in the router's output:
    0 for ``(weights, ids)``, 1 for the transformers routers' ``(logits, weights, ids)``) and
    ``tapped`` (whether the router runs :func:`run_taps`)."""

    router: nn.Module
    num_experts: int
    k: int
    routing: RoutingConfig | None
    weights_at: int
    tapped: bool


@dataclass(frozen=True)
class MoELayer(LayerParts):
    """One MoE layer of a model: its :class:`LayerParts` fields, its ``index`` in
    :func:`find_moe_layers`' order, its ``name`` (the block's module path) and the ``block``
    (whose output is the layer's output: ``MoE``, or the transformers block, whose GPT-OSS forward
    returns ``(hidden, router_scores)``)."""

    index: int
    name: str
    block: nn.Module

    @property
    def eligible_experts(self) -> int:
        """How many experts a token can select (the kept groups' experts under a group limit)."""
        return self.num_experts if self.routing is None else self.routing.eligible_experts(self.num_experts)


def _looks_like_unpatched_hf_block(module: nn.Module) -> bool:
    experts = module._modules.get("experts")
    return experts is not None and hasattr(experts, "gate_up_proj")


def find_moe_layers(model: nn.Module, op: str) -> list[MoELayer]:
    """The MoE layers of ``model`` in ``model.named_modules()`` order; ``TypeError`` for a
    non-module, ``ValueError`` naming ``op`` when there is none (with a hint when the model has
    transformers MoE blocks that were not patched)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{op}: model must be a torch.nn.Module, got {type(model).__name__}")
    layers, unpatched = [], 0
    for name, module in model.named_modules():
        describe = getattr(module, MOE_LAYER, None)
        if describe is not None:
            parts = describe(module)
            described = {field.name: getattr(parts, field.name) for field in fields(LayerParts)}
            layers.append(MoELayer(**described, index=len(layers), name=name, block=module))
        elif _looks_like_unpatched_hf_block(module):
            unpatched += 1
    if not layers:
        hint = (
            f" ({unpatched} Hugging Face MoE blocks are not patched: call "
            "moe_kernels.integrations.transformers.apply_moe_kernels(model) first)"
            if unpatched
            else ""
        )
        raise ValueError(
            f"{op}: the model has no MoE layers (moe_kernels.MoE blocks or HF MoE blocks patched by "
            f"apply_moe_kernels){hint}"
        )
    return layers


def require_tapped(layers: list[MoELayer], op: str) -> None:
    """``ValueError`` naming ``op`` and the layer when a layer's router does not run taps (a
    custom router module given to ``MoE``)."""
    for layer in layers:
        if not layer.tapped:
            raise ValueError(
                f"{op}: the router of MoE layer {layer.name!r} is a {type(layer.router).__name__}, which does not "
                "run moe_kernels' routing taps; record, replay and load metrics need TopKRouter, ProbMoERouter, "
                "KNNRouter or an apply_moe_kernels-patched router"
            )


class Tap:
    """A watcher of one router's selection; subclasses override what they need. ``rows``: the
    router's token count ``T`` (its logits' leading dims flattened); ``k``: the experts per token
    it selects; ``ids (..., k)`` int, ``logits (..., E)`` the (possibly replaced) logits it
    routed from."""

    def logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits to route from (default: the router's own)."""
        return logits

    def forced_ids(self, rows: int, k: int) -> torch.Tensor | None:
        """``(rows, k)`` ids to select instead of the router's choice, or None (default)."""
        return None

    def observe(self, ids: torch.Tensor, logits: torch.Tensor) -> None:
        """Called with what the router selected (default: nothing)."""


def attach_tap(router: nn.Module, tap: Tap) -> None:
    """Add ``tap`` to ``router``'s taps (after those already there)."""
    router.__dict__[TAPS] = (*router.__dict__.get(TAPS, ()), tap)


def detach_tap(router: nn.Module, tap: Tap) -> None:
    """Remove ``tap`` from ``router`` (no-op when absent); the key goes with the last tap."""
    taps = tuple(t for t in router.__dict__.get(TAPS, ()) if t is not tap)
    if taps:
        router.__dict__[TAPS] = taps
    else:
        router.__dict__.pop(TAPS, None)


def taps_of(router: nn.Module) -> tuple[Tap, ...]:
    """``router``'s taps, in attachment order."""
    return router.__dict__.get(TAPS, ())


Select = Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]


def run_taps(
    router: nn.Module, logits: torch.Tensor, k: int, select: Select
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``select(logits, forced_ids)`` -> ``(weights, ids)`` run under ``router``'s taps; returns
    ``(weights, ids, logits)``. Without a tap: ``select(logits, None)``. With taps: each may
    replace the logits in turn; the first that forces ids decides them (a second forcing tap is
    refused when attached, see :mod:`moe_kernels.replay`); every tap observes the result."""
    taps = router.__dict__.get(TAPS)
    if not taps:
        return (*select(logits, None), logits)
    for tap in taps:
        logits = tap.logits(logits)
    forced, lead = None, logits.shape[:-1]
    for tap in taps:
        forced = tap.forced_ids(lead.numel(), k)
        if forced is not None:
            forced = forced.reshape(*lead, forced.shape[-1])
            break
    weights, ids = select(logits, forced)
    for tap in taps:
        tap.observe(ids, logits)
    return weights, ids, logits
