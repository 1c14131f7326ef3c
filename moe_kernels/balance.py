"""Load statistics and load-balancing rules for MoE routers: device tensors throughout, no host
syncs, so they can run every step of a training loop.

- :func:`load_stats`: counts, fractions and imbalance measures of routed ids.
- :func:`switch_aux_loss`: the Switch Transformer auxiliary loss as HF transformers computes it.
- :func:`router_z_loss`: the ST-MoE router z-loss.
- :class:`AuxLossFreeBias`: DeepSeek-V3's auxiliary-loss-free selection bias.
- :class:`LoadTracking` and :func:`track_load` / :func:`collect_load`: switch on and read the
  per-layer statistics of every load-tracking layer (:class:`moe_kernels.MoE`) of a model.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
from torch import nn

from moe_kernels.functional import expert_counts


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
    counts = expert_counts(ids.reshape(-1, 1), num_experts).long()
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
        A scalar float32 (float64 for float64 logits) tensor, differentiable in ``router_logits``
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
    counts = expert_counts(ids.reshape(-1, 1), num_experts).to(logits.dtype)
    mean_probs = torch.softmax(logits, dim=-1).mean(dim=0)
    return num_experts / tokens * torch.dot(counts, mean_probs)


def router_z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """The ST-MoE router z-loss ``mean_t logsumexp(router_logits_t)^2``.

    Args:
        router_logits: ``(T, E)`` floating logits, computed in float32 (float64 kept).

    Returns:
        A scalar tensor, differentiable in ``router_logits``; no host sync.
    """
    _check_logits("router_z_loss", router_logits)
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
        if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 <= float(rate) < math.inf:
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


class LoadTracking:
    """What a layer that records its routing's load provides (:class:`moe_kernels.MoE` does):
    ``track_load`` (bool: record or not) and ``last_load`` (the last forward's :class:`LoadStats`,
    or None), and :meth:`record_load` to call from its forward with the routed ids."""

    track_load: bool = False
    last_load: LoadStats | None = None

    def record_load(self, ids: torch.Tensor, num_experts: int) -> None:
        """Store :func:`load_stats` of ``ids`` as ``last_load`` when ``track_load`` is on (a few
        small device ops, no host sync)."""
        if self.track_load:
            self.last_load = load_stats(ids.detach(), num_experts)


def track_load(model: nn.Module, enabled: bool = True) -> int:
    """Set ``track_load`` on every :class:`LoadTracking` layer in ``model`` (every
    :class:`moe_kernels.MoE`), so each forward stores its :class:`LoadStats` as ``last_load``;
    returns how many layers were switched."""
    layers = [module for module in model.modules() if isinstance(module, LoadTracking)]
    for layer in layers:
        layer.track_load = enabled
    return len(layers)


def collect_load(model: nn.Module) -> dict[str, LoadStats]:
    """``{module name: last_load}`` of every :class:`LoadTracking` layer in ``model`` that has
    recorded one (see :func:`track_load`)."""
    return {
        name: module.last_load
        for name, module in model.named_modules()
        if isinstance(module, LoadTracking) and module.last_load is not None
    }
