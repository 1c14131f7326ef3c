"""``knn_mix`` and ``knn_route`` on the CPU: the functions of :mod:`moe_kernels.reference.knn` in
fewer passes.

- The confidence and the neighbour weights come from one row sum of the similarities (``conf =
  clamp(sum / n, 0, 1)``, ``w = sims / sum``); rows with ``conf = 0`` (NaN, non-positive or below
  ``min_confidence``) are masked once.
- The mix is one batched matrix product ``w @ neighbour_logits`` (no ``(T, n, E)`` temporary)
  and one ``addcmul`` with the router's logits; ``knn_route`` gathers and sums the memory rows in
  one ``embedding_bag`` (no ``(T, n, E)`` gather at all) for float32 memories.
- ``knn_route`` then routes with :func:`moe_kernels.cpu.routing.softmax_topk`.

Rows with ``conf = 0`` are the router's logits bit for bit (a final ``where``), whatever the
neighbours hold, as the reference promises.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_kernels.config import KnnMixing
from moe_kernels.cpu import routing as cpu_routing
from moe_kernels.utils import compute_dtype, is_batch_invariant

# Gathered rows (T * n) above which the memory rows are summed by embedding_bag.
EMBEDDING_BAG_MIN_ROWS = 64


def confidence_and_weights(neighbor_sims: torch.Tensor, mixing: KnnMixing, dtype: torch.dtype):
    """``(conf (T,), live (T, 1) bool, w (T, n))``: the reference's confidence (0 where NaN,
    non-positive or below ``min_confidence``), the rows where it is positive, and the neighbour
    weights, 0 on rows that are not live (where the reference's may be NaN, e.g. sims summing
    to 0). Plain tensor ops on ``neighbor_sims``' device (``knn_route_assignments`` uses it on
    every device)."""
    sims = neighbor_sims.to(dtype)
    total = sims.sum(dim=-1, keepdim=True)
    conf = (total / sims.shape[-1]).clamp_(0.0, 1.0)  # NaN stays NaN: not live below
    live = conf > 0.0 if mixing.min_confidence <= 0.0 else conf >= mixing.min_confidence
    if mixing.weighting == "similarity":
        weights = sims / total
    else:
        weights = torch.softmax(sims / mixing.temperature, dim=-1)
    weights = torch.where(live, weights, 0.0)
    return torch.where(live, conf, 0.0).squeeze(-1), live, weights


def _mix(frozen: torch.Tensor, retrieved: torch.Tensor, conf: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """``where(live, (1 - conf) * frozen + conf * retrieved, frozen)``."""
    # Not ``lerp``: past a weight of 0.5 it computes ``end - (end - start) * (1 - weight)``,
    # NaN for an infinite ``end`` at ``conf = 1`` where the reference's sum is infinite.
    c = conf[:, None]
    return torch.where(live, torch.addcmul(frozen * (1.0 - c), retrieved, c), frozen)


def knn_mix(
    router_logits: torch.Tensor, neighbor_logits: torch.Tensor, neighbor_sims: torch.Tensor, mixing: KnnMixing
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`moe_kernels.reference.knn.knn_mix` on the CPU (no autograd): ``mixed (T, E)`` and
    ``conf (T,)`` in the compute dtype, fresh and contiguous."""
    dtype = compute_dtype(router_logits.dtype)
    conf, live, weights = confidence_and_weights(neighbor_sims, mixing, dtype)
    retrieved = torch.bmm(weights.unsqueeze(1), neighbor_logits.to(dtype)).squeeze(1)
    return _mix(router_logits.to(dtype), retrieved, conf, live), conf


def knn_mix_backward(grad_mixed, neighbor_sims, *, mixing, router_dtype, neighbor_dtype):
    """:func:`moe_kernels.reference.knn.knn_mix_backward` on the CPU: ``grad_router (T, E)`` and
    ``grad_neighbors (T, n, E)``."""
    dtype = compute_dtype(router_dtype)
    conf, _, weights = confidence_and_weights(neighbor_sims, mixing, dtype)
    grad = grad_mixed.to(dtype)
    grad_router = grad * (1.0 - conf)[:, None]
    grad_neighbors = (weights * conf[:, None]).unsqueeze(-1) * grad.unsqueeze(1)
    return grad_router.to(router_dtype), grad_neighbors.to(neighbor_dtype)


def _retrieved(memory_logits, neighbor_ids, weights, dtype):
    """``sum_j w_j memory_logits[neighbor_ids[:, j]]`` ``(T, E)``: one ``embedding_bag`` for many
    rows of a memory in the compute dtype (no gathered copy: 3.5x faster than gathering at
    T = 1024, n = 8), else the gather and a batched product (cheaper to launch for a few rows: 6.0
    against 8.4 us at T = 1, n = 8, E = 64). The two round differently, so in batch-invariant mode
    a memory in the compute dtype always takes the ``embedding_bag``."""
    many = neighbor_ids.numel() > EMBEDDING_BAG_MIN_ROWS or is_batch_invariant()
    if memory_logits.dtype == dtype and many:
        return F.embedding_bag(neighbor_ids, memory_logits, per_sample_weights=weights, mode="sum")
    gathered = memory_logits[neighbor_ids.long()].to(dtype)
    return torch.bmm(weights.unsqueeze(1), gathered).squeeze(1)


def mixed_logits(router_logits, neighbor_ids, neighbor_sims, memory_logits, mixing: KnnMixing):
    """``(mixed (T, E), conf (T,), weights (T, n))`` of the fused route, in the compute dtype."""
    dtype = compute_dtype(router_logits.dtype)
    conf, live, weights = confidence_and_weights(neighbor_sims, mixing, dtype)
    retrieved = _retrieved(memory_logits, neighbor_ids, weights, dtype)
    return _mix(router_logits.to(dtype), retrieved, conf, live), conf, weights


def knn_route(router_logits, neighbor_ids, neighbor_sims, memory_logits, k, routing, bias, mixing):
    """:func:`moe_kernels.reference.knn.knn_route` on the CPU (no autograd): ``weights (T, k)``,
    ``ids (T, k)`` int32 and ``conf (T,)``."""
    mixed, conf, _ = mixed_logits(router_logits, neighbor_ids, neighbor_sims, memory_logits, mixing)
    weights, ids = cpu_routing.softmax_topk(mixed, k, routing, bias)
    return weights, ids, conf


def knn_route_backward(
    grad_weights, router_logits, neighbor_ids, neighbor_sims, memory_logits, ids, *, routing, mixing, memory_grad=True
):
    """:func:`moe_kernels.reference.knn.knn_route_backward` on the CPU: ``grad_router (T, E)`` in
    the router's dtype and ``grad_memory (N, E)`` in the memory's (None unless ``memory_grad``),
    accumulated in the compute dtype by one ``index_add_``."""
    mixed, conf, weights = mixed_logits(router_logits, neighbor_ids, neighbor_sims, memory_logits, mixing)
    grad_mixed = cpu_routing.softmax_topk_backward(grad_weights, mixed, ids, routing=routing)
    grad_router = (grad_mixed * (1.0 - conf)[:, None]).to(router_logits.dtype)
    if not memory_grad:
        return grad_router, None
    num_tokens, num_neighbors = neighbor_ids.shape
    share = weights * conf[:, None]  # (T, n)
    rows = (share.unsqueeze(-1) * grad_mixed.unsqueeze(1)).reshape(num_tokens * num_neighbors, mixed.shape[1])
    grad_memory = torch.zeros(memory_logits.shape, dtype=grad_mixed.dtype)
    grad_memory.index_add_(0, neighbor_ids.reshape(-1), rows)
    return grad_router, grad_memory.to(memory_logits.dtype)
