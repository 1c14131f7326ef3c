"""Pure-PyTorch references of the kNN-MoE logit mixing op and of the fused kNN route
(semantics on :func:`moe_kernels.knn_mix` and :func:`moe_kernels.functional.knn_route.knn_route`).
Compute in float32 (float64 for float64 router logits)."""

from __future__ import annotations

import torch

from moe_kernels.config import DEFAULT_MIXING, DEFAULT_ROUTING, KnnMixing
from moe_kernels.reference.routing import softmax_topk, softmax_topk_backward
from moe_kernels.utils import compute_dtype


def knn_confidence_and_weights(
    neighbor_sims: torch.Tensor, mixing: KnnMixing, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``conf (T,)`` = mean similarity clamped to [0, 1] (0 for NaN or below ``min_confidence``)
    and the neighbour weights ``(T, n)``: ``sims / sum(sims)`` or ``softmax(sims / temperature)``."""
    sims = neighbor_sims.to(dtype)
    conf = sims.mean(dim=-1)
    conf = torch.where(torch.isnan(conf), torch.zeros_like(conf), conf).clamp(0.0, 1.0)
    conf = torch.where(conf < mixing.min_confidence, torch.zeros_like(conf), conf)
    if mixing.weighting == "similarity":
        weights = sims / sims.sum(dim=-1, keepdim=True)
    elif mixing.weighting == "softmax":
        weights = torch.softmax(sims / mixing.temperature, dim=-1)
    else:
        raise ValueError(f"weighting must be 'similarity' or 'softmax', got {mixing.weighting!r}")
    return conf, weights


def knn_mix(router_logits, neighbor_logits, neighbor_sims, *, mixing=DEFAULT_MIXING):
    """Reference of :func:`moe_kernels.knn_mix` (arguments assumed valid): ``router_logits (T, E)``,
    ``neighbor_logits (T, n, E)``, ``neighbor_sims (T, n)`` and the :class:`~moe_kernels.config.KnnMixing`
    -> ``mixed (T, E)`` and ``conf (T,)``, float32 (float64 for float64 router logits),
    differentiable with respect to both logits tensors (the similarities are treated as constants)."""
    dtype = compute_dtype(router_logits.dtype)
    conf, weights = knn_confidence_and_weights(neighbor_sims.detach(), mixing, dtype)
    retrieved = (weights.unsqueeze(-1) * neighbor_logits.to(dtype)).sum(dim=-2)
    frozen = router_logits.to(dtype)
    c = conf.unsqueeze(-1)
    # Where conf is 0 the frozen logits pass through untouched (bit-exact, and free of whatever
    # the weights hold when the similarities sum to 0).
    mixed = torch.where(c > 0, c * retrieved + (1.0 - c) * frozen, frozen)
    return mixed, conf


def knn_mix_backward(grad_mixed, neighbor_sims, *, mixing, router_dtype, neighbor_dtype):
    """Gradients of ``knn_mix`` written out: ``grad_router (T, E)`` in ``router_dtype`` and
    ``grad_neighbors (T, n, E)`` in ``neighbor_dtype``."""
    dtype = compute_dtype(router_dtype)
    conf, weights = knn_confidence_and_weights(neighbor_sims, mixing, dtype)
    grad = grad_mixed.to(dtype)
    c = conf.unsqueeze(-1)
    share = torch.where(c > 0, c * weights, torch.zeros_like(weights))  # (T, n)
    grad_router = (1.0 - c) * grad
    grad_neighbors = share.unsqueeze(-1) * grad.unsqueeze(-2)
    return grad_router.to(router_dtype), grad_neighbors.to(neighbor_dtype)


def gather_neighbors(memory_logits: torch.Tensor, neighbor_ids: torch.Tensor) -> torch.Tensor:
    """``memory_logits (N, E)`` rows ``neighbor_ids (T, n)`` -> ``(T, n, E)`` (differentiable)."""
    return memory_logits[neighbor_ids.long()]


def knn_route(
    router_logits,
    neighbor_ids,
    neighbor_sims,
    memory_logits,
    k,
    *,
    routing=DEFAULT_ROUTING,
    bias=None,
    mixing=DEFAULT_MIXING,
):
    """Reference of the fused kNN route (arguments assumed valid): the gather of the retrieved
    rows, :func:`knn_mix` and :func:`moe_kernels.reference.routing.softmax_topk`.

    ``router_logits (T, E)`` float, ``neighbor_ids (T, n)`` int rows of ``memory_logits (N, E)``,
    ``neighbor_sims (T, n)`` float, ``k`` int; ``routing`` and ``bias`` route the mixed logits,
    ``mixing`` mixes them.

    Returns ``weights (T, k)``, ``ids (T, k)`` int32 and ``conf (T,)`` (float32, float64 for
    float64 router logits); ``weights`` is differentiable with respect to ``router_logits`` and
    ``memory_logits``."""
    neighbors = gather_neighbors(memory_logits, neighbor_ids)
    mixed, conf = knn_mix(router_logits, neighbors, neighbor_sims, mixing=mixing)
    weights, ids = softmax_topk(mixed, k, routing=routing, bias=bias)
    return weights, ids, conf


def knn_route_backward(
    grad_weights, router_logits, neighbor_ids, neighbor_sims, memory_logits, ids, *, routing, mixing, memory_grad=True
):
    """Gradients of ``knn_route``'s weights written out: the mixed logits are recomputed, the
    routing backward gives ``grad_mixed``, then ``grad_router = (1 - conf) * grad_mixed`` (in
    ``router_logits.dtype``) and, when ``memory_grad``, ``grad_memory (N, E)`` (in
    ``memory_logits.dtype``, accumulated in the compute dtype) = the index-add over
    ``neighbor_ids`` of ``conf * w_j * grad_mixed`` (``None`` otherwise). The similarities, the
    bias and the group settings get no gradient.

    ``grad_weights (T, k)``, ``ids (T, k)`` int32 and the forward's inputs and options."""
    with torch.no_grad():
        neighbors = gather_neighbors(memory_logits, neighbor_ids)
        mixed, _ = knn_mix(router_logits, neighbors, neighbor_sims, mixing=mixing)
    grad_mixed = softmax_topk_backward(grad_weights, mixed, ids, routing=routing)
    grad_router, grad_neighbors = knn_mix_backward(
        grad_mixed, neighbor_sims, mixing=mixing, router_dtype=router_logits.dtype, neighbor_dtype=grad_mixed.dtype
    )
    if not memory_grad:
        return grad_router, None
    num_experts = memory_logits.shape[1]
    grad_memory = torch.zeros(memory_logits.shape, dtype=grad_mixed.dtype, device=grad_mixed.device)
    grad_memory.index_add_(0, neighbor_ids.reshape(-1), grad_neighbors.reshape(-1, num_experts))
    return grad_router, grad_memory.to(memory_logits.dtype)
