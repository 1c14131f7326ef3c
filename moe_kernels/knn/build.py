"""Building kNN-MoE routing memories: per MoE layer, router inputs of a reference set as keys and
routing logits optimised for the reference targets as values (seed_algorithms.md §2.1)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from moe_kernels.functional import softmax_topk
from moe_kernels.knn.memory import RoutingMemory
from moe_kernels.nn import MoE, TopKRouter


@dataclass
class MemoryBuild:
    """What :func:`build_routing_memory` returns: one memory per layer name, and the reference
    loss averaged over the batches with the frozen routers (``loss_before``) and with the
    optimised logits (``loss_after``)."""

    memories: dict[str, RoutingMemory]
    loss_before: float
    loss_after: float


def routed_layers(model: nn.Module) -> dict[str, TopKRouter]:
    """``{name of an MoE block: its router}`` for every :class:`moe_kernels.MoE` of ``model``
    with a :class:`TopKRouter` (the routers a memory can be built for)."""
    return {
        name: module.router
        for name, module in model.named_modules()
        if isinstance(module, MoE) and isinstance(module.router, TopKRouter)
    }


def build_routing_memory(
    model: nn.Module,
    reference_batches: Iterable,
    loss_fn: Callable[[nn.Module, object], torch.Tensor],
    *,
    layers: Iterable[str] | None = None,
    steps: int = 20,
    lr: float = 0.05,
    metric: str = "cosine",
    index: str = "flat",
    index_options: dict | None = None,
    model_name: str | None = None,
    progress: bool = True,
) -> MemoryBuild:
    """Build one :class:`RoutingMemory` per MoE layer from a reference set.

    For each batch: run the frozen model (``loss_fn(model, batch)``, a scalar mean loss such as
    the next-token NLL) and record every chosen layer's router inputs ``h (T, H)``; replace
    each router's logits by a free ``(T, E)`` tensor initialised at the frozen logits ``h @ W^T``
    (so step 0 is the frozen model), and optimise all layers' tensors jointly with Adam for
    ``steps`` steps on the batch's loss, every model parameter frozen; keep the step with the
    lowest loss. The keys are the router inputs, the values those logits.

    Args:
        model: a module holding :class:`moe_kernels.MoE` blocks with :class:`TopKRouter` routers.
        reference_batches: iterable of batches, each passed to ``loss_fn`` as is.
        loss_fn: ``(model, batch) -> scalar tensor`` to minimise.
        layers: names of the MoE blocks to build memories for (default: all of them).
        steps, lr: Adam steps per batch and learning rate on the logits.
        metric, index, index_options: of each :class:`RoutingMemory`.
        model_name: recorded in each memory's manifest (with the layer name).
        progress: print a progress line per batch to stderr.

    Returns:
        :class:`MemoryBuild` with the memories and the reference loss before and after.
    """
    routers = routed_layers(model)
    names = list(routers) if layers is None else list(layers)
    unknown = sorted(set(names) - set(routers))
    if unknown or not names:
        raise ValueError(
            f"build_routing_memory: layers must name MoE blocks with a TopKRouter, got {unknown or names}; "
            f"available: {sorted(routers)}"
        )
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"build_routing_memory: steps must be an int >= 0, got {steps!r}")
    keys = {name: [] for name in names}
    values = {name: [] for name in names}
    before, after = [], []
    batches = list(reference_batches)
    if not batches:
        raise ValueError("build_routing_memory: reference_batches is empty")
    with _frozen(model):
        for number, batch in enumerate(batches, 1):
            inputs = _router_inputs(model, routers, names, batch, loss_fn)
            logits = {
                name: nn.functional.linear(inputs[name], routers[name].weight).float().detach().requires_grad_(True)
                for name in names
            }
            best_loss, best = _optimise(model, routers, logits, batch, loss_fn, steps, lr, before)
            after.append(best_loss)
            for name in names:
                keys[name].append(inputs[name].float().cpu())
                values[name].append(best[name].cpu())
            if progress:
                print(
                    f"\rbuild_routing_memory: batch {number}/{len(batches)}, reference loss "
                    f"{sum(before) / len(before):.4f} -> {sum(after) / len(after):.4f}",
                    end="\n" if number == len(batches) else "",
                    file=sys.stderr,
                    flush=True,
                )
    memories = {
        name: RoutingMemory(
            torch.cat(keys[name]),
            torch.cat(values[name]),
            metric=metric,
            index=index,
            index_options=index_options,
            model=model_name,
            layer=name,
        )
        for name in names
    }
    return MemoryBuild(memories, sum(before) / len(before), sum(after) / len(after))


@contextlib.contextmanager
def _frozen(model: nn.Module):
    """No parameter of ``model`` asks for gradients within the block (flags restored after)."""
    flags = [(param, param.requires_grad) for param in model.parameters()]
    for param, _ in flags:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


def _router_inputs(model, routers, names, batch, loss_fn) -> dict[str, torch.Tensor]:
    """Each chosen router's input ``(T, H)`` in one frozen forward."""
    captured = {}
    hooks = [
        routers[name].register_forward_pre_hook(lambda _module, args, name=name: captured.__setitem__(name, args[0]))
        for name in names
    ]
    try:
        with torch.no_grad():
            loss_fn(model, batch)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: captured[name].detach() for name in names}


@contextlib.contextmanager
def _routing_from(routers: dict[str, TopKRouter], logits: dict[str, torch.Tensor]):
    """Within the block, each router in ``logits`` routes its (same-sized) batch from the given
    logits instead of computing them from its input."""

    def forward_from(router, values):
        def forward(hidden):
            if hidden.shape[0] != values.shape[0]:
                raise RuntimeError(
                    f"build_routing_memory: a router saw {hidden.shape[0]} tokens, its logits have "
                    f"{values.shape[0]}: loss_fn must run the same batch every time"
                )
            return softmax_topk(
                values, router.k, routing=router.routing, bias=router.e_score_correction_bias, backend=router.backend
            )

        return forward

    for name, values in logits.items():
        routers[name].forward = forward_from(routers[name], values)
    try:
        yield
    finally:
        for name in logits:
            del routers[name].forward  # back to the class's forward


def _optimise(model, routers, logits, batch, loss_fn, steps, lr, before) -> tuple[float, dict]:
    """Adam on the logits; returns the lowest loss seen and the logits that gave it. Appends the
    step-0 (frozen-router) loss to ``before``."""
    optimizer = torch.optim.Adam(list(logits.values()), lr=lr)
    best_loss, best = float("inf"), {}
    with _routing_from(routers, logits):
        for step in range(steps + 1):
            loss = loss_fn(model, batch)
            value = float(loss.detach())
            if step == 0:
                before.append(value)
            if value < best_loss:
                best_loss, best = value, {name: t.detach().clone() for name, t in logits.items()}
            if step == steps:
                break
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return best_loss, best
