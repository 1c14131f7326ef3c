"""Triton kernels of the ProbMoE exact-k / dynamic-k ops (launchers in ``ops/probmoe.py``; the
math, in the same variable names, in ``moe_kernels/reference/probmoe.py``).

A program owns ``BLOCK_T`` tokens; the DP state of each token is one row of ``K_PAD >= k + 1``
log values (columns = subset sizes), and the E experts are a sequential loop. The backward
sweep over experts needs the table's rows in reverse order, which would cost ``(E+1) * K_PAD``
floats per token to keep: instead only every ``chunk``-th row is kept (checkpoints), and each
chunk of rows is recomputed from its checkpoint just before the sweep crosses it, so the
scratch a program touches is ``(E / chunk + chunk + 1)`` rows (about ``2 sqrt(E)``), small enough
to stay in L2, at the cost of running the prefix DP twice.

The grid is persistent: each program loops over token tiles and reuses its own scratch slot, so
the scratch size depends on the grid, not on T.
"""

import triton
import triton.language as tl


@triton.jit
def _logaddexp(x, y):
    hi = tl.maximum(x, y)
    lo = tl.minimum(x, y)
    # Both -inf (an unreachable state) stays -inf instead of computing -inf - -inf = NaN.
    safe_hi = tl.where(hi == float("-inf"), 0.0, hi)
    return tl.where(hi == float("-inf"), hi, hi + tl.log(1.0 + tl.exp(lo - safe_hi)))


@triton.jit
def _shift_right(x, cols, fill):
    """``y[:, j] = x[:, j-1]``, ``y[:, 0] = fill`` (a register shuffle along the size axis)."""
    src = tl.broadcast_to(tl.maximum(cols - 1, 0), x.shape)
    return tl.where(cols == 0, fill, tl.gather(x, src, axis=1))


@triton.jit
def _shift_left(x, cols, K_PAD: tl.constexpr):
    """``y[:, j] = x[:, j+1]``, ``y[:, K_PAD-1] = 0``."""
    src = tl.broadcast_to(tl.minimum(cols + 1, K_PAD - 1), x.shape)
    return tl.where(cols == K_PAD - 1, 0.0, tl.gather(x, src, axis=1))


@triton.jit
def _dp_step(alpha, r_i, cols, k):
    """One prefix-DP row: ``(take, new)`` with ``new = logaddexp(alpha, take)``; sizes > k stay
    -inf."""
    take = _shift_right(alpha, cols, float("-inf")) + r_i[:, None]
    new = _logaddexp(alpha, take)
    return take, tl.where(cols <= k, new, float("-inf"))


@triton.jit
def _shares(prev, new, take):
    """Skip and take shares of one step, 0 where ``new`` is unreachable."""
    reachable = new > float("-inf")
    safe_new = tl.where(reachable, new, 0.0)
    skip = tl.where(reachable, tl.exp(prev - safe_new), 0.0)
    take_share = tl.where(reachable, tl.exp(take - safe_new), 0.0)
    return skip, take_share


@triton.jit
def _row_max(row_ptrs, row_ok, E, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """Max over each row's finite logits (0 for a row without one) and whether the row holds a
    NaN or +inf, ``[BLOCK_T]`` each."""
    ecols = tl.arange(0, BLOCK_E)[None, :]
    row_max = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    invalid = tl.zeros((BLOCK_T,), tl.int32)
    for e0 in range(0, E, BLOCK_E):
        x = tl.load(row_ptrs[:, None] + e0 + ecols, mask=row_ok[:, None] & (e0 + ecols < E), other=0.0)
        x = x.to(tl.float32)
        invalid += tl.sum(((x != x) | (x == float("inf"))).to(tl.int32), axis=1)
        x = tl.where(tl.abs(x) < float("inf"), x, float("-inf"))  # drops NaN and +-inf
        row_max = tl.maximum(row_max, tl.max(x, axis=1))
    return tl.where(row_max > float("-inf"), row_max, 0.0), invalid > 0


@triton.jit
def _band_law(alpha, row_max, invalid, cols, k, k_min):
    """``(log_z [BLOCK_T], p [BLOCK_T, K_PAD])`` from the last row (see the reference). An
    ``invalid`` row (NaN or +inf logits) gets NaN for both, which every later value inherits:
    the DP's max/where steps would otherwise drop NaN silently."""
    in_band = (cols >= k_min) & (cols <= k)
    log_e = tl.where(in_band, alpha + cols.to(tl.float32) * row_max[:, None], float("-inf"))
    hi = tl.max(log_e, axis=1)
    safe_hi = tl.where(hi == float("-inf"), 0.0, hi)
    total = tl.sum(tl.exp(log_e - safe_hi[:, None]), axis=1)
    log_z = tl.where(hi == float("-inf"), hi, safe_hi + tl.log(total))
    p = tl.where(in_band, tl.exp(log_e - log_z[:, None]), 0.0)
    return tl.where(invalid, float("nan"), log_z), tl.where(invalid[:, None], float("nan"), p)


@triton.jit
def _exact_k_fwd_kernel(
    logits_ptr,  # (T, E) float32/float16/bfloat16, row stride stride_lt, unit expert stride
    seed_ptr,  # (1,) int64: Philox seed of the sample
    marginals_ptr,  # (T, E) float32, contiguous, written
    log_z_ptr,  # (T,) float32, written
    ids_ptr,  # (T, k) int32, contiguous, written when SAMPLE
    scratch_ptr,  # (programs, rows, BLOCK_T, K_PAD) float32 workspace
    T,
    E,
    stride_lt,
    k,
    k_min,
    chunk,  # rows between checkpoints
    num_checkpoints,  # cdiv(E, chunk)
    K_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    SAMPLE: tl.constexpr,
):
    pid = tl.program_id(0)
    tile_elems = BLOCK_T * K_PAD
    offs = tl.arange(0, BLOCK_T)[:, None] * K_PAD + tl.arange(0, K_PAD)[None, :]
    # Rows [0, num_checkpoints): table row c * chunk; rows num_checkpoints + s: the chunk's row s.
    slot_ptr = scratch_ptr + pid.to(tl.int64) * (num_checkpoints + chunk + 1) * tile_elems + offs
    chunk_ptr = slot_ptr + num_checkpoints * tile_elems
    cols = tl.arange(0, K_PAD)[None, :]
    first_row = tl.where(cols == 0, 0.0, float("-inf")) + tl.zeros((BLOCK_T, K_PAD), tl.float32)
    if SAMPLE:
        seed = tl.load(seed_ptr)

    for tile in range(pid, tl.cdiv(T, BLOCK_T), tl.num_programs(0)):
        rows = tile * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < T
        rows64 = rows.to(tl.int64)
        row_ptrs = logits_ptr + rows64 * stride_lt
        row_max, invalid = _row_max(row_ptrs, row_ok, E, BLOCK_T, BLOCK_E)

        # Prefix DP over all experts, keeping every chunk-th row.
        alpha = first_row
        for c in range(0, num_checkpoints):
            tl.store(slot_ptr + c * tile_elems, alpha)
            for i in range(c * chunk, tl.minimum(c * chunk + chunk, E)):
                r_i = tl.load(row_ptrs + i, mask=row_ok, other=0.0).to(tl.float32) - row_max
                _, alpha = _dp_step(alpha, r_i, cols, k)
        log_z, abar = _band_law(alpha, row_max, invalid, cols, k, k_min)
        tl.store(log_z_ptr + rows64, log_z, mask=row_ok)

        if SAMPLE:
            # Draw the size c ~ p by inverse CDF (exact-k: p is one-hot, c = k).
            cdf = tl.cumsum(abar, axis=1)
            u = tl.rand(seed, rows64 * (E + 1) + E)
            below = (cdf < u[:, None] * tl.sum(abar, axis=1)[:, None]).to(tl.int32)
            left = tl.minimum(tl.maximum(tl.sum(below, axis=1), k_min), k)
            # A row without a valid law (NaN, +inf, or no subset in the band) samples nothing.
            left = tl.where(tl.abs(log_z) < float("inf"), left, 0)
            ids = tl.full((BLOCK_T, K_PAD), -1, tl.int32)

        # Backward sweep, one chunk at a time from the last.
        cur = alpha
        for c in range(num_checkpoints - 1, -1, -1):
            start = c * chunk
            length = tl.minimum(chunk, E - start)
            tl.debug_barrier()  # the previous chunk's (or tile's) reads are done
            prev = tl.load(slot_ptr + c * tile_elems)
            for s in range(0, length):
                tl.store(chunk_ptr + s * tile_elems, prev)
                r_i = tl.load(row_ptrs + start + s, mask=row_ok, other=0.0).to(tl.float32) - row_max
                _, prev = _dp_step(prev, r_i, cols, k)
            tl.debug_barrier()  # the chunk's rows are visible to every thread
            for s in range(length - 1, -1, -1):
                i = start + s
                prev = tl.load(chunk_ptr + s * tile_elems)
                r_i = tl.load(row_ptrs + i, mask=row_ok, other=0.0).to(tl.float32) - row_max
                take = _shift_right(prev, cols, float("-inf")) + r_i[:, None]
                skip, take_share = _shares(prev, cur, take)
                tl.store(marginals_ptr + rows64 * E + i, tl.sum(abar * take_share, axis=1), mask=row_ok)
                if SAMPLE:
                    rho = tl.sum(tl.where(cols == left[:, None], take_share, 0.0), axis=1)
                    u = tl.rand(seed, rows64 * (E + 1) + i)
                    chosen = (left > 0) & (u < rho)
                    ids = tl.where((cols == left[:, None] - 1) & chosen[:, None], i, ids)
                    left -= chosen.to(tl.int32)
                abar = abar * skip + _shift_left(abar * take_share, cols, K_PAD)
                cur = prev
        if SAMPLE:
            tl.store(ids_ptr + rows64[:, None] * k + cols, ids, mask=row_ok[:, None] & (cols < k))


@triton.jit
def _exact_k_bwd_kernel(
    logits_ptr,  # (T, E) float32/float16/bfloat16, row stride stride_lt, unit expert stride
    grad_m_ptr,  # (T, E) float32, contiguous: upstream gradient of the marginals
    grad_log_z_ptr,  # (T,) float32: upstream gradient of log Z
    grad_ptr,  # (T, E) logits' dtype, contiguous, written
    scratch_ptr,  # (programs, rows, 2, BLOCK_T, K_PAD) float32 workspace (value, tangent)
    T,
    E,
    stride_lt,
    k,
    k_min,
    chunk,
    num_checkpoints,
    K_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """``grad = Cov(z) @ grad_m + grad_log_z * m``: the forward kernel's recursions on dual
    numbers (value, tangent in the direction ``grad_m``)."""
    pid = tl.program_id(0)
    tile_elems = BLOCK_T * K_PAD
    offs = tl.arange(0, BLOCK_T)[:, None] * K_PAD + tl.arange(0, K_PAD)[None, :]
    slot_ptr = scratch_ptr + pid.to(tl.int64) * (num_checkpoints + chunk + 1) * 2 * tile_elems + offs
    chunk_ptr = slot_ptr + num_checkpoints * 2 * tile_elems
    cols = tl.arange(0, K_PAD)[None, :]
    first_row = tl.where(cols == 0, 0.0, float("-inf")) + tl.zeros((BLOCK_T, K_PAD), tl.float32)

    for tile in range(pid, tl.cdiv(T, BLOCK_T), tl.num_programs(0)):
        rows = tile * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < T
        rows64 = rows.to(tl.int64)
        row_ptrs = logits_ptr + rows64 * stride_lt
        v_ptrs = grad_m_ptr + rows64 * E
        row_max, invalid = _row_max(row_ptrs, row_ok, E, BLOCK_T, BLOCK_E)

        alpha = first_row
        dot = tl.zeros((BLOCK_T, K_PAD), tl.float32)
        for c in range(0, num_checkpoints):
            tl.store(slot_ptr + c * 2 * tile_elems, alpha)
            tl.store(slot_ptr + (c * 2 + 1) * tile_elems, dot)
            for i in range(c * chunk, tl.minimum(c * chunk + chunk, E)):
                r_i = tl.load(row_ptrs + i, mask=row_ok, other=0.0).to(tl.float32) - row_max
                v_i = tl.load(v_ptrs + i, mask=row_ok, other=0.0)
                take, new = _dp_step(alpha, r_i, cols, k)
                skip, take_share = _shares(alpha, new, take)
                dot = skip * dot + take_share * (_shift_right(dot, cols, 0.0) + v_i[:, None])
                alpha = new
        _, abar = _band_law(alpha, row_max, invalid, cols, k, k_min)
        abar_dot = abar * (dot - tl.sum(abar * dot, axis=1)[:, None])
        grad_log_z = tl.load(grad_log_z_ptr + rows64, mask=row_ok, other=0.0)

        cur = alpha
        cur_dot = dot
        for c in range(num_checkpoints - 1, -1, -1):
            start = c * chunk
            length = tl.minimum(chunk, E - start)
            tl.debug_barrier()
            prev = tl.load(slot_ptr + c * 2 * tile_elems)
            prev_dot = tl.load(slot_ptr + (c * 2 + 1) * tile_elems)
            for s in range(0, length):
                tl.store(chunk_ptr + s * 2 * tile_elems, prev)
                tl.store(chunk_ptr + (s * 2 + 1) * tile_elems, prev_dot)
                r_i = tl.load(row_ptrs + start + s, mask=row_ok, other=0.0).to(tl.float32) - row_max
                v_i = tl.load(v_ptrs + start + s, mask=row_ok, other=0.0)
                take, new = _dp_step(prev, r_i, cols, k)
                skip, take_share = _shares(prev, new, take)
                prev_dot = skip * prev_dot + take_share * (_shift_right(prev_dot, cols, 0.0) + v_i[:, None])
                prev = new
            tl.debug_barrier()
            for s in range(length - 1, -1, -1):
                i = start + s
                prev = tl.load(chunk_ptr + s * 2 * tile_elems)
                prev_dot = tl.load(chunk_ptr + (s * 2 + 1) * tile_elems)
                r_i = tl.load(row_ptrs + i, mask=row_ok, other=0.0).to(tl.float32) - row_max
                take = _shift_right(prev, cols, float("-inf")) + r_i[:, None]
                skip, take_share = _shares(prev, cur, take)
                skip_dot = skip * (prev_dot - cur_dot)
                marginal = tl.sum(abar * take_share, axis=1)
                flow_dot = abar_dot * take_share - abar * skip_dot
                grad_i = tl.sum(flow_dot, axis=1) + grad_log_z * marginal
                tl.store(grad_ptr + rows64 * E + i, grad_i.to(grad_ptr.dtype.element_ty), mask=row_ok)
                abar_dot = abar_dot * skip + abar * skip_dot + _shift_left(flow_dot, cols, K_PAD)
                abar = abar * skip + _shift_left(abar * take_share, cols, K_PAD)
                cur = prev
                cur_dot = prev_dot
