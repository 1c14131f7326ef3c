"""Triton kernels of the kNN-MoE ops (launchers in ``ops/knn.py``).

The logit mixing op (``_knn_mix_fwd_kernel`` / ``_knn_mix_bwd_kernel``): a program owns ``BLOCK_T``
tokens and all ``E`` experts of each (one ``BLOCK_E`` wide tile, the expert dimension unit-stride);
the ``N`` neighbours are streamed one ``(BLOCK_T, BLOCK_E)`` tile at a time, so each neighbour row is
read once.

The fused route: ``_knn_route_fwd_kernel`` is ``knn_mix`` followed by ``softmax_topk`` in one pass.
A program owns ``BLOCK_T`` tokens and the padded expert row of each, in the routing forward
kernel's column layout (group-major, ``G_PAD * GS_PAD`` columns; fewer rows per program than the
routing kernel, see ``ops/knn.py``); it gathers the ``N`` retrieved rows of the memory of logits one
``(BLOCK_T, width)`` tile at a time, mixes them with the router's row in registers and routes the
mixed tile with the routing kernel's own selection code
(:func:`moe_kernels.kernels._routing.route_tile`). The mixed logits never reach memory.
``_knn_route_mixed_kernel`` recomputes the mixed logits ``(T, E)`` float32 for the backward (the
routing backward kernel needs them), with each token's ``conf`` and neighbour shares ``conf * w_j``.

The fused route checks its neighbour ids itself: an id outside the memory's ``M_rows`` rows gathers
nothing and clears the ``valid`` flag the launcher asserts on. Rows whose confidence is 0 read no
memory row.
"""

import triton
import triton.language as tl

from moe_kernels.kernels._routing import route_columns, route_tile


@triton.jit
def confidence_and_weights(
    sims_ptr,
    rows64,
    row_ok,
    stride_st,
    stride_sn,
    inv_temperature,
    min_confidence,
    N: tl.constexpr,
    N_PAD: tl.constexpr,
    SIMILARITY: tl.constexpr,
):
    """Load a ``[BLOCK_T, N_PAD]`` tile of similarities (padding 0) and return ``conf [BLOCK_T]``
    and the neighbour weights ``[BLOCK_T, N_PAD]``."""
    ncols = tl.arange(0, N_PAD)
    n_ok = (ncols < N)[None, :]
    sims = tl.load(
        sims_ptr + rows64[:, None] * stride_st + ncols[None, :] * stride_sn,
        mask=row_ok[:, None] & n_ok,
        other=0.0,
    ).to(tl.float32)
    conf = tl.sum(sims, axis=1) / N
    conf = tl.where(conf == conf, conf, 0.0)  # a NaN similarity falls back to the router
    conf = tl.minimum(tl.maximum(conf, 0.0), 1.0)
    conf = tl.where(conf < min_confidence, 0.0, conf)
    if SIMILARITY:
        # A sum <= 0 means conf == 0, where the weights are never used: divide by 1 instead, so
        # padding rows compute no NaN.
        total = tl.sum(sims, axis=1)
        weights = sims / tl.where(total == 0, 1.0, total)[:, None]
    else:
        scaled = tl.where(n_ok, sims * inv_temperature, float("-inf"))
        e = tl.exp(scaled - tl.max(scaled, axis=1)[:, None])
        weights = e / tl.sum(e, axis=1)[:, None]
    return conf, weights


@triton.jit
def _knn_mix_fwd_kernel(
    router_ptr,  # (T, E) float32/float16/bfloat16, row stride stride_rt
    neighbors_ptr,  # (T, N, E) float32/float16/bfloat16, strides stride_nt, stride_nn, 1
    sims_ptr,  # (T, N) any float, strides stride_st, stride_sn
    mixed_ptr,  # (T, E) float32, contiguous, written
    conf_ptr,  # (T,) float32, written
    T,
    E,
    stride_rt,
    stride_nt,
    stride_nn,
    stride_st,
    stride_sn,
    inv_temperature,
    min_confidence,
    N: tl.constexpr,
    N_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    SIMILARITY: tl.constexpr,
):
    """Grid ``(cdiv(T, BLOCK_T),)``: ``mixed = conf * sum_j w_j * neighbors_j + (1 - conf) *
    router`` for ``BLOCK_T`` tokens (exactly ``router`` where ``conf == 0``)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    ncols = tl.arange(0, N_PAD)
    rows64 = rows.to(tl.int64)
    row_ok = rows < T
    tile_mask = row_ok[:, None] & (cols < E)[None, :]
    conf, weights = confidence_and_weights(
        sims_ptr, rows64, row_ok, stride_st, stride_sn, inv_temperature, min_confidence, N, N_PAD, SIMILARITY
    )

    retrieved = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    for j in range(N):
        w_j = tl.sum(tl.where(ncols[None, :] == j, weights, 0.0), axis=1)
        x_j = tl.load(
            neighbors_ptr + rows64[:, None] * stride_nt + j * stride_nn + cols[None, :], mask=tile_mask, other=0.0
        )
        retrieved += w_j[:, None] * x_j.to(tl.float32)
    frozen = tl.load(router_ptr + rows64[:, None] * stride_rt + cols[None, :], mask=tile_mask, other=0.0)
    frozen = frozen.to(tl.float32)
    c = conf[:, None]
    mixed = tl.where(c > 0, c * retrieved + (1.0 - c) * frozen, frozen)
    tl.store(mixed_ptr + rows64[:, None] * E + cols[None, :], mixed, mask=tile_mask)
    tl.store(conf_ptr + rows64, conf, mask=row_ok)


@triton.jit
def _knn_mix_bwd_kernel(
    grad_mixed_ptr,  # (T, E) float32, row stride stride_gt, experts unit-stride
    sims_ptr,  # (T, N), strides stride_st, stride_sn
    grad_router_ptr,  # (T, E) router dtype, contiguous, written
    grad_neighbors_ptr,  # (T, N, E) neighbour dtype, contiguous, written
    T,
    E,
    stride_gt,
    stride_st,
    stride_sn,
    inv_temperature,
    min_confidence,
    N: tl.constexpr,
    N_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    SIMILARITY: tl.constexpr,
):
    """Grid ``(cdiv(T, BLOCK_T),)``: ``d router = (1 - conf) * g``, ``d neighbors_j = conf * w_j * g``."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    ncols = tl.arange(0, N_PAD)
    rows64 = rows.to(tl.int64)
    row_ok = rows < T
    tile_mask = row_ok[:, None] & (cols < E)[None, :]
    conf, weights = confidence_and_weights(
        sims_ptr, rows64, row_ok, stride_st, stride_sn, inv_temperature, min_confidence, N, N_PAD, SIMILARITY
    )
    share = tl.where(conf[:, None] > 0, conf[:, None] * weights, 0.0)
    g = tl.load(grad_mixed_ptr + rows64[:, None] * stride_gt + cols[None, :], mask=tile_mask, other=0.0)
    router_ty = grad_router_ptr.dtype.element_ty
    tl.store(
        grad_router_ptr + rows64[:, None] * E + cols[None, :], ((1.0 - conf[:, None]) * g).to(router_ty), mask=tile_mask
    )
    neighbor_ty = grad_neighbors_ptr.dtype.element_ty
    for j in range(N):
        s_j = tl.sum(tl.where(ncols[None, :] == j, share, 0.0), axis=1)
        tl.store(
            grad_neighbors_ptr + (rows64[:, None] * N + j) * E + cols[None, :],
            (s_j[:, None] * g).to(neighbor_ty),
            mask=tile_mask,
        )


@triton.jit
def _mixed_tile(
    tile,
    sources,
    strides,
    inv_temperature,
    min_confidence,
    N: tl.constexpr,
    N_PAD: tl.constexpr,
    SIMILARITY: tl.constexpr,
):
    """``mixed [BLOCK_T, BLOCK_W]`` float32 (0 where masked), ``conf [BLOCK_T]``, the weights
    ``[BLOCK_T, N_PAD]`` of the tokens of ``tile``, and how many of their neighbour ids lie
    outside the ``M_rows`` rows of the memory.

    ``tile`` is ``(rows, row_ok, expert, col_ok)`` from :func:`route_columns` (column ``c`` of the
    tile is expert ``expert[c]``); ``sources`` is ``(router_ptr, memory_ptr, M_rows, nbr_ids_ptr,
    sims_ptr)`` and ``strides`` is ``(stride_rt, stride_mn, stride_it, stride_in, stride_st,
    stride_sn)``, the kernels' arguments of those names (tuples, so that both kernels pass them in
    two short lines).

    Same arithmetic as ``_knn_mix_fwd_kernel`` on the gathered rows: ``mixed = conf * sum_j w_j *
    memory[ids_j] + (1 - conf) * router``, exactly ``router`` where ``conf == 0``. An id outside
    the memory gathers nothing (no access out of bounds; the launcher asserts on the count).
    """
    router_ptr, memory_ptr, M_rows, nbr_ids_ptr, sims_ptr = sources
    stride_rt, stride_mn, stride_it, stride_in, stride_st, stride_sn = strides
    rows, row_ok, expert, col_ok = tile
    rows64 = rows.to(tl.int64)
    BLOCK_T: tl.constexpr = rows.shape[0]
    BLOCK_W: tl.constexpr = expert.shape[0]
    ncols = tl.arange(0, N_PAD)
    tile_mask = row_ok[:, None] & col_ok[None, :]
    conf, weights = confidence_and_weights(
        sims_ptr, rows64, row_ok, stride_st, stride_sn, inv_temperature, min_confidence, N, N_PAD, SIMILARITY
    )
    # Tokens falling back to the router (conf 0) gather nothing.
    gather_mask = tile_mask & (conf > 0)[:, None]
    retrieved = tl.zeros([BLOCK_T, BLOCK_W], dtype=tl.float32)
    bad = tl.sum(tl.zeros([BLOCK_T], dtype=tl.int32), axis=0)
    for j in range(N):
        w_j = tl.sum(tl.where(ncols[None, :] == j, weights, 0.0), axis=1)
        row_j = tl.load(nbr_ids_ptr + rows64 * stride_it + j * stride_in, mask=row_ok, other=0).to(tl.int64)
        id_ok = (row_j >= 0) & (row_j < M_rows)
        bad += tl.sum((row_ok & ~id_ok).to(tl.int32), axis=0)
        x_j = tl.load(
            memory_ptr + (row_j * stride_mn)[:, None] + expert[None, :], mask=gather_mask & id_ok[:, None], other=0.0
        )
        retrieved += w_j[:, None] * x_j.to(tl.float32)
    frozen = tl.load(router_ptr + (rows64 * stride_rt)[:, None] + expert[None, :], mask=tile_mask, other=0.0)
    frozen = frozen.to(tl.float32)
    c = conf[:, None]
    mixed = tl.where(c > 0, c * retrieved + (1.0 - c) * frozen, frozen)
    return mixed, conf, weights, bad


@triton.jit
def _knn_route_fwd_kernel(
    router_ptr,  # (T, E) float32/float16/bfloat16, row stride stride_rt, experts unit-stride
    memory_ptr,  # (M, E) float, row stride stride_mn, experts unit-stride
    nbr_ids_ptr,  # (T, N) int32/int64 rows of the memory, strides stride_it, stride_in
    sims_ptr,  # (T, N) any float, strides stride_st, stride_sn
    bias_ptr,  # (E,) float32, read only when HAS_BIAS
    weights_ptr,  # (T, K) float32, contiguous, written
    ids_ptr,  # (T, K) int32, contiguous, written
    conf_ptr,  # (T,) float32, written
    valid_ptr,  # () int32, set to 0 if any neighbour id lies outside the memory (else untouched)
    T,
    E,
    M_rows,
    group_size,
    stride_rt,
    stride_mn,
    stride_it,
    stride_in,
    stride_st,
    stride_sn,
    inv_temperature,
    min_confidence,
    scale,
    N: tl.constexpr,
    N_PAD: tl.constexpr,
    SIMILARITY: tl.constexpr,
    ROUTING: tl.constexpr,
    BLOCK_T: tl.constexpr,
    CONTIGUOUS: tl.constexpr,
):
    """Grid ``(cdiv(T, BLOCK_T),)``: gather, mix and route ``BLOCK_T`` tokens; the column layout
    and the routing constexprs are those of ``_softmax_topk_fwd_kernel``."""
    tile = route_columns(T, E, group_size, BLOCK_T, ROUTING.G_PAD, ROUTING.GS_PAD, CONTIGUOUS)
    sources = (router_ptr, memory_ptr, M_rows, nbr_ids_ptr, sims_ptr)
    strides = (stride_rt, stride_mn, stride_it, stride_in, stride_st, stride_sn)
    mixed, conf, _, bad = _mixed_tile(tile, sources, strides, inv_temperature, min_confidence, N, N_PAD, SIMILARITY)
    if bad > 0:
        tl.atomic_min(valid_ptr, 0)
    rows, row_ok, _, _ = tile
    tl.store(conf_ptr + rows.to(tl.int64), conf, mask=row_ok)
    # The chosen scores come out of the score tile (RELOAD=False): the mixed logits are not in
    # memory, so router_ptr only fills the unused reload argument.
    route_tile(mixed, tile, bias_ptr, weights_ptr, ids_ptr, router_ptr, scale, ROUTING, False)


@triton.jit
def _knn_route_mixed_kernel(
    router_ptr,  # (T, E) float32/float16/bfloat16, row stride stride_rt, experts unit-stride
    memory_ptr,  # (M, E) float, row stride stride_mn, experts unit-stride
    nbr_ids_ptr,  # (T, N) int32/int64, strides stride_it, stride_in
    sims_ptr,  # (T, N) any float, strides stride_st, stride_sn
    mixed_ptr,  # (T, E) float32, contiguous, written
    conf_ptr,  # (T,) float32, written
    share_ptr,  # (T, N) float32, contiguous, written: conf * w_j (0 where conf == 0)
    T,
    E,
    M_rows,
    stride_rt,
    stride_mn,
    stride_it,
    stride_in,
    stride_st,
    stride_sn,
    inv_temperature,
    min_confidence,
    N: tl.constexpr,
    N_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    SIMILARITY: tl.constexpr,
):
    """Grid ``(cdiv(T, BLOCK_T),)``: the backward's recompute of the mixed logits (bit-identical
    to the forward's tile), the confidences and the neighbour shares ``conf * w_j``."""
    tile = route_columns(T, E, E, BLOCK_T, 1, BLOCK_E, True)  # column c is expert c
    sources = (router_ptr, memory_ptr, M_rows, nbr_ids_ptr, sims_ptr)
    strides = (stride_rt, stride_mn, stride_it, stride_in, stride_st, stride_sn)
    mixed, conf, weights, _ = _mixed_tile(tile, sources, strides, inv_temperature, min_confidence, N, N_PAD, SIMILARITY)
    rows, row_ok, cols, col_ok = tile
    rows64 = rows.to(tl.int64)
    ncols = tl.arange(0, N_PAD)
    tl.store(mixed_ptr + rows64[:, None] * E + cols[None, :], mixed, mask=row_ok[:, None] & col_ok[None, :])
    tl.store(conf_ptr + rows64, conf, mask=row_ok)
    share = tl.where(conf[:, None] > 0, conf[:, None] * weights, 0.0)
    tl.store(share_ptr + rows64[:, None] * N + ncols[None, :], share, mask=row_ok[:, None] & (ncols < N)[None, :])
