"""Public kNN-MoE ops: the logit mixing (``knn_mix``), the fused route (``knn_route``: gather
from a memory of logits, mix, gate + top-k in one kernel) and the assignment-space mix of the
paper's first version (``knn_route_assignments``)."""

from __future__ import annotations

import torch

from moe_kernels.config import KnnMixing, RoutingConfig
from moe_kernels.cpu.knn import confidence_and_weights
from moe_kernels.functional import _checks as check
from moe_kernels.functional.routing import softmax_topk
from moe_kernels.ops.knn import KNN_MIX, KNN_ROUTE
from moe_kernels.utils import compute_dtype, use_triton


def knn_mix(
    router_logits: torch.Tensor,
    neighbor_logits: torch.Tensor,
    neighbor_sims: torch.Tensor,
    *,
    weighting: str = "similarity",
    temperature: float = 0.1,
    min_confidence: float = 0.0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix a frozen router's logits with retrieved routing logits (kNN-MoE, logit space).

    Args:
        router_logits: ``(T, E)`` float32 / float16 / bfloat16 logits of the frozen router.
        neighbor_logits: ``(T, n, E)`` float logits of each token's ``n`` retrieved cases.
        neighbor_sims: ``(T, n)`` float similarities of those cases (cosine: at most 1).
        weighting: neighbour weights ``w``: ``"similarity"`` (``sims / sum(sims)``) or
            ``"softmax"`` (``softmax(sims / temperature)``, kNN-LM style).
        temperature: of the ``"softmax"`` weighting, > 0.
        min_confidence: confidences below this are set to 0 (hard fallback), in [0, 1].
        backend: ``"auto"``, ``"triton"`` or ``"torch"``, as for every op.

    Returns:
        ``mixed (T, E)`` float32 and ``conf (T,)`` float32 (float64 for float64 router logits
        with ``backend="torch"``), where per token::

            conf  = clamp(mean(sims), 0, 1), 0 if below min_confidence or NaN
            mixed = conf * sum_j w_j * neighbor_logits_j + (1 - conf) * router_logits

        With ``conf = 0`` (no relevant case, or a NaN similarity) ``mixed`` is bit-exactly the
        router's logits, whatever the neighbours hold.

    Gradients flow to ``router_logits`` and ``neighbor_logits`` (hence to a memory of logits
    they were gathered from); similarities come from a search and are treated as constants.
    Saved for backward: ``neighbor_sims`` only.
    """
    check.mix_args("knn_mix", router_logits, neighbor_sims, weighting, temperature, min_confidence)
    check.on_router_device(
        "knn_mix",
        "neighbor_logits",
        neighbor_logits,
        router_logits,
        dtypes=check.FLOAT_DTYPES,
        dims=3,
        shape="(T, n, E)",
    )
    num_tokens, num_experts = router_logits.shape
    check.shape_is(
        "knn_mix",
        "neighbor_logits",
        neighbor_logits,
        (num_tokens, neighbor_sims.shape[1], num_experts),
        lambda: f"(T, n, E) = ({num_tokens}, {neighbor_sims.shape[1]}, {num_experts})",
    )
    triton_path = use_triton(backend, router_logits.device, "knn_mix")
    check.not_float64_on_triton("knn_mix", "router_logits", router_logits, triton_path)
    mixing = KnnMixing.from_op_args(weighting, float(temperature), float(min_confidence))
    return KNN_MIX(router_logits, neighbor_logits, neighbor_sims, mixing, triton_path)


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
    k = check.count(op, "k", k)
    options = (score_func, renormalize, num_groups, topk_groups, group_score, scale)
    routing, triton_path = check.routing_call(op, router_logits, k, bias, routing, options, backend)
    # The Triton path checks the ids in its kernel (asserting on a flag afterwards): no separate
    # device check is queued for it.
    check.memory_rows(op, neighbor_ids, memory_logits, assert_on_device=not triton_path)
    mixing = KnnMixing.from_op_args(weighting, float(temperature), float(min_confidence))
    return KNN_ROUTE(router_logits, neighbor_ids, neighbor_sims, memory_logits, k, bias, routing, mixing, triton_path)


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
    """kNN-MoE routing mixed in assignment space (the paper's assignment-level variant: the
    native gate's and the neighbours' top-k assignments combined, rather than their logits).

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
    k = check.count(op, "k", k)
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
