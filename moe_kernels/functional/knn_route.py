"""Public fused kNN-MoE route: gather from a memory of logits, mix, gate + top-k in one kernel."""

from __future__ import annotations

import torch

from moe_kernels.config import KnnMixing, RoutingConfig
from moe_kernels.functional import _validate as check
from moe_kernels.ops.knn_route import KNN_ROUTE
from moe_kernels.utils import use_triton


def knn_route(
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
    """kNN-MoE routing in one op: ``knn_mix`` of the retrieved memory rows, then ``softmax_topk``.

    Args:
        router_logits: ``(T, E)`` float32 / float16 / bfloat16 logits of the frozen router
            (float64 with ``backend="torch"``).
        neighbor_ids: ``(T, n)`` int32 / int64 rows of ``memory_logits`` retrieved for each token
            (``RoutingMemory.search``'s ids), each in ``[0, N)``: checked on the host for CPU
            tensors (``ValueError``), with ``torch._assert_async`` on CUDA (a device-side assert;
            the Triton kernel checks them itself, gathers nothing for a bad id and sets the flag
            the assert reads) and under ``torch.compile``. faiss' ``-1`` ("no result") is out of
            range.
        neighbor_sims: ``(T, n)`` float similarities of those rows (cosine: at most 1).
        memory_logits: ``(N, E)`` float routing logits of the memory's cases, on the router's
            device.
        k, routing, bias: the routing of :func:`moe_kernels.softmax_topk`, applied to the mixed
            logits (``score_func``, ``renormalize``, ``num_groups``, ``topk_groups``,
            ``group_score``, ``scale``: :class:`~moe_kernels.RoutingConfig`'s fields as keywords,
            each overriding ``routing``'s).
        weighting, temperature, min_confidence: the mixing of :func:`moe_kernels.knn_mix`.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``, as for every op.

    Returns:
        ``weights (T, k)`` float32, ``ids (T, k)`` int32 and ``conf (T,)`` float32 (float64
        weights and conf for float64 router logits with ``backend="torch"``), where per token::

            conf    = clamp(mean(sims), 0, 1), 0 if below min_confidence or NaN
            w_j     = sims_j / sum(sims)  |  softmax(sims / temperature)_j
            mixed   = conf * sum_j w_j * memory_logits[neighbor_ids[t, j]] + (1 - conf) * router_logits
            weights, ids = softmax_topk(mixed, k, routing=routing, bias=bias)

        Where ``conf = 0`` (mean similarity <= 0 or below ``min_confidence``, or a NaN
        similarity) ``mixed`` is bit-exactly ``router_logits`` (in float32), whatever the memory
        rows hold, so the routing is bit-exactly the frozen router's ``softmax_topk``. Other
        non-finite similarities follow the formula (``+inf`` gives ``conf = 1`` and NaN
        weights ``w``, hence NaN mixed logits: NaN routing weights, ids still valid and
        distinct).

    The Triton path runs one kernel (no ``(T, E)`` intermediate in memory); it equals
    ``knn_mix`` followed by ``softmax_topk`` on the gathered rows.

    Gradient: ``weights`` is differentiable with respect to ``router_logits`` and, when it
    requires grad, ``memory_logits`` (``grad_memory`` accumulates ``conf * w_j * grad_mixed``
    over the rows each token retrieved, in float32; on CUDA through ``index_add_``'s atomics,
    so not bit-deterministic from run to run). ``ids`` and ``conf`` are not differentiable;
    similarities, ids and the bias get no gradient. Saved for backward: the four input tensors
    (no copies) and ``ids``; the backward recomputes the mixed logits.
    """
    op = "knn_route"
    check.tensor(op, "router_logits", router_logits, dtypes=check.FLOAT_DTYPES, dims=2, shape="(T, E)")
    check.tensor(op, "memory_logits", memory_logits, dtypes=check.FLOAT_DTYPES)
    if memory_logits.dim() != 2 or memory_logits.shape[0] < 1:
        raise ValueError(f"{op}: memory_logits must have shape (N, E) with N >= 1, got {tuple(memory_logits.shape)}")
    check.tensor(op, "memory_logits", memory_logits, device=router_logits.device, device_of="router_logits")
    num_experts = router_logits.shape[1]
    if memory_logits.shape[1] != num_experts:
        raise ValueError(
            f"{op}: memory_logits must have shape (N, E) = (N, {num_experts}) as router_logits (T, E) = "
            f"{tuple(router_logits.shape)}, got {tuple(memory_logits.shape)}"
        )
    check.mix_args(op, router_logits, neighbor_sims, weighting, temperature, min_confidence)
    check.neighbor_ids(op, neighbor_ids, router_logits, neighbor_sims)
    routing = check.routing_args(
        op, router_logits, k, bias, routing, score_func, renormalize, num_groups, topk_groups, group_score, scale
    )
    triton_path = use_triton(backend, router_logits.device, op)
    check.triton_routing(op, router_logits, routing, triton_path)
    # The Triton path checks the ids in its kernel (asserting on a flag afterwards): no separate
    # device check is queued for it.
    check.memory_rows(op, neighbor_ids, memory_logits, assert_on_device=not triton_path)
    mixing = KnnMixing.from_op_args(weighting, float(temperature), float(min_confidence))
    return KNN_ROUTE(router_logits, neighbor_ids, neighbor_sims, memory_logits, k, bias, routing, mixing, triton_path)
