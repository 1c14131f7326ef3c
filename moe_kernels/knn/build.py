"""Building kNN-MoE routing memories: per MoE layer, router inputs of a reference set as keys and
routing logits optimised for the reference targets as values (the kNN-MoE paper's memory,
arXiv 2601.02144)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from moe_kernels.config import integer
from moe_kernels.knn.memory import RoutingMemory
from moe_kernels.layers import Tap, attach_tap, detach_tap, find_moe_layers
from moe_kernels.progress import Progress


@dataclass
class MemoryBuild:
    """What :func:`build_routing_memory` returns: one memory per layer name, and the reference
    loss averaged over the batches with the frozen routers (``loss_before``) and with the
    optimised logits (``loss_after``)."""

    memories: dict[str, RoutingMemory]
    loss_before: float
    loss_after: float


def routed_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{name of an MoE block: its router}`` for every MoE layer of ``model`` that routes with
    ``softmax_topk`` (the routers a memory can be built for): :class:`moe_kernels.MoE` blocks with
    a :class:`moe_kernels.TopKRouter`, and transformers MoE blocks patched by
    :func:`moe_kernels.integrations.transformers.apply_moe_kernels`. ``ValueError`` for a model
    without MoE layers."""
    return {layer.name: layer.router for layer in find_moe_layers(model, "build_routing_memory") if layer.routing}


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
        model: a module holding :class:`moe_kernels.MoE` blocks with :class:`TopKRouter` routers, or
            a transformers model patched by ``apply_moe_kernels`` (see :func:`routed_layers`).
        reference_batches: iterable of batches, each passed to ``loss_fn`` as is.
        loss_fn: ``(model, batch) -> scalar tensor`` to minimise.
        layers: names of the MoE blocks to build memories for (default: all of them).
        steps, lr: Adam steps per batch and learning rate on the logits.
        metric, index, index_options: of each :class:`RoutingMemory`.
        model_name: recorded in each memory's manifest (with the layer name).
        progress: show progress on stderr (a redrawn line on a terminal, a line per tenth of the
            batches elsewhere).

    Returns:
        :class:`MemoryBuild` with the memories and the reference loss before and after.
    """
    routers = routed_layers(model)
    names = list(routers) if layers is None else list(layers)
    unknown = sorted(set(names) - set(routers))
    if unknown or not names:
        raise ValueError(
            f"build_routing_memory: layers must name MoE blocks routed by softmax_topk, got {unknown or names}; "
            f"available: {sorted(routers)}"
        )
    steps = integer("build_routing_memory", "steps", steps)
    if steps < 0:
        raise ValueError(f"build_routing_memory: steps must be an int >= 0, got {steps!r}")
    keys = {name: [] for name in names}
    values = {name: [] for name in names}
    before, after = [], []
    batches = list(reference_batches)
    if not batches:
        raise ValueError("build_routing_memory: reference_batches is empty")
    with _frozen(model), Progress(len(batches), "build_routing_memory", enabled=progress) as bar:
        for batch in batches:
            inputs, frozen = _router_inputs(model, routers, names, batch, loss_fn)
            logits = {name: frozen[name].float().detach().requires_grad_(True) for name in names}
            best_loss, best = _optimise(model, routers, logits, batch, loss_fn, steps, lr, before)
            after.append(best_loss)
            for name in names:
                keys[name].append(inputs[name].float().cpu())
                values[name].append(best[name].cpu())
            bar.update(status={"loss_before": sum(before) / len(before), "loss_after": sum(after) / len(after)})
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


class _Capture(Tap):
    """Keeps the last logits its router routed from."""

    logits_seen: torch.Tensor | None = None

    def observe(self, ids: torch.Tensor, logits: torch.Tensor) -> None:
        self.logits_seen = logits.detach()


def _router_inputs(model, routers, names, batch, loss_fn) -> tuple[dict, dict]:
    """Each chosen router's input ``(T, H)`` and logits ``(T, E)`` in one frozen forward."""
    captured, taps = {}, {name: _Capture() for name in names}

    def keep(name):
        def hook(_module, args):
            captured[name] = args[0]

        return hook

    hooks = [routers[name].register_forward_pre_hook(keep(name)) for name in names]
    for name in names:
        attach_tap(routers[name], taps[name])
    try:
        with torch.no_grad():
            loss_fn(model, batch)
    finally:
        for hook in hooks:
            hook.remove()
        for name in names:
            detach_tap(routers[name], taps[name])
    missing = [name for name in names if taps[name].logits_seen is None]
    if missing:
        raise ValueError(f"build_routing_memory: loss_fn did not run the MoE layers {missing}")
    inputs = {name: captured[name].detach().reshape(-1, captured[name].shape[-1]) for name in names}
    return inputs, {name: taps[name].logits_seen for name in names}


class _FromLogits(Tap):
    """Makes its router route from given logits (the same batch every call)."""

    def __init__(self, values: torch.Tensor):
        self.values = values

    def logits(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[:-1].numel() != self.values.shape[0]:
            raise RuntimeError(
                f"build_routing_memory: a router saw {logits.shape[:-1].numel()} tokens, its logits have "
                f"{self.values.shape[0]}: loss_fn must run the same batch every time"
            )
        return self.values.reshape(logits.shape)


@contextlib.contextmanager
def _routing_from(routers: dict[str, nn.Module], logits: dict[str, torch.Tensor]):
    """Within the block, each router in ``logits`` routes its (same-sized) batch from the given
    logits instead of computing them from its input."""
    taps = {name: _FromLogits(values) for name, values in logits.items()}
    for name, tap in taps.items():
        attach_tap(routers[name], tap)
    try:
        yield
    finally:
        for name, tap in taps.items():
            detach_tap(routers[name], tap)


def _optimise(model, routers, logits, batch, loss_fn, steps, lr, before) -> tuple[float, dict]:
    """Adam on the logits; returns the lowest loss seen and the logits that gave it. Appends the
    step-0 (frozen-router) loss to ``before``."""
    optimizer = torch.optim.Adam(list(logits.values()), lr=lr)
    best_loss, best = float("inf"), {}
    with _routing_from(routers, logits):
        for step in range(steps + 1):
            loss = loss_fn(model, batch)
            value = float(loss.detach())
            if not value < math.inf:  # NaN or inf: nothing to optimise, and no step to keep
                raise ValueError(
                    f"build_routing_memory: loss_fn returned a non-finite loss ({value}) at step {step} of a "
                    "batch; check the batch and the model (a NaN before any step means the frozen model's loss)"
                )
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
