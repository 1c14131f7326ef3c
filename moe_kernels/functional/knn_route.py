"""Public fused kNN-MoE route: gather from a memory of logits, mix, gate + top-k in one kernel."""

from __future__ import annotations

import torch

from moe_kernels.functional import knn as _knn
from moe_kernels.functional import routing as _routing
from moe_kernels.functional.routing import LOGIT_DTYPES
from moe_kernels.ops.knn_route import (  # registers moe_kernels::knn_route
    KnnRouteFunction,
    knn_route_op,
)
from moe_kernels.utils import use_triton

ID_DTYPES = (torch.int32, torch.int64)


def knn_route(
    router_logits: torch.Tensor,
    neighbor_ids: torch.Tensor,
    neighbor_sims: torch.Tensor,
    memory_logits: torch.Tensor,
    k: int,
    *,
    renormalize: bool = False,
    score_func: str = "softmax",
    bias: torch.Tensor | None = None,
    num_groups: int | None = None,
    topk_groups: int | None = None,
    group_score: str = "top2_sum",
    scale: float = 1.0,
    weighting: str = "similarity",
    temperature: float = 0.1,
    min_confidence: float = 0.0,
    backend: str = "auto",
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
        k, renormalize, score_func, bias, num_groups, topk_groups, group_score, scale: the
            routing of :func:`moe_kernels.softmax_topk`, applied to the mixed logits.
        weighting, temperature, min_confidence: the mixing of :func:`moe_kernels.knn_mix`.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``, as for every op.

    Returns:
        ``weights (T, k)`` float32, ``ids (T, k)`` int32 and ``conf (T,)`` float32 (float64
        weights and conf for float64 router logits with ``backend="torch"``), where per token::

            conf    = clamp(mean(sims), 0, 1), 0 if below min_confidence or NaN
            w_j     = sims_j / sum(sims)  |  softmax(sims / temperature)_j
            mixed   = conf * sum_j w_j * memory_logits[neighbor_ids[t, j]] + (1 - conf) * router_logits
            weights, ids = softmax_topk(mixed, k, renormalize=..., score_func=..., bias=..., ...)

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
    _check_args(router_logits, neighbor_ids, neighbor_sims, memory_logits, k, renormalize, score_func, bias,
                num_groups, topk_groups, group_score, scale, weighting, temperature, min_confidence)
    triton_path = use_triton(backend, router_logits.device, "knn_route")
    if triton_path:
        _reprefixed(_routing._check_triton_limits, router_logits, router_logits.shape[1], num_groups)
    # The Triton path checks the ids in its kernel (asserting on a flag afterwards): no separate
    # device check is queued for it.
    _check_ids_in_range(neighbor_ids, memory_logits.shape[0], assert_on_device=not triton_path)
    route = knn_route_op if torch.compiler.is_compiling() else KnnRouteFunction.apply
    return route(
        router_logits,
        neighbor_ids,
        neighbor_sims,
        memory_logits,
        k,
        renormalize,
        score_func,
        bias,
        num_groups or 0,
        topk_groups or 0,
        group_score,
        float(scale),
        weighting,
        float(temperature),
        float(min_confidence),
        triton_path,
    )


def _reprefixed(check, *args):
    """Run another op's argument check, naming ``knn_route`` in its errors."""
    try:
        check(*args)
    except (TypeError, ValueError) as exc:
        message = str(exc)
        for prefix in ("softmax_topk: ", "knn_mix: "):
            message = message.removeprefix(prefix)
        raise type(exc)(f"knn_route: {message}") from None


def _check_args(router_logits, neighbor_ids, neighbor_sims, memory_logits, k, renormalize, score_func, bias,
                num_groups, topk_groups, group_score, scale, weighting, temperature, min_confidence):
    for name, tensor in (("router_logits", router_logits), ("neighbor_ids", neighbor_ids),
                         ("neighbor_sims", neighbor_sims), ("memory_logits", memory_logits)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"knn_route: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if memory_logits.dtype not in LOGIT_DTYPES:
        raise TypeError(f"knn_route: memory_logits must be float32, float16 or bfloat16, got {memory_logits.dtype}")
    if memory_logits.dim() != 2 or memory_logits.shape[0] < 1:
        raise ValueError(f"knn_route: memory_logits must have shape (N, E) with N >= 1, got {tuple(memory_logits.shape)}")
    if memory_logits.device != router_logits.device:
        raise ValueError(
            f"knn_route: memory_logits must be on router_logits' device {router_logits.device}, got {memory_logits.device}"
        )
    if router_logits.dim() == 2 and memory_logits.shape[1] != router_logits.shape[1]:
        raise ValueError(
            f"knn_route: memory_logits must have shape (N, E) = (N, {router_logits.shape[1]}) as router_logits "
            f"(T, E) = {tuple(router_logits.shape)}, got {tuple(memory_logits.shape)}"
        )
    # knn_mix's checks of the router logits, the similarities and the mixing options; a broadcast
    # view of one memory row stands in for the gathered (T, n, E) neighbours (nothing is read).
    num_tokens = router_logits.shape[0] if router_logits.dim() == 2 else 1
    num_neighbors = neighbor_sims.shape[1] if neighbor_sims.dim() == 2 else 1
    gathered = memory_logits[:1].expand(num_tokens, num_neighbors, memory_logits.shape[1])
    _reprefixed(_knn._check_args, router_logits, gathered, neighbor_sims, weighting, temperature, min_confidence)
    if neighbor_ids.dtype not in ID_DTYPES:
        raise TypeError(f"knn_route: neighbor_ids must be int32 or int64, got {neighbor_ids.dtype}")
    if tuple(neighbor_ids.shape) != tuple(neighbor_sims.shape):
        raise ValueError(
            f"knn_route: neighbor_ids must have shape (T, n) = {tuple(neighbor_sims.shape)} as neighbor_sims, "
            f"got {tuple(neighbor_ids.shape)}"
        )
    if neighbor_ids.device != router_logits.device:
        raise ValueError(
            f"knn_route: neighbor_ids must be on router_logits' device {router_logits.device}, got {neighbor_ids.device}"
        )
    _reprefixed(_routing._check_args, router_logits, k, renormalize, score_func, bias, num_groups, topk_groups,
                group_score, scale)


def _check_ids_in_range(neighbor_ids, num_rows, assert_on_device=True):
    """Every id in ``[0, num_rows)``: on the host for CPU tensors in eager mode, else with a
    device-side assert (no host sync: CUDA graphs and ``torch.compile`` keep working), unless
    ``assert_on_device`` is False (the caller's kernel checks)."""
    if neighbor_ids.numel() == 0:
        return
    if neighbor_ids.device.type == "cpu" and not torch.compiler.is_compiling():
        low, high = (int(v) for v in torch.aminmax(neighbor_ids))
        if low < 0 or high >= num_rows:
            raise ValueError(
                f"knn_route: neighbor_ids must lie in [0, N) = [0, {num_rows}) (the rows of memory_logits), "
                f"got values in [{low}, {high}]"
            )
        return
    if not assert_on_device:
        return
    in_range = ((neighbor_ids >= 0) & (neighbor_ids < num_rows)).all()
    torch._assert_async(in_range, f"knn_route: neighbor_ids must lie in [0, N) = [0, {num_rows})")
