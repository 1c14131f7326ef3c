"""Triton kernels of the kNN-MoE logit mixing op (launchers in ``ops/knn.py``).

A program owns ``BLOCK_T`` tokens and all ``E`` experts of each (one ``BLOCK_E`` wide tile, the
expert dimension unit-stride); the ``N`` neighbours are streamed one ``(BLOCK_T, BLOCK_E)`` tile at
a time, so each neighbour row is read once.
"""

import triton
import triton.language as tl


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
