"""Per-router overrides of expert selection: a router's ``k`` and an additive selection prior.

Counterfactual Routing (:mod:`moe_kernels.cor`) changes, per MoE layer, how many experts a token
selects and adds a static prior to the selection key. It does so without a second routing pass:
the routers that route with :func:`moe_kernels.softmax_topk` (:class:`moe_kernels.TopKRouter`
and the routers patched by :func:`moe_kernels.integrations.transformers.apply_moe_kernels`) ask
:func:`resolve_selection` for the ``k`` and the selection ``bias`` of their one ``softmax_topk``
call. The override lives in the router's ``__dict__`` (not a parameter, buffer or attribute of
its class), so ``state_dict`` and the class are untouched, and :func:`clear_selection_override`
restores the router's routing bit for bit (its forward then makes exactly the call it made
before).

This module imports only torch: ``nn`` and the HF integration both read it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Key of the override in a router's __dict__.
SELECTION_OVERRIDE = "_moe_kernels_selection_override"


@dataclass(frozen=True)
class SelectionOverride:
    """``k``: experts per token; ``prior (E,)`` float32, on the router's device: added to the
    router's own selection bias (selection only: the weights stay the router's own)."""

    k: int
    prior: torch.Tensor


def set_selection_override(router: nn.Module, k: int, prior: torch.Tensor) -> None:
    """Make ``router`` select ``k`` experts by ``scores + bias + prior`` (``prior (E,)`` float32)."""
    router.__dict__[SELECTION_OVERRIDE] = SelectionOverride(int(k), prior)


def clear_selection_override(router: nn.Module) -> bool:
    """Remove ``router``'s override; returns whether it had one."""
    return router.__dict__.pop(SELECTION_OVERRIDE, None) is not None


def selection_override(router: nn.Module) -> SelectionOverride | None:
    """``router``'s override, or None."""
    return router.__dict__.get(SELECTION_OVERRIDE)


def resolve_selection(router: nn.Module, k: int, bias: torch.Tensor | None) -> tuple[int, torch.Tensor | None]:
    """The ``(k, bias)`` a router passes to ``softmax_topk``: its own without an override, else the
    override's ``k`` and ``bias + prior`` (``prior`` alone when the router has no bias)."""
    override = router.__dict__.get(SELECTION_OVERRIDE)
    if override is None:
        return k, bias
    prior = override.prior
    return override.k, prior if bias is None else bias + prior
