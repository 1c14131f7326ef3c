"""The trainable case of the load-dynamics model: a router whose logits carry an adaptive score
vector that follows the expert loads (positive feedback)."""

from __future__ import annotations

import numbers

import torch
from torch import nn

from moe_kernels.balance import AuxLossFreeBias, check_num_experts
from moe_kernels.config import RoutingConfig
from moe_kernels.dynamics.theory import MIN_EXPERTS, check_feedback
from moe_kernels.functional import expert_counts, softmax_topk


class AdaptiveScoreRouter(nn.Module):
    """Linear gate plus adaptive scores, routed by :func:`moe_kernels.softmax_topk`::

        logits = hidden W^T + K * s                     # s: (E,) float32 buffer, starts at 1/E
        weights, ids = softmax_topk(logits, k, bias=balancer.bias if balancer else None, ...)
        s <- (1 - eps) s + eps f                        # after each training batch

    where ``f (E,)`` are the batch's expert load fractions (assignments per expert over all
    ``T * k`` assignments). ``K = feedback`` is the dimensionless feedback strength of
    :mod:`moe_kernels.dynamics`: above a threshold set by the per-token spread of ``hidden W^T``
    (``critical_feedback`` for the noise model that matches it), balanced routing is unstable and
    the load collapses onto few experts. A :class:`moe_kernels.balance.AuxLossFreeBias` given as
    ``balancer`` adds its selection-only bias and is updated with the same ids: negative feedback
    that holds the load balanced past the threshold.

    ``forward(hidden (..., H)) -> (weights (..., k) float32, ids (..., k) int32)``, like
    :class:`moe_kernels.TopKRouter`, so it can be the ``router`` of :class:`moe_kernels.MoE`.
    In training mode with ``adapt`` set, every forward updates ``s`` (and the balancer) from its
    own ids after routing, in place on the device, no host sync; call :meth:`update` yourself
    with ``adapt=False`` when a batch runs several forwards (e.g. activation checkpointing).

    Args:
        hidden_size, num_experts, k: H, E (>= 2) and experts per token.
        feedback: ``K``, a finite number (settable later as ``router.feedback``).
        eps: the score step per batch, in ``(0, 1]``.
        balancer: an optional :class:`AuxLossFreeBias` over the same ``E`` experts.
        adapt: update the scores in training-mode forwards.
        renormalize, score_func, backend: as for :func:`moe_kernels.softmax_topk`.

    Parameters / buffers: ``weight (E, H)`` (the HF gate layout), ``scores (E,)`` float32.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        k: int,
        *,
        feedback: float,
        eps: float = 0.01,
        balancer: AuxLossFreeBias | None = None,
        adapt: bool = True,
        renormalize: bool = False,
        score_func: str = "softmax",
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        name = "AdaptiveScoreRouter"
        num_experts = check_num_experts(name, num_experts, MIN_EXPERTS)
        self.feedback = check_feedback(name, feedback)
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 < float(eps) <= 1:
            raise ValueError(f"{name}: eps must be in (0, 1], got {eps!r}")
        if balancer is not None and (not isinstance(balancer, AuxLossFreeBias) or balancer.num_experts != num_experts):
            raise ValueError(
                f"{name}: balancer must be an AuxLossFreeBias over {num_experts} experts, got {balancer!r}"
            )
        self.eps = float(eps)
        self.k = k
        self.adapt = adapt
        self.balancer = balancer
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        self.register_buffer("scores", torch.full((num_experts,), 1 / num_experts, device=device))
        self.routing = RoutingConfig(score_func=score_func, renormalize=renormalize)
        self.backend = backend

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(..., E)`` routing logits ``hidden W^T + K s`` (float32 unless hidden is float64)."""
        gate = nn.functional.linear(hidden, self.weight)
        dtype = gate.dtype if gate.dtype == torch.float64 else torch.float32
        return torch.add(gate.to(dtype), self.scores.to(dtype), alpha=self.feedback)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bias = None if self.balancer is None else self.balancer.bias
        weights, ids = softmax_topk(self.logits(hidden), self.k, routing=self.routing, bias=bias, backend=self.backend)
        if self.training and self.adapt:
            self.update(ids)
        return weights, ids

    @torch.no_grad()
    def update(self, ids: torch.Tensor) -> torch.Tensor:
        """One score step from a batch's ids (any shape, values in ``[-1, E)``): ``s <- (1 -
        eps) s + eps f``, then the balancer's step; in place, no host sync. Returns ``scores``."""
        counts = expert_counts(ids.reshape(-1, 1), self.num_experts).to(torch.float32)
        # clamp: a batch with no valid id leaves the fractions at 0 instead of NaN.
        self.scores.lerp_(counts / counts.sum().clamp_min(1), self.eps)
        if self.balancer is not None:
            self.balancer.update(ids)
        return self.scores

    def extra_repr(self) -> str:
        num_experts, hidden = self.weight.shape
        return (
            f"hidden_size={hidden}, num_experts={num_experts}, k={self.k}, feedback={self.feedback}, "
            f"eps={self.eps}, adapt={self.adapt}, routing={self.routing}, backend={self.backend}"
        )
