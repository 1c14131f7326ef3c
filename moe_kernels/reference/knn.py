"""Pure-PyTorch reference of the kNN-MoE logit mixing op (semantics on
:func:`moe_kernels.knn_mix`). Computes in float32 (float64 for float64 router logits)."""

from __future__ import annotations

import torch

from moe_kernels.reference.routing import compute_dtype


def knn_confidence_and_weights(
    neighbor_sims: torch.Tensor, weighting: str, temperature: float, min_confidence: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``conf (T,)`` = mean similarity clamped to [0, 1] (0 for NaN or below ``min_confidence``)
    and the neighbour weights ``(T, n)``: ``sims / sum(sims)`` or ``softmax(sims / temperature)``."""
    sims = neighbor_sims.to(dtype)
    conf = sims.mean(dim=-1)
    conf = torch.where(torch.isnan(conf), torch.zeros_like(conf), conf).clamp(0.0, 1.0)
    conf = torch.where(conf < min_confidence, torch.zeros_like(conf), conf)
    if weighting == "similarity":
        weights = sims / sims.sum(dim=-1, keepdim=True)
    elif weighting == "softmax":
        weights = torch.softmax(sims / temperature, dim=-1)
    else:
        raise ValueError(f"weighting must be 'similarity' or 'softmax', got {weighting!r}")
    return conf, weights


def knn_mix(
    router_logits: torch.Tensor,
    neighbor_logits: torch.Tensor,
    neighbor_sims: torch.Tensor,
    *,
    weighting: str = "similarity",
    temperature: float = 0.1,
    min_confidence: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`moe_kernels.knn_mix` (arguments assumed valid): ``mixed (T, E)`` and
    ``conf (T,)``, float32 (float64 for float64 router logits), differentiable with respect to
    both logits tensors (the similarities are treated as constants)."""
    dtype = compute_dtype(router_logits.dtype)
    conf, weights = knn_confidence_and_weights(neighbor_sims.detach(), weighting, temperature, min_confidence, dtype)
    retrieved = (weights.unsqueeze(-1) * neighbor_logits.to(dtype)).sum(dim=-2)
    frozen = router_logits.to(dtype)
    c = conf.unsqueeze(-1)
    # Where conf is 0 the frozen logits pass through untouched (bit-exact, and free of whatever
    # the weights hold when the similarities sum to 0).
    mixed = torch.where(c > 0, c * retrieved + (1.0 - c) * frozen, frozen)
    return mixed, conf


def knn_mix_backward(
    grad_mixed: torch.Tensor,
    neighbor_sims: torch.Tensor,
    *,
    weighting: str,
    temperature: float,
    min_confidence: float,
    router_dtype: torch.dtype,
    neighbor_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``knn_mix`` written out: ``grad_router (T, E)`` in ``router_dtype`` and
    ``grad_neighbors (T, n, E)`` in ``neighbor_dtype``."""
    dtype = compute_dtype(router_dtype)
    conf, weights = knn_confidence_and_weights(neighbor_sims, weighting, temperature, min_confidence, dtype)
    grad = grad_mixed.to(dtype)
    c = conf.unsqueeze(-1)
    share = torch.where(c > 0, c * weights, torch.zeros_like(weights))  # (T, n)
    grad_router = (1.0 - c) * grad
    grad_neighbors = share.unsqueeze(-1) * grad.unsqueeze(-2)
    return grad_router.to(router_dtype), grad_neighbors.to(neighbor_dtype)
