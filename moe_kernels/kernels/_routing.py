"""Triton kernels of the gate + top-k op (no allocation, no launch logic: see ``ops/routing.py``).

Layout shared by both kernels: a program owns ``BLOCK_T`` consecutive rows (tokens) and holds
each row's ``E`` experts in one power-of-two wide register tile, so every row is read from
memory once. Padding columns can never be selected.

Selection packs each key into one int64 (order-preserving integer image of the float32 key in
the high half, ``BLOCK_W - expert`` in the low half), so each of the ``K`` rounds is a single
integer max-reduction that yields the largest key and, among equal keys, the lowest expert id.
"""

import triton
import triton.language as tl

# Marks a column already selected or outside ``[0, E)``: below every packed real key, because the
# smallest real key (-inf; NaN keys are mapped to -inf first) packs to more than -2**63.
_EXCLUDED = tl.constexpr(-(2**63))


@triton.jit
def _gate_scores(x, SOFTMAX: tl.constexpr):
    """Scores of a ``[BLOCK_T, width]`` float32 tile of logits (padding holds -inf).

    Returns the scores and, for softmax, the row max and the reciprocal of the row sum, so a
    caller can recompute single scores bit-identically from reloaded logits.
    """
    if SOFTMAX:
        # NaN-ignoring max: a NaN logit then turns its row's sum, and so every score, into NaN
        # (as torch.softmax does) instead of depending on how the GPU's max treats NaN.
        row_max = tl.max(tl.where(x == x, x, float("-inf")), axis=1)
        p = tl.exp(x - row_max[:, None])
        inv_sum = 1.0 / tl.sum(p, axis=1)
        return p * inv_sum[:, None], row_max, inv_sum
    else:
        # The row max and sum are not needed: ``x`` stands in for them (and is never read).
        return 1.0 / (1.0 + tl.exp(-x)), x, x


@triton.jit
def _score_of(x, row_max, inv_sum, SOFTMAX: tl.constexpr):
    """The score of reloaded logits ``x`` with the same arithmetic as :func:`_gate_scores`."""
    if SOFTMAX:
        return tl.exp(x - row_max[:, None]) * inv_sum[:, None]
    else:
        return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _limit_to_best_groups(
    key,
    BLOCK_T: tl.constexpr,
    G_PAD: tl.constexpr,
    GS_PAD: tl.constexpr,
    TOPK_GROUPS: tl.constexpr,
    GROUP_TOP2: tl.constexpr,
):
    """Set the keys of experts outside the ``TOPK_GROUPS`` best groups to -inf.

    ``key`` is ``[BLOCK_T, G_PAD * GS_PAD]`` in group-major order (column ``g * GS_PAD + j`` is
    expert ``j`` of group ``g``; padding holds -inf), so one reshape gives every group's keys
    along the last axis and all groups are scored by a few reductions at once. A group's score is
    its max key or the sum of its two largest; it is kept when fewer than ``TOPK_GROUPS`` groups
    beat it (a higher score, or an equal score and a lower index). Padding groups score -inf and
    come after every real group, so they are never preferred to one.
    """
    grouped = tl.reshape(key, [BLOCK_T, G_PAD, GS_PAD])
    top1 = tl.max(grouped, axis=2)
    score = top1
    if GROUP_TOP2:
        member = tl.arange(0, GS_PAD)[None, None, :]
        first = tl.min(tl.where(grouped == top1[:, :, None], member, GS_PAD), axis=2)
        score = top1 + tl.max(tl.where(member == first[:, :, None], float("-inf"), grouped), axis=2)
    score = tl.where(score == score, score, float("-inf"))  # inf + -inf
    mine = tl.arange(0, G_PAD)[None, :, None]
    other = tl.arange(0, G_PAD)[None, None, :]
    theirs = score[:, None, :]
    beats = (theirs > score[:, :, None]) | ((theirs == score[:, :, None]) & (other < mine))
    kept = tl.sum(beats.to(tl.int32), axis=2) < TOPK_GROUPS
    grouped = tl.where(kept[:, :, None], grouped, float("-inf"))
    return tl.reshape(grouped, [BLOCK_T, G_PAD * GS_PAD])


@triton.jit
def route_columns(
    T, E, group_size, BLOCK_T: tl.constexpr, G_PAD: tl.constexpr, GS_PAD: tl.constexpr, CONTIGUOUS: tl.constexpr
):
    """The tile of this program in the group-major column layout of
    :func:`_softmax_topk_fwd_kernel`: ``(rows, row_ok, expert, col_ok)``, the ``[BLOCK_T]`` token
    rows (valid where ``row_ok``) and, for each of the ``G_PAD * GS_PAD`` columns, the expert it
    holds (valid where ``col_ok``). ``G_PAD = 1, GS_PAD = BLOCK_E, group_size = E`` with
    ``CONTIGUOUS`` gives the plain layout (column ``c`` is expert ``c``).
    """
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, G_PAD * GS_PAD)
    if CONTIGUOUS:
        expert = cols
        col_ok = cols < E
    else:
        member = cols % GS_PAD
        expert = (cols // GS_PAD) * group_size + member
        col_ok = (member < group_size) & (expert < E)
    return rows, rows < T, expert, col_ok


@triton.jit
def route_tile(x, tile, bias_ptr, weights_ptr, ids_ptr, logit_rows, scale, ROUTING, RELOAD: tl.constexpr):
    """Route a tile of logits: scores, selection and the ``weights`` / ``ids`` stores.

    ``x`` is a ``[BLOCK_T, G_PAD * GS_PAD]`` float32 tile of logits laid out as ``tile`` (from
    :func:`route_columns`; anything finite in masked places). ``ROUTING`` is the calling kernel's
    routing constexpr, a ``moe_kernels.ops.routing.RouteConstexprs`` named tuple read by field
    (``K``, ``K_PAD``, ``G_PAD``, ``GS_PAD``, ``SOFTMAX``, ``RENORMALIZE``, ``HAS_BIAS``,
    ``GROUPED``, ``TOPK_GROUPS``, ``GROUP_TOP2``). ``RELOAD``: recompute the K chosen scores from
    the logits reloaded from ``logit_rows + id`` (``[BLOCK_T]`` row pointers; cache hits, cheaper
    than K more reductions when the logits are in memory); otherwise take them out of the score
    tile (``logit_rows`` is then unused). Both give bit-identical weights: the same float32
    arithmetic on the same values.
    """
    BLOCK_T: tl.constexpr = x.shape[0]
    K: tl.constexpr = ROUTING.K
    K_PAD: tl.constexpr = ROUTING.K_PAD
    G_PAD: tl.constexpr = ROUTING.G_PAD
    GS_PAD: tl.constexpr = ROUTING.GS_PAD
    SOFTMAX: tl.constexpr = ROUTING.SOFTMAX
    RENORMALIZE: tl.constexpr = ROUTING.RENORMALIZE
    HAS_BIAS: tl.constexpr = ROUTING.HAS_BIAS
    GROUPED: tl.constexpr = ROUTING.GROUPED
    TOPK_GROUPS: tl.constexpr = ROUTING.TOPK_GROUPS
    GROUP_TOP2: tl.constexpr = ROUTING.GROUP_TOP2
    BLOCK_W: tl.constexpr = G_PAD * GS_PAD
    rows, row_ok, expert, col_ok = tile
    kcols = tl.arange(0, K_PAD)
    # Padding columns score 0; rows past T stay finite so they compute no NaN.
    x = tl.where(col_ok[None, :], x, float("-inf"))
    s, row_max, inv_sum = _gate_scores(x, SOFTMAX)

    key = s
    if HAS_BIAS:
        key = key + tl.load(bias_ptr + expert, mask=col_ok, other=0.0)[None, :]
    key = tl.where(key == key, key, float("-inf")) + 0.0  # NaN -> -inf; -0.0 -> +0.0
    key = tl.where(col_ok[None, :], key, float("-inf"))
    if GROUPED:
        key = _limit_to_best_groups(key, BLOCK_T, G_PAD, GS_PAD, TOPK_GROUPS, GROUP_TOP2)

    # Order-preserving int32 image of the float key: flip the magnitude bits of negatives.
    bits = key.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    packed = (ordered.to(tl.int64) << 32) | (BLOCK_W - expert).to(tl.int64)[None, :]
    packed = tl.where(col_ok[None, :], packed, _EXCLUDED)

    ids = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int32)
    if not RELOAD:
        weights = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
        s_real = tl.where(col_ok[None, :], s, 0.0)
    for j in range(K):
        best = tl.max(packed, axis=1)
        chosen = BLOCK_W - best.to(tl.int32)  # the low half holds BLOCK_W - expert
        ids = tl.where(kcols[None, :] == j, chosen[:, None], ids)
        if not RELOAD:
            # The one real column holding ``chosen`` (padding columns may alias it: masked).
            picked = tl.sum(tl.where(expert[None, :] == chosen[:, None], s_real, 0.0), axis=1)
            weights = tl.where(kcols[None, :] == j, picked[:, None], weights)
        # Padding columns may alias a real expert id here; they are excluded already.
        packed = tl.where(expert[None, :] == chosen[:, None], _EXCLUDED, packed)

    out_mask = row_ok[:, None] & (kcols < K)[None, :]
    if RELOAD:
        # Weights come from the unbiased scores; reloading the K chosen logits (cache hits) is
        # cheaper than K more reductions over the tile, and recomputes the scores bit-identically.
        x_chosen = tl.load(logit_rows[:, None] + ids, mask=out_mask, other=0.0).to(tl.float32)
        weights = tl.where(out_mask, _score_of(x_chosen, row_max, inv_sum, SOFTMAX), 0.0)
    else:
        weights = tl.where(out_mask, weights, 0.0)
    if RENORMALIZE:
        weights = weights / (tl.sum(weights, axis=1)[:, None] + 1e-20)
    weights = weights * scale
    out_off = rows.to(tl.int64)[:, None] * K + kcols[None, :]
    tl.store(weights_ptr + out_off, weights, mask=out_mask)
    tl.store(ids_ptr + out_off, ids, mask=out_mask)


@triton.jit
def _softmax_topk_fwd_kernel(
    logits_ptr,  # (T, E) float32/float16/bfloat16, row stride stride_lt, experts contiguous
    bias_ptr,  # (E,) float32, read only when HAS_BIAS
    weights_ptr,  # (T, K) float32, contiguous, written
    ids_ptr,  # (T, K) int32, contiguous, written
    T,
    E,
    group_size,
    stride_lt,
    scale,
    ROUTING: tl.constexpr,
    BLOCK_T: tl.constexpr,
    CONTIGUOUS: tl.constexpr,
):
    """Grid ``(cdiv(T, BLOCK_T),)``: one program routes ``BLOCK_T`` tokens end to end.

    The row tile is ``ROUTING.G_PAD * ROUTING.GS_PAD`` columns in group-major order: column ``c``
    holds expert ``(c // GS_PAD) * group_size + c % GS_PAD`` (without groups: ``G_PAD = 1``,
    ``group_size = E``, so column ``c`` is expert ``c``). ``CONTIGUOUS`` says that column ``c``
    is expert ``c`` (no groups, or a power-of-two group size), which lets the compiler see
    consecutive addresses and issue vector loads. The routing itself is :func:`route_tile`,
    shared with the fused kNN route (``_knn.py``).
    """
    tile = route_columns(T, E, group_size, BLOCK_T, ROUTING.G_PAD, ROUTING.GS_PAD, CONTIGUOUS)
    rows, row_ok, expert, col_ok = tile
    logit_rows = logits_ptr + rows.to(tl.int64) * stride_lt
    x = tl.load(logit_rows[:, None] + expert[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    route_tile(x.to(tl.float32), tile, bias_ptr, weights_ptr, ids_ptr, logit_rows, scale, ROUTING, True)


@triton.jit
def _softmax_topk_bwd_kernel(
    grad_weights_ptr,  # (T, K) float32, any strides
    logits_ptr,  # (T, E) float32/float16/bfloat16, row stride stride_lt, experts contiguous
    ids_ptr,  # (T, K) int32, contiguous (the forward's output)
    grad_logits_ptr,  # (T, E) logits' dtype, contiguous, written
    T,
    E,
    stride_gt,
    stride_gk,
    stride_lt,
    scale,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    SOFTMAX: tl.constexpr,
    RENORMALIZE: tl.constexpr,
):
    """Grid ``(cdiv(T, BLOCK_T),)``: the gradient of ``BLOCK_T`` rows of weights w.r.t. logits.

    With ``g`` the gradient reaching the unscaled, unnormalised scores ``w = s[ids]``:
    softmax: ``dx = s * (g_dense - <g, w>)``; sigmoid: ``dx = g_dense * s * (1 - s)``. The dense
    part is stored for every column first, then the K selected columns are overwritten.
    """
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    kcols = tl.arange(0, K_PAD)
    row_ok = rows < T
    tile_mask = row_ok[:, None] & (cols < E)[None, :]
    k_mask = row_ok[:, None] & (kcols < K)[None, :]
    rows64 = rows.to(tl.int64)
    row_off = rows64 * stride_lt

    ids = tl.load(ids_ptr + rows64[:, None] * K + kcols[None, :], mask=k_mask, other=0)
    g = tl.load(
        grad_weights_ptr + rows64[:, None] * stride_gt + kcols[None, :] * stride_gk,
        mask=k_mask,
        other=0.0,
    ).to(tl.float32)
    g = g * scale
    x_chosen = tl.load(logits_ptr + row_off[:, None] + ids, mask=k_mask, other=0.0)
    x_chosen = x_chosen.to(tl.float32)
    if SOFTMAX:
        x = tl.load(logits_ptr + row_off[:, None] + cols[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        x = tl.where((cols < E)[None, :], x, float("-inf"))
        s, row_max, inv_sum = _gate_scores(x, SOFTMAX)
        w = _score_of(x_chosen, row_max, inv_sum, SOFTMAX)
    else:
        w = _score_of(x_chosen, x_chosen, x_chosen, SOFTMAX)
    w = tl.where(k_mask, w, 0.0)
    if RENORMALIZE:
        denom = tl.sum(w, axis=1)[:, None] + 1e-20
        g = g / denom - tl.sum(g * w, axis=1)[:, None] / (denom * denom)
    g = tl.where(k_mask, g, 0.0)

    out_ty = grad_logits_ptr.dtype.element_ty
    out_row = grad_logits_ptr + rows64[:, None] * E
    if SOFTMAX:
        dot = tl.sum(g * w, axis=1)[:, None]
        tl.store(out_row + cols[None, :], (-s * dot).to(out_ty), mask=tile_mask)
        selected = w * (g - dot)
    else:
        tl.store(out_row + cols[None, :], tl.zeros([BLOCK_T, BLOCK_E], tl.float32).to(out_ty), mask=tile_mask)
        selected = g * w * (1.0 - w)
    # The selected columns were just written with the dense value by other threads of this
    # program: the barrier orders those stores before the overwrite.
    tl.debug_barrier()
    tl.store(out_row + ids, selected.to(out_ty), mask=k_mask)
