"""kNN-MoE in assignment space (the paper's first version): mix top-k assignments, not logits."""

from __future__ import annotations

import torch

from moe_kernels.functional.knn import _check_args as _check_mix_args
from moe_kernels.functional.routing import softmax_topk
from moe_kernels.reference.knn import gather_neighbors, knn_confidence_and_weights
from moe_kernels.reference.routing import compute_dtype


def knn_route_assignments(
    router_logits: torch.Tensor,
    neighbor_ids: torch.Tensor,
    neighbor_sims: torch.Tensor,
    memory_logits: torch.Tensor,
    k: int,
    *,
    weighting: str = "similarity",
    temperature: float = 0.1,
    min_confidence: float = 0.0,
    backend: str = "auto",
    **routing,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """kNN-MoE routing mixed in assignment space (mode A of seed_algorithms.md §2.2).

    Per token, with ``G = softmax_topk(., k, **routing)`` (the native gate) and the confidence
    ``conf`` and neighbour weights ``w_j`` of :func:`moe_kernels.knn_mix`::

        assignment = (1 - conf) * G(router_logits) + conf * sum_j w_j * G(memory_logits[neighbor_ids[j]])

    a sparse vector over experts whose support is the union of the router's top k and every
    neighbour's: up to ``k * (n + 1)`` experts run, each with its mixed weight, as is.

    Args:
        router_logits: ``(T, E)``; neighbor_ids: ``(T, n)`` int into ``memory_logits (N, E)``;
            neighbor_sims: ``(T, n)``; k and ``routing``: the native gate's :func:`softmax_topk`
            arguments; weighting, temperature, min_confidence, backend: as for ``knn_mix``.

    Returns:
        ``weights (T, k*(n+1))`` float32, ``ids (T, k*(n+1))`` int32 (at most E columns): the
        support by decreasing weight, then ``-1`` with weight 0 (understood by
        :func:`moe_kernels.fused_experts`), and ``conf (T,)`` float32. With ``conf = 0`` the
        experts and weights are the router's. Differentiable with respect to both logits tensors.
    """
    num_tokens, num_neighbors = neighbor_sims.shape if neighbor_sims.dim() == 2 else (0, 0)
    if not isinstance(memory_logits, torch.Tensor) or memory_logits.dim() != 2:
        raise ValueError(f"knn_route_assignments: memory_logits must be an (N, E) tensor, got {memory_logits!r:.60}")
    if not isinstance(neighbor_ids, torch.Tensor) or neighbor_ids.shape != neighbor_sims.shape or neighbor_ids.is_floating_point():
        raise ValueError(
            f"knn_route_assignments: neighbor_ids must be an integer tensor shaped like neighbor_sims "
            f"{tuple(neighbor_sims.shape)}, got {getattr(neighbor_ids, 'shape', neighbor_ids)}"
        )
    in_range = ((neighbor_ids >= 0) & (neighbor_ids < memory_logits.shape[0])).all()
    message = f"knn_route_assignments: neighbor_ids must be in [0, N={memory_logits.shape[0]})"
    if neighbor_ids.device.type == "cuda" or torch.compiler.is_compiling():
        torch._assert_async(in_range, message)  # no host sync
    elif not bool(in_range):
        raise ValueError(message)
    neighbor_logits = gather_neighbors(memory_logits, neighbor_ids)
    _check_mix_args(router_logits, neighbor_logits, neighbor_sims, weighting, temperature, min_confidence)
    num_experts = router_logits.shape[1]
    dtype = compute_dtype(router_logits.dtype)
    conf, mix = knn_confidence_and_weights(neighbor_sims, weighting, temperature, min_confidence, dtype)
    # Where conf = 0 the neighbours get no weight (their weights may be NaN, e.g. sims summing to 0).
    mix = torch.where(conf[:, None] > 0, mix, torch.zeros_like(mix))
    router_weights, router_ids = softmax_topk(router_logits, k, backend=backend, **routing)
    neighbor_weights, neighbor_expert_ids = softmax_topk(neighbor_logits, k, backend=backend, **routing)
    dense = torch.zeros(num_tokens, num_experts, dtype=dtype, device=router_logits.device)
    dense = dense.scatter_add(1, router_ids.long(), (1 - conf)[:, None] * router_weights.to(dtype))
    scaled = (conf[:, None] * mix)[:, :, None] * neighbor_weights.to(dtype)  # (T, n, k)
    dense = dense.scatter_add(1, neighbor_expert_ids.long().reshape(num_tokens, -1), scaled.reshape(num_tokens, -1))
    width = min(num_experts, k * (num_neighbors + 1))
    weights, ids = dense.topk(width, dim=1)
    chosen = weights > 0
    return (
        torch.where(chosen, weights, torch.zeros_like(weights)).to(torch.float32 if dtype == torch.float32 else dtype),
        torch.where(chosen, ids, torch.full_like(ids, -1)).to(torch.int32),
        conf.to(torch.float32 if dtype == torch.float32 else dtype),
    )
