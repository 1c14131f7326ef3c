"""Load statistics and load-balancing rules for MoE routers: device tensors throughout, no host
syncs, so they can run every step of a training loop.

- :func:`load_stats`: counts, fractions and imbalance measures of routed ids.
- :func:`switch_aux_loss`: the Switch Transformer auxiliary loss as HF transformers computes it.
- :func:`router_z_loss`: the ST-MoE router z-loss.
- :class:`AuxLossFreeBias`: DeepSeek-V3's auxiliary-loss-free selection bias.
- :func:`track_load` / :func:`collect_load`: switch on and read the last forward's statistics
  of every MoE layer of a model (:class:`moe_kernels.MoE` blocks and transformers blocks patched
  by ``apply_moe_kernels``); :func:`measure_load`: counts summed over a block of forwards
  (``generate`` included).
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import nn

from moe_kernels.config import real_number
from moe_kernels.functional import expert_counts
from moe_kernels.layers import RUNS_TAPS, Tap, attach_tap, detach_tap, find_moe_layers, require_tapped, taps_of


class LoadStats(NamedTuple):
    """Load statistics of one routing decision (see :func:`load_stats`); all device tensors.

    Attributes:
        counts: ``(E,)`` int64, assignments per expert (ids of -1 ignored).
        fraction: ``(E,)`` float32, ``counts / sum(counts)``.
        cv: ``()`` float32, population standard deviation of the counts over their mean.
        max_over_mean: ``()`` float32, the largest count over the mean count (1 when balanced,
            ``E`` when one expert takes everything).
        entropy: ``()`` float32, entropy of ``fraction`` (``0 log 0 = 0``) divided by ``log E``
            (1 when balanced, 0 when collapsed).
        jain: ``()`` float32, Jain's fairness index ``(sum c)^2 / (E sum c^2)`` (1 when balanced,
            ``1/E`` when collapsed).

    With no valid id at all, every field but ``counts`` is NaN.
    """

    counts: torch.Tensor
    fraction: torch.Tensor
    cv: torch.Tensor
    max_over_mean: torch.Tensor
    entropy: torch.Tensor
    jain: torch.Tensor


def check_num_experts(name: str, num_experts, minimum: int = 1) -> int:
    """``num_experts`` as an int >= ``minimum``, or a ``TypeError`` / ``ValueError`` naming ``name``."""
    if isinstance(num_experts, bool) or not isinstance(num_experts, numbers.Integral):
        raise TypeError(f"{name}: num_experts must be an int, got {type(num_experts).__name__}")
    if num_experts < minimum:
        raise ValueError(f"{name}: num_experts must be >= {minimum}, got {num_experts}")
    return int(num_experts)


def _check_ids(name: str, ids) -> None:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name}: ids must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: ids must be an integer tensor (int32 / int64), got {ids.dtype}")


def load_stats(ids: torch.Tensor, num_experts: int) -> LoadStats:
    """Load statistics of routed expert ids.

    Args:
        ids: integer tensor of any shape, usually ``(T, k)`` int32 from a router, values in
            ``[-1, E)``; -1 marks an empty slot and is not counted. The counts are
            :func:`moe_kernels.expert_counts`' (int64 here), and so is the range check: a
            ``ValueError`` on the CPU, a device-side assert elsewhere (no host sync).
        num_experts: ``E >= 1``.

    Returns:
        A :class:`LoadStats` of device tensors on ``ids``' device.
    """
    _check_ids("load_stats", ids)
    num_experts = check_num_experts("load_stats", num_experts)
    return stats_from_counts(expert_counts(ids.reshape(-1, 1), num_experts).long())


def stats_from_counts(counts: torch.Tensor) -> LoadStats:
    """:class:`LoadStats` of per-expert assignment ``counts (E,)`` int64 (E >= 1)."""
    num_experts = counts.shape[0]
    values = counts.to(torch.float32)
    total = values.sum()
    fraction = values / total
    mean = total / num_experts
    cv = values.std(correction=0) / mean
    max_over_mean = values.amax() / mean
    # xlogy gives 0 * log 0 = 0; with E = 1 the entropy is 0 / 0: defined as 1 (nothing to balance).
    entropy = -torch.special.xlogy(fraction, fraction).sum()
    entropy = entropy / math.log(num_experts) if num_experts > 1 else entropy + 1
    jain = total * total / (num_experts * (values * values).sum())
    return LoadStats(counts, fraction, cv, max_over_mean, entropy, jain)


def _check_logits(name: str, router_logits) -> None:
    if not isinstance(router_logits, torch.Tensor):
        raise TypeError(f"{name}: router_logits must be a torch.Tensor, got {type(router_logits).__name__}")
    if not router_logits.is_floating_point():
        raise TypeError(f"{name}: router_logits must be floating point, got {router_logits.dtype}")
    if router_logits.dim() != 2:
        raise ValueError(f"{name}: router_logits must be (T, E), got shape {tuple(router_logits.shape)}")


def _at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """float16 / bfloat16 up to float32 (HF computes these losses in float32); float64 kept."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def switch_aux_loss(router_logits: torch.Tensor, ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The Switch Transformer load-balancing loss for top-k routers, as HF transformers'
    ``load_balancing_loss_func`` computes it for one layer without an attention mask::

        E * sum_i (count_i / T) * mean_t softmax(router_logits)_ti

    ``count_i`` counts the ``k`` choices of every token, so a balanced router scores ``k``.

    Args:
        router_logits: ``(T, E)`` floating logits; the softmax runs in float32 (float64 kept).
        ids: ``(T, k)`` integer expert ids chosen for each token (-1 slots ignored).
        num_experts: ``E``, equal to ``router_logits.shape[1]``.

    Returns:
        A scalar float32 (float64 for float64 logits) tensor (0 for an empty batch, T = 0),
        differentiable in ``router_logits``
        (``ids`` are constants); no host sync.
    """
    name = "switch_aux_loss"
    _check_logits(name, router_logits)
    _check_ids(name, ids)
    num_experts = check_num_experts(name, num_experts)
    if router_logits.shape[1] != num_experts:
        raise ValueError(f"{name}: router_logits has {router_logits.shape[1]} experts, num_experts is {num_experts}")
    if ids.dim() != 2 or ids.shape[0] != router_logits.shape[0]:
        raise ValueError(f"{name}: ids must be (T, k) with T = {router_logits.shape[0]}, got {tuple(ids.shape)}")
    logits = _at_least_float32(router_logits)
    tokens = logits.shape[0]
    if tokens == 0:  # no token, no imbalance (an expert-parallel rank may route none)
        return logits.sum() * 0.0
    counts = expert_counts(ids.reshape(-1, 1), num_experts).to(logits.dtype)
    mean_probs = torch.softmax(logits, dim=-1).mean(dim=0)
    return num_experts / tokens * torch.dot(counts, mean_probs)


def router_z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """The ST-MoE router z-loss ``mean_t logsumexp(router_logits_t)^2``.

    Args:
        router_logits: ``(T, E)`` floating logits, computed in float32 (float64 kept).

    Returns:
        A scalar tensor (0 for T = 0), differentiable in ``router_logits``; no host sync.
    """
    _check_logits("router_z_loss", router_logits)
    if router_logits.shape[0] == 0:  # as switch_aux_loss: 0, not the NaN mean of nothing
        return _at_least_float32(router_logits).sum() * 0.0
    return torch.logsumexp(_at_least_float32(router_logits), dim=-1).square().mean()


class AuxLossFreeBias(nn.Module):
    """DeepSeek-V3's auxiliary-loss-free balancing: a selection-only bias that every update moves
    by ``rate`` against each expert's excess load,

        bias_i <- bias_i + rate * sign(mean_load - load_i)

    the negative-feedback counterpart of the adaptive-score model of
    :mod:`moe_kernels.dynamics`. Pass ``.bias`` as the ``bias`` of
    :func:`moe_kernels.softmax_topk` (or copy it into a :class:`moe_kernels.TopKRouter`'s
    ``e_score_correction_bias``): it ranks experts, it never scales the weights.

    Args:
        num_experts: ``E >= 1``.
        rate: the step ``gamma`` (DeepSeek-V3: 1e-3), a finite number >= 0.

    Buffers:
        bias: ``(E,)`` float32, starting at 0.
    """

    def __init__(self, num_experts: int, rate: float = 1e-3, *, device=None):
        super().__init__()
        num_experts = check_num_experts("AuxLossFreeBias", num_experts)
        real_number("AuxLossFreeBias", "rate", rate)
        if not 0 <= float(rate) < math.inf:
            raise ValueError(f"AuxLossFreeBias: rate must be a finite number >= 0, got {rate!r}")
        self.num_experts = num_experts
        self.rate = float(rate)
        self.register_buffer("bias", torch.zeros(num_experts, dtype=torch.float32, device=device))

    @torch.no_grad()
    def update(self, ids: torch.Tensor) -> torch.Tensor:
        """One step of the rule from the expert ids of a batch (any shape, values in ``[-1, E)``,
        -1 ignored), in place on the bias' device, no host sync. Returns ``bias``."""
        _check_ids("AuxLossFreeBias.update", ids)
        counts = expert_counts(ids.to(self.bias.device).reshape(-1, 1), self.num_experts).to(torch.float32)
        self.bias.add_(torch.sign(counts.mean() - counts), alpha=self.rate)
        return self.bias

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, rate={self.rate}"


class LoadTracker(Tap):
    """The tap :func:`track_load` attaches to a router: ``last`` holds the :class:`LoadStats` of
    its last forward (None before one)."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.last: LoadStats | None = None

    def observe(self, ids: torch.Tensor, logits: torch.Tensor) -> None:
        self.last = load_stats(ids.detach(), self.num_experts)


def load_tracker(router: nn.Module) -> LoadTracker | None:
    """``router``'s :class:`LoadTracker`, or None when its load is not tracked."""
    return next((tap for tap in taps_of(router) if isinstance(tap, LoadTracker)), None)


def set_load_tracking(router: nn.Module, num_experts: int, enabled: bool, op: str) -> None:
    """Attach (``enabled``) or detach ``router``'s :class:`LoadTracker`; ``ValueError`` naming
    ``op`` when enabling on a router that does not run taps. Idempotent."""
    if not isinstance(enabled, bool):
        raise TypeError(f"{op}: enabled must be a bool, got {type(enabled).__name__}")
    tracker = load_tracker(router)
    if not enabled:
        if tracker is not None:
            detach_tap(router, tracker)
        return
    if getattr(router, RUNS_TAPS, False) is not True:
        raise ValueError(
            f"{op}: {type(router).__name__} does not run moe_kernels' routing taps; load tracking needs "
            "TopKRouter, ProbMoERouter, KNNRouter or an apply_moe_kernels-patched router"
        )
    if tracker is None:
        attach_tap(router, LoadTracker(num_experts))


def track_load(model: nn.Module, enabled: bool = True) -> int:
    """Switch load tracking on (or off) for every MoE layer of ``model`` (:class:`moe_kernels.MoE`
    blocks and transformers MoE blocks patched by ``apply_moe_kernels``): each forward of a layer
    then stores the :class:`LoadStats` of its routed ids (a few small device ops, no host sync),
    read by :func:`collect_load`. Returns how many layers were switched; ``ValueError`` for a
    model without MoE layers or a layer whose router runs no taps."""
    layers = find_moe_layers(model, "track_load")
    require_tapped(layers, "track_load")
    for layer in layers:
        set_load_tracking(layer.router, layer.num_experts, enabled, "track_load")
    return len(layers)


def collect_load(model: nn.Module) -> dict[str, LoadStats]:
    """``{layer name: LoadStats}`` of the last forward of every tracked MoE layer of ``model``
    that has run since :func:`track_load` (layer names are the blocks' module paths);
    ``ValueError`` for a model without MoE layers."""
    loads = {}
    for layer in find_moe_layers(model, "collect_load"):
        tracker = load_tracker(layer.router)
        if tracker is not None and tracker.last is not None:
            loads[layer.name] = tracker.last
    return loads


class _LoadCounter(Tap):
    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.counts: torch.Tensor | None = None
        self.calls = 0

    def observe(self, ids: torch.Tensor, logits: torch.Tensor) -> None:
        counts = expert_counts(ids.detach().reshape(-1, 1), self.num_experts).long()
        self.counts = counts if self.counts is None else self.counts + counts
        self.calls += 1


class LoadMeasurement:
    """What :func:`measure_load` yields: per MoE layer, the expert counts summed over every
    forward run inside the block (prefill and each decode step of ``generate`` alike).

    ``layers``: the layer names (module paths, :func:`moe_kernels.layers.find_moe_layers` order).
    ``calls(name)``: how many forwards the layer ran. ``counts()``: ``{name: (E,) int64}`` device
    tensors (zeros for a layer that did not run). ``stats()``: ``{name: LoadStats}`` of those
    counts (NaN fields for a layer with no assignment). No host sync.
    """

    def __init__(self, counters: dict[str, _LoadCounter], devices: dict[str, torch.device]):
        self._counters = counters
        self._devices = devices

    @property
    def layers(self) -> list[str]:
        return list(self._counters)

    def calls(self, name: str) -> int:
        return self._counters[name].calls

    def counts(self) -> dict[str, torch.Tensor]:
        return {
            name: counter.counts
            if counter.counts is not None
            else torch.zeros(counter.num_experts, dtype=torch.int64, device=self._devices[name])
            for name, counter in self._counters.items()
        }

    def stats(self) -> dict[str, LoadStats]:
        return {name: stats_from_counts(counts) for name, counts in self.counts().items()}


@contextlib.contextmanager
def measure_load(model: nn.Module) -> Iterator[LoadMeasurement]:
    """``with measure_load(model) as load:`` counts, per MoE layer of ``model`` (as for
    :func:`track_load`), the experts every forward inside the block selects (``model.generate``
    included); read ``load.stats()`` / ``load.counts()`` inside or after the block. Leaves the
    model as it was (``track_load`` settings untouched). ``ValueError`` as for :func:`track_load`."""
    layers = find_moe_layers(model, "measure_load")
    require_tapped(layers, "measure_load")
    counters = {layer.name: _LoadCounter(layer.num_experts) for layer in layers}
    devices = {layer.name: layer.router.weight.device for layer in layers}
    for layer in layers:
        attach_tap(layer.router, counters[layer.name])
    try:
        yield LoadMeasurement(counters, devices)
    finally:
        for layer in layers:
            detach_tap(layer.router, counters[layer.name])
