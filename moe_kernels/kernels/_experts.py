"""Triton kernels of the fused experts op around the grouped GEMMs (launchers in
``ops/experts.py``): the gated activation, its backward fused with the routing weights'
gradient, and the combine of each token's k expert rows.

Rows are *sorted slots*: slot ``t * k + j`` of the routing, ordered by expert; rows of empty
slots (id -1) sit after the last expert's rows and hold zeros.
"""

import triton
import triton.language as tl

from moe_kernels.kernels.activations import gate_up_offsets, gated_activation


@triton.jit
def _gated_act_fwd_kernel(
    h_ptr,  # (R, 2I) float, row stride stride_h, unit column stride
    act_ptr,  # (R, I) float, contiguous, written
    R,
    I,
    stride_h,
    limit,
    alpha,
    ACTIVATION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (rows < R)[:, None] & (cols < I)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    gate_cols, up_cols = gate_up_offsets(cols, I, ACTIVATION)
    gate = tl.load(h_ptr + rows64 * stride_h + gate_cols[None, :], mask=mask, other=0.0).to(tl.float32)
    up = tl.load(h_ptr + rows64 * stride_h + up_cols[None, :], mask=mask, other=0.0).to(tl.float32)
    act, _, _ = gated_activation(gate, up, limit, alpha, ACTIVATION)
    tl.store(act_ptr + rows64 * I + cols[None, :], act.to(act_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_act_bwd_kernel(
    grad_act_ptr,  # (R, I) float, contiguous: gradient of the *unweighted* expert output's act
    h_ptr,  # (R, 2I) float, row stride stride_h
    row_weight_ptr,  # (R,) float32: the routing weight of each sorted slot (0 for empty slots)
    grad_h_ptr,  # (R, 2I) float, contiguous, written: weight * d act / d h
    grad_weight_ptr,  # (R,) float32, written: sum_i grad_act * act, the routing weight's gradient
    R,
    I,
    stride_h,
    limit,
    alpha,
    ACTIVATION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    """One program per ``BLOCK_R`` rows, looping over the ``I`` columns so that the routing
    weight's gradient (a row sum) needs no atomics."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    rows64 = rows.to(tl.int64)[:, None]
    weight = tl.load(row_weight_ptr + rows, mask=row_ok, other=0.0)[:, None]
    grad_weight = tl.zeros((BLOCK_R,), tl.float32)
    for i0 in range(0, I, BLOCK_I):
        cols = i0 + tl.arange(0, BLOCK_I)
        mask = row_ok[:, None] & (cols < I)[None, :]
        gate_cols, up_cols = gate_up_offsets(cols, I, ACTIVATION)
        gate = tl.load(h_ptr + rows64 * stride_h + gate_cols[None, :], mask=mask, other=0.0).to(tl.float32)
        up = tl.load(h_ptr + rows64 * stride_h + up_cols[None, :], mask=mask, other=0.0).to(tl.float32)
        grad_act = tl.load(grad_act_ptr + rows64 * I + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        act, d_gate, d_up = gated_activation(gate, up, limit, alpha, ACTIVATION)
        grad_weight += tl.sum(grad_act * act, axis=1)
        scaled = grad_act * weight
        out_dtype = grad_h_ptr.dtype.element_ty
        tl.store(grad_h_ptr + rows64 * (2 * I) + gate_cols[None, :], (scaled * d_gate).to(out_dtype), mask=mask)
        tl.store(grad_h_ptr + rows64 * (2 * I) + up_cols[None, :], (scaled * d_up).to(out_dtype), mask=mask)
    tl.store(grad_weight_ptr + rows, grad_weight, mask=row_ok)


@triton.jit
def _combine_kernel(
    rows_ptr,  # (R, H) float, contiguous: one row per sorted slot
    position_ptr,  # (T * k,) int32: sorted position of slot t * k + j
    out_ptr,  # (T, H) float, contiguous, written: sum over j of rows[position[t * k + j]]
    T,
    H,
    K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Sum each token's k slot rows in a fixed order (deterministic, no atomics)."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    token_ok = tokens < T
    mask = token_ok[:, None] & (cols < H)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_H), tl.float32)
    for j in tl.static_range(K):
        position = tl.load(position_ptr + tokens.to(tl.int64) * K + j, mask=token_ok, other=0)
        acc += tl.load(rows_ptr + position.to(tl.int64)[:, None] * H + cols[None, :], mask=mask, other=0.0).to(
            tl.float32
        )
    tl.store(out_ptr + tokens.to(tl.int64)[:, None] * H + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _moe_align_kernel(
    ids_ptr,  # (R,) int32/int64: the flattened (T, k) routing ids, -1 = empty slot
    weights_ptr,  # (R,) float: the routing weight of each slot
    order_ptr,  # (R,) int64 out: slot at each sorted position
    tokens_ptr,  # (R,) int32 out: token of each sorted position
    experts_ptr,  # (R,) int32 out: expert of each sorted position, E for an empty slot
    positions_ptr,  # (R,) int32 out: sorted position of each slot
    row_weight_ptr,  # (R,) float32 out: routing weight of each sorted position
    counts_ptr,  # (E,) int32 out: slots per expert
    offsets_ptr,  # (E,) int32 out: inclusive cumulative counts (group ends)
    valid_ptr,  # () int32 out: 1 if every id is in [-1, E), else 0
    R,
    E,
    K: tl.constexpr,
    BLOCK_R: tl.constexpr,  # next power of 2 >= R
    NUM_BINS: tl.constexpr,  # next power of 2 >= E + 2: the experts, the empty key E, padding
):
    """``moe_align`` in one program, for the small R of decode batches: the slots are sorted by
    the unique key ``expert * BLOCK_R + slot`` (a stable sort by expert, empty slots last) with
    ``tl.sort``, and counted with ``tl.histogram``. One launch replaces the ~20 small torch ops of
    the general path, whose launch costs dominate a decode step. An id outside [-1, E) is treated
    as empty and clears the valid flag (the launcher asserts on it, asynchronously)."""
    slot = tl.arange(0, BLOCK_R)
    in_range = slot < R
    ids = tl.load(ids_ptr + slot, mask=in_range, other=-1).to(tl.int32)
    bad = in_range & ((ids < -1) | (ids >= E))
    key = tl.where((ids < 0) | bad, E, ids)
    # Padding lanes sort after every slot (key E + 1) and land in a bin nothing reads.
    key = tl.where(in_range, key, E + 1)
    sorted_keys = tl.sort(key * BLOCK_R + slot)
    order = sorted_keys % BLOCK_R
    pos = slot  # sorted position
    tl.store(order_ptr + pos, order.to(tl.int64), mask=in_range)
    tl.store(tokens_ptr + pos, order // K, mask=in_range)
    tl.store(experts_ptr + pos, sorted_keys // BLOCK_R, mask=in_range)
    tl.store(positions_ptr + order, pos, mask=in_range)
    weight = tl.load(weights_ptr + order, mask=in_range, other=0.0).to(tl.float32)
    tl.store(row_weight_ptr + pos, weight, mask=in_range)
    counts = tl.histogram(key, NUM_BINS)
    bins = tl.arange(0, NUM_BINS)
    tl.store(counts_ptr + bins, counts, mask=bins < E)
    tl.store(offsets_ptr + bins, tl.cumsum(counts, 0), mask=bins < E)
    tl.store(valid_ptr, (tl.sum(bad.to(tl.int32), 0) == 0).to(tl.int32))
