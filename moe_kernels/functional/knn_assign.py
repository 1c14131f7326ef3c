"""kNN-MoE in assignment space (the paper's first version): mix top-k assignments, not logits."""

from __future__ import annotations

import torch

from moe_kernels.config import KnnMixing, RoutingConfig
from moe_kernels.cpu.knn import confidence_and_weights
from moe_kernels.functional import _validate as check
from moe_kernels.functional.routing import softmax_topk
from moe_kernels.utils import compute_dtype, use_triton


def knn_route_assignments(
    router_logits: torch.Tensor,
    neighbor_ids: torch.Tensor,
    neighbor_sims: torch.Tensor,
    memory_logits: torch.Tensor,
    k: int,
    *,
    routing: RoutingConfig | None = None,
    bias: torch.Tensor | None = None,
    weighting: str = "similarity",
    temperature: float = 0.1,
    min_confidence: float = 0.0,
    backend: str = "auto",
    score_func: str | None = None,
    renormalize: bool | None = None,
    num_groups: int | None = None,
    topk_groups: int | None = None,
    group_score: str | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """kNN-MoE routing mixed in assignment space (mode A of seed_algorithms.md §2.2).

    Per token, with ``G = softmax_topk(., k, routing=routing)`` (the native gate) and the confidence
    ``conf`` and neighbour weights ``w_j`` of :func:`moe_kernels.knn_mix`::

        assignment = (1 - conf) * G(router_logits) + conf * sum_j w_j * G(memory_logits[neighbor_ids[j]])

    a sparse vector over experts whose support is the union of the router's top k and every
    neighbour's: up to ``k * (n + 1)`` experts run, each with its mixed weight, as is.

    Args:
        router_logits: ``(T, E)``; neighbor_ids: ``(T, n)`` int into ``memory_logits (N, E)``;
            neighbor_sims: ``(T, n)``.
        k, routing, bias: the native gate's :func:`~moe_kernels.softmax_topk` arguments
            (``score_func``, ``renormalize``, ``num_groups``, ``topk_groups``, ``group_score``,
            ``scale``: :class:`~moe_kernels.RoutingConfig`'s fields as keywords, each overriding
            ``routing``'s).
        weighting, temperature, min_confidence, backend: as for :func:`~moe_kernels.knn_mix`.

    Returns:
        ``weights (T, k*(n+1))`` float32, ``ids (T, k*(n+1))`` int32 (at most E columns): the
        support by decreasing weight, then ``-1`` with weight 0 (understood by
        :func:`moe_kernels.fused_experts`), and ``conf (T,)`` float32. With ``conf = 0`` the
        experts and weights are the router's. Differentiable with respect to both logits tensors.
    """
    op = "knn_route_assignments"
    check.mix_args(op, router_logits, neighbor_sims, weighting, temperature, min_confidence)
    check.on_router_device(
        op, "memory_logits", memory_logits, router_logits, dtypes=check.FLOAT_DTYPES, dims=2, shape="(N, E)"
    )
    num_experts = router_logits.shape[1]
    if memory_logits.shape[1] != num_experts:
        raise ValueError(
            f"{op}: memory_logits must have shape (N, E) = (N, {num_experts}) as router_logits, got "
            f"{tuple(memory_logits.shape)}"
        )
    check.neighbor_ids(op, neighbor_ids, router_logits, neighbor_sims)
    check.memory_rows(op, neighbor_ids, memory_logits)
    # The gate's arguments are checked here, so that their errors name this op, not softmax_topk.
    routing = check.routing_args(
        op, router_logits, k, bias, routing, score_func, renormalize, num_groups, topk_groups, group_score, scale
    )
    use_triton(backend, router_logits.device, op)
    num_tokens, num_neighbors = neighbor_sims.shape
    neighbor_logits = memory_logits[neighbor_ids.long()]  # (T, n, E), differentiable
    dtype = compute_dtype(router_logits.dtype)
    mixing = KnnMixing(weighting, temperature, min_confidence)
    # Where conf = 0 the neighbours get no weight (w is 0 there).
    conf, _, mix = confidence_and_weights(neighbor_sims, mixing, dtype)
    gate = dict(routing=routing, bias=bias, backend=backend)
    router_weights, router_ids = softmax_topk(router_logits, k, **gate)
    neighbor_weights, neighbor_expert_ids = softmax_topk(neighbor_logits, k, **gate)
    dense = torch.zeros(num_tokens, num_experts, dtype=dtype, device=router_logits.device)
    dense = dense.scatter_add(1, router_ids.long(), (1 - conf)[:, None] * router_weights.to(dtype))
    scaled = (conf[:, None] * mix)[:, :, None] * neighbor_weights.to(dtype)  # (T, n, k)
    slots = num_neighbors * k  # not -1: with T = 0 the reshape could not infer it
    dense = dense.scatter_add(
        1, neighbor_expert_ids.long().reshape(num_tokens, slots), scaled.reshape(num_tokens, slots)
    )
    width = min(num_experts, k * (num_neighbors + 1))
    # The support is every nonzero mixed weight, of either sign (a negative scale, or similarity
    # weights of a token whose sims differ in sign, make some negative): it goes first, by
    # decreasing weight, then the -1 slots.
    support = dense != 0
    _, ids = torch.where(support, dense, torch.full_like(dense, float("-inf"))).topk(width, dim=1)
    weights = dense.gather(1, ids)
    chosen = support.gather(1, ids)
    return (
        torch.where(chosen, weights, torch.zeros_like(weights)).to(torch.float32 if dtype == torch.float32 else dtype),
        torch.where(chosen, ids, torch.full_like(ids, -1)).to(torch.int32),
        conf.to(torch.float32 if dtype == torch.float32 else dtype),
    )
