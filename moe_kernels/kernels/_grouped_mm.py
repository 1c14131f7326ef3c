"""Triton kernels of the grouped GEMM (launchers in ``ops/grouped_mm.py``).

``torch._grouped_mm`` convention: ``a (M, K)``, ``b (G, K, N)``, ``group_end (G,)`` int32
cumulative end rows; rows ``group_end[g-1]:group_end[g]`` (from 0 for ``g = 0``) are multiplied by
``b[g]``, rows at or past ``group_end[-1]`` are zero.

- :func:`_grouped_mm_kernel`: ``C[r] = scale[r] * A[src(r)] @ B[group(r)]``, one
  ``(BLOCK_M, BLOCK_N)`` output tile per program. The grid has a fixed worst-case size computed on
  the host from shapes only (no host sync, CUDA-graph safe): splitting ``M_out`` rows into
  ``G + 1`` segments (the groups, then the zero tail) takes at most ``cdiv(M_out, BLOCK_M) + G``
  row tiles, because each segment adds at most one partial tile. Each program finds its group and
  first row from the group ends on the device, then computes a group tile, a zero tile of the tail,
  or nothing (a spare program).
- :func:`_grouped_mm_weight_grad_kernel`: ``dB[g] = A_g^T @ (scale * dC)_g``, one
  ``(BLOCK_K_OUT, BLOCK_N)`` tile of one group per program, reducing over the group's rows.

Both take ``GATHER_A`` (row ``r`` of the product reads ``A[a_rows[r]]``: MoE's token gather) and
``SCALE_ROWS`` (row ``r`` of ``C``, or of ``dC``, times ``row_scale[r]`` float32), so that the fused
experts op can reuse them; the forward also takes ``GATED`` (the up projection with the gated
activation of ``_experts.py`` in its epilogue). Every index is masked to ``[0, M_out)`` and the group ends are clamped,
so malformed group ends (not monotone, past ``M_out``) give wrong values but never an access out of
bounds (with ``GATHER_A`` the caller guarantees ``0 <= a_rows < rows of A``).

Strides are general (a transposed view of ``b`` needs no copy) and row offsets are computed in
int64. Accumulation is float32 (``tl.dot``); ``INPUT_PRECISION`` is ``"ieee"`` for float32 inputs
(no TF32, as torch's default matmul) and ignored for 16-bit inputs.
"""

import triton
import triton.language as tl

from moe_kernels.kernels.activations import gate_up_offsets, gated_activation


@triton.jit
def _find_row_tile(group_end_ptr, G, M_out, pid_m, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr):
    """Row tile ``pid_m`` of the grouped layout: ``(group, first row, end row, found)``.

    Group ``g`` owns tiles ``[T_g, T_g + cdiv(count_g, BLOCK_M))`` with ``T_g`` the tiles of the
    groups before it; a scan of ``BLOCK_G`` group ends at a time counts the groups whose tiles all
    lie before ``pid_m`` (that count is the tile's group) and their tiles. A tile past every
    group's tiles is ``not found`` and covers rows of the zero tail ``[group_end[-1], M_out)`` (or
    none). Group ends are clamped to ``0 <= start <= end <= M_out``, so tile counts are never
    negative whatever the ends hold.
    """
    zero = pid_m * 0
    total = zero  # tiles of the groups scanned so far
    group = zero  # groups wholly before tile pid_m
    before = zero  # their tiles
    for g0 in range(0, G, BLOCK_G):
        gidx = g0 + tl.arange(0, BLOCK_G)
        g_ok = gidx < G
        ends = tl.load(group_end_ptr + gidx, mask=g_ok, other=0)
        starts = tl.load(group_end_ptr + gidx - 1, mask=g_ok & (gidx > 0), other=0)
        starts = tl.minimum(tl.maximum(starts, 0), M_out)
        ends = tl.minimum(tl.maximum(ends, starts), M_out)
        tiles = (ends - starts + (BLOCK_M - 1)) // BLOCK_M
        done = g_ok & (tl.cumsum(tiles, axis=0) + total <= pid_m)
        group += tl.sum(done.to(tl.int32), axis=0)
        before += tl.sum(tl.where(done, tiles, 0), axis=0)
        total += tl.sum(tiles, axis=0)
    found = pid_m < total
    start = tl.load(group_end_ptr + group - 1, mask=found & (group > 0), other=0)
    start = tl.minimum(tl.maximum(start, 0), M_out)
    end = tl.load(group_end_ptr + group, mask=found, other=0)
    end = tl.minimum(tl.maximum(end, start), M_out)
    # The zero tail: rows [last, M_out), its tile pid_m - total.
    last = tl.load(group_end_ptr + G - 1, mask=G > 0, other=0)
    last = tl.minimum(tl.maximum(last, 0), M_out)
    row_start = tl.where(found, start + (pid_m - before) * BLOCK_M, last + (pid_m - total) * BLOCK_M)
    row_end = tl.where(found, end, M_out)
    return group, row_start, row_end, found


@triton.jit
def _grouped_mm_kernel(
    a_ptr,  # (M_a, K) float32/float16/bfloat16, strides stride_am, stride_ak
    b_ptr,  # (G, K, N) a's dtype, strides stride_bg, stride_bk, stride_bn
    c_ptr,  # (M_out, N) written, strides stride_cm, stride_cn
    group_end_ptr,  # (G,) int32, cumulative end row of each group
    a_rows_ptr,  # (M_out,) int32 source row of A per output row (read with GATHER_A)
    row_scale_ptr,  # (M_out,) float32 scale per output row (read with SCALE_ROWS)
    h_ptr,  # (M_out, 2N) contiguous, written with GATED and STORE_H: the pre-activation
    bias_ptr,  # (G, 2N) contiguous, read with GATED and HAS_BIAS: the pre-activation's bias
    M_out,
    N,
    K,
    G,
    stride_am,
    stride_ak,
    stride_bg,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    limit,  # GPT-OSS's clamp and sigmoid slope (GATED with ACTIVATION == GPT_OSS)
    alpha,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCK_G: tl.constexpr,
    GATHER_A: tl.constexpr,
    SCALE_ROWS: tl.constexpr,
    GATED: tl.constexpr,
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STORE_H: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Grid ``((cdiv(M_out, BLOCK_M) + G) * cdiv(N, BLOCK_N),)``: every row of ``C`` written once,
    rows past ``group_end[-1]`` with zeros.

    ``GATED`` (the fused experts' up projection): ``b`` has ``2N`` columns, the gate and up halves
    (``[gate | up]``, interleaved for GPT-OSS), and ``C (M_out, N)`` is the gated activation
    ``act(gate, up)`` of ``h = A @ B (+ bias)``, computed from the float32 accumulators in the
    epilogue; ``h`` itself is stored only with ``STORE_H`` (the backward needs it). One A tile
    feeds two dots per K step, so ``h`` never makes a round trip through memory."""
    # Grouped ordering: GROUP_M row tiles sweep the column tiles together, so the A rows and the
    # B columns they read stay in L2.
    pid = tl.program_id(0)
    num_pid_m = (M_out + (BLOCK_M - 1)) // BLOCK_M + G
    num_pid_n = (N + (BLOCK_N - 1)) // BLOCK_N
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m

    group, row_start, row_end, found = _find_row_tile(group_end_ptr, G, M_out, pid_m, BLOCK_M, BLOCK_G)

    rows = row_start + tl.arange(0, BLOCK_M)
    row_ok = (rows >= 0) & (rows < row_end) & (rows < M_out)  # rows this program stores
    in_product = row_ok & (rows < tl.where(found, row_end, 0))  # none in a zero tile
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    offs_k = tl.arange(0, BLOCK_K)
    if GATHER_A:
        src = tl.load(a_rows_ptr + rows, mask=in_product, other=0).to(tl.int64)
    else:
        src = rows.to(tl.int64)
    a_ptrs = a_ptr + src[:, None] * stride_am + offs_k[None, :] * stride_ak
    if GATED:
        b_cols, up_cols = gate_up_offsets(cols, N, ACTIVATION)
    else:
        b_cols, up_cols = cols, cols
    b_group = b_ptr + group.to(tl.int64) * stride_bg + offs_k[:, None] * stride_bk
    b_ptrs = b_group + b_cols[None, :] * stride_bn
    up_ptrs = b_group + up_cols[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # GATED only
    num_k = tl.where(found, (K + (BLOCK_K - 1)) // BLOCK_K, 0)  # zero tiles skip the product
    for kk in range(0, num_k):
        k_ok = offs_k < K - kk * BLOCK_K
        a = tl.load(a_ptrs, mask=in_product[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        if GATED:
            b_up = tl.load(up_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=INPUT_PRECISION)
            up_ptrs += BLOCK_K * stride_bk
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    out_mask = row_ok[:, None] & col_ok[None, :]
    if GATED:
        if HAS_BIAS:  # zero tiles (rows of no group, whose group index may be G) add nothing
            bias_row = bias_ptr + tl.where(found, group, 0).to(tl.int64) * (2 * N)
            gate_bias = tl.load(bias_row + b_cols, mask=col_ok, other=0.0).to(tl.float32)
            up_bias = tl.load(bias_row + up_cols, mask=col_ok, other=0.0).to(tl.float32)
            acc += tl.where(found, gate_bias, 0.0)[None, :]
            acc_up += tl.where(found, up_bias, 0.0)[None, :]
        if STORE_H:
            h_rows = h_ptr + rows.to(tl.int64)[:, None] * (2 * N)
            tl.store(h_rows + b_cols[None, :], acc.to(h_ptr.dtype.element_ty), mask=out_mask)
            tl.store(h_rows + up_cols[None, :], acc_up.to(h_ptr.dtype.element_ty), mask=out_mask)
        acc, _, _ = gated_activation(acc, acc_up, limit, alpha, ACTIVATION)
    if SCALE_ROWS:
        scale = tl.load(row_scale_ptr + rows, mask=in_product, other=0.0)
        acc = acc * scale[:, None]
    c_ptrs = c_ptr + rows.to(tl.int64)[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _grouped_mm_weight_grad_kernel(
    a_ptr,  # (M_a, K) strides stride_am, stride_ak
    dc_ptr,  # (M, N) a's dtype, strides stride_dm, stride_dn: the output gradient
    db_ptr,  # (G, K, N) written, strides stride_bg, stride_bk, stride_bn
    group_end_ptr,  # (G,) int32
    a_rows_ptr,  # (M,) int32 (GATHER_A)
    row_scale_ptr,  # (M,) float32 (SCALE_ROWS)
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_dm,
    stride_dn,
    stride_bg,
    stride_bk,
    stride_bn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K_OUT: tl.constexpr,
    GATHER_A: tl.constexpr,
    SCALE_ROWS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Grid ``(cdiv(N, BLOCK_N), cdiv(K, BLOCK_K_OUT), G)``: ``dB[g] = A_g^T @ (scale * dC)_g``
    over the rows of group ``g`` in ``BLOCK_M`` chunks; empty groups write zeros. The column tile
    varies fastest, so concurrent programs share the group's rows of A in L2."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    g = tl.program_id(2)
    start = tl.load(group_end_ptr + g - 1, mask=g > 0, other=0)
    end = tl.load(group_end_ptr + g)
    start = tl.minimum(tl.maximum(start, 0), M)
    end = tl.minimum(tl.maximum(end, start), M)

    ks = pid_k * BLOCK_K_OUT + tl.arange(0, BLOCK_K_OUT)
    k_ok = ks < K
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    offs_m = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_K_OUT, BLOCK_N), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + offs_m
        row_ok = rows < end
        if GATHER_A:
            src = tl.load(a_rows_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        else:
            src = rows.to(tl.int64)
        a_t = tl.load(
            a_ptr + src[None, :] * stride_am + ks[:, None] * stride_ak, mask=k_ok[:, None] & row_ok[None, :], other=0.0
        )
        dc = tl.load(
            dc_ptr + rows.to(tl.int64)[:, None] * stride_dm + cols[None, :] * stride_dn,
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        if SCALE_ROWS:
            scale = tl.load(row_scale_ptr + rows, mask=row_ok, other=0.0)
            dc = (dc.to(tl.float32) * scale[:, None]).to(dc_ptr.dtype.element_ty)
        acc = tl.dot(a_t, dc, acc, input_precision=INPUT_PRECISION)
    db_ptrs = db_ptr + g.to(tl.int64) * stride_bg + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    tl.store(db_ptrs, acc.to(db_ptr.dtype.element_ty), mask=k_ok[:, None] & col_ok[None, :])
