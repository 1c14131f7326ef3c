"""The ProbMoE exact-k / dynamic-k op on the CPU: the function of
:mod:`moe_kernels.reference.probmoe`, as a DP vectorised over tokens in preallocated tables.

The reference walks the experts in log space with a dozen ops per step, twice per direction
(its backward doubles both with dual numbers). Here, for every row whose logits span a range
``R`` with ``k * R <= 600`` (every router in practice):

- the prefix and suffix tables of the elementary symmetric polynomials ``e_j`` of ``x =
  exp(r - max r)`` are built in float64 **linear** space, one in-place ``addcmul`` per expert
  each (``e[i+1][j] = e[i][j] + x_i e[i][j-1]``): no transcendental per step, and every product
  of up to ``k`` factors stays above ``e^-600`` (float64 holds ``e^+-708``), every ``e_j`` below
  ``C(E, j)``, every sum a sum of positive terms (relative error ~``E * 1e-16``);
- all marginals at once, ``m_i = x_i sum_c a_c sum_j pre[i][j] suf[i+1][c-1-j]`` (``a_c`` the
  size law over ``e_c``; exact-k ``1 / e_k``), one product and sum per admissible size;
- the backward ``Cov(z) @ v + g_logz * m`` as the tangent of those marginals in direction ``v``:
  the tables' tangents ``de[i+1][j] = de[i][j] + x_i (de[i][j-1] + v_i e[i][j-1])`` are two
  ``addcmul`` per expert each, then the same products.

Tables are laid out ``(experts + 1, k + 2, T)``: tokens innermost, so each step reads and writes
contiguous ``(k+1, T)`` blocks (a strided view runs elementwise ops several times slower), and
a zero pad row makes "size j - 1" the neighbouring block, never a ``cat``.

Sampling (``uniforms`` given) runs the reference's ancestral sweep on a log-space prefix table
computed with the reference's arithmetic (two ops per expert), so the shares, ``log Z`` and the
drawn experts are bit-identical to the reference's. Rows outside the linear range, and rows
without a valid law (NaN or +inf logits, fewer than ``k_min`` finite ones), are computed by the
reference. Tokens are processed in chunks that keep the tables under :data:`TABLE_BYTES`.
"""

from __future__ import annotations

import torch

from moe_kernels.reference import probmoe as reference
from moe_kernels.utils import compute_dtype, new_output

NEG_INF = float("-inf")
POS_INF = float("inf")
# Rows with k * (logit range) above this go to the log-space reference: every product of up to
# k factors x_i >= e^-range must stay a normal float64 (> e^-708).
LINEAR_MAX_EXPONENT = 600.0
# Bytes of float64 DP tables one chunk of tokens may hold (four (E+1, k+2, T) tables backward).
TABLE_BYTES = 128 << 20


def exact_k_forward(
    logits: torch.Tensor, k: int, k_min: int, uniforms: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`moe_kernels.reference.probmoe.exact_k_forward` for ``logits (T, E)`` on the CPU:
    ``marginals (T, E)``, ``log_z (T,)`` in the compute dtype and ``ids (T, k)`` int32 (``(T, 0)``
    without ``uniforms``), all fresh and contiguous."""
    dtype = compute_dtype(logits.dtype)
    num_tokens, num_experts = logits.shape
    # Outputs filled chunk by chunk: allocated by new_output, so a test can poison them.
    marginals = new_output((num_tokens, num_experts), dtype, logits.device)
    log_z = new_output((num_tokens,), dtype, logits.device)
    ids = new_output((num_tokens, k if uniforms is not None else 0), torch.int32, logits.device)
    for rows in _chunks(num_tokens, num_experts, k, tables=2):
        r, row_max = _shifted_logits(logits[rows])
        m, z = _linear(r, row_max, k, k_min)
        marginals[rows] = m
        log_z[rows] = z
        if uniforms is not None:
            z_exact, ids[rows] = _sample(r, row_max, uniforms[rows], k, k_min)
            log_z[rows] = z_exact
    outside = _outside_rows(logits, log_z, k)
    if outside is not None:  # the reference's arithmetic defines these rows
        exact = reference.exact_k_forward(logits[outside], k, k_min, None if uniforms is None else uniforms[outside])
        for out, value in zip((marginals, log_z, ids), exact):
            out[outside] = value.to(out.dtype)
    return marginals, log_z, ids


def exact_k_backward(
    logits: torch.Tensor, grad_marginals: torch.Tensor, grad_log_z: torch.Tensor, k: int, k_min: int
) -> torch.Tensor:
    """:func:`moe_kernels.reference.probmoe.exact_k_backward` for ``(T, E)`` logits on the CPU:
    ``Cov(z) @ grad_marginals + grad_log_z * marginals``, ``(T, E)`` in logits' dtype."""
    num_tokens, num_experts = logits.shape
    grad = new_output((num_tokens, num_experts), logits.dtype, logits.device)
    log_z = torch.empty((num_tokens,), dtype=torch.float64)
    for rows in _chunks(num_tokens, num_experts, k, tables=4):
        r, row_max = _shifted_logits(logits[rows])
        g, log_z[rows] = _linear(r, row_max, k, k_min, grad_marginals[rows], grad_log_z[rows])
        grad[rows] = g
    outside = _outside_rows(logits, log_z, k)
    if outside is not None:
        grad[outside] = reference.exact_k_backward(
            logits[outside], grad_marginals[outside], grad_log_z[outside], k, k_min
        ).to(grad.dtype)
    return grad


def _chunks(num_tokens: int, num_experts: int, k: int, tables: int) -> list[slice]:
    per_token = tables * (num_experts + 1) * (k + 2) * 8
    step = max(1, TABLE_BYTES // per_token)
    return [slice(start, min(start + step, num_tokens)) for start in range(0, num_tokens, step)]


def _shifted_logits(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's max shift, in the compute dtype: ``(r (T, E), row max (T, 1))``."""
    return reference._row_max_shift(logits.to(compute_dtype(logits.dtype)))


def _outside_rows(logits: torch.Tensor, log_z: torch.Tensor, k: int) -> torch.Tensor | None:
    """Indices of the rows the linear path does not cover: ``k`` times the range of the finite
    logits above :data:`LINEAR_MAX_EXPONENT`, or a non-finite ``log Z`` (no valid law)."""
    finite = torch.isfinite(logits)
    low = torch.where(finite, logits, POS_INF).amin(-1)
    high = torch.where(finite, logits, NEG_INF).amax(-1)
    outside = ((high - low).double() * k > LINEAR_MAX_EXPONENT) | ~torch.isfinite(log_z)
    return outside.nonzero().squeeze(1) if bool(outside.any()) else None


# ------------------------------------------------------------------------------------------------
# Linear-space DP: the suffix table is stored, the prefix streams through two small buffers.
# Layout (experts, sizes, planes, T): plane 0 the values, plane 1 (backward) their tangents in
# direction v, so that one op updates both and one dot product pairs values with tangents.


def _suffix_table(x_rows, xv_rows, k: int, num_tokens: int) -> torch.Tensor:
    """``(E+1, k+2, P, T)`` float64, sizes reversed: ``[i, k - j, 0]`` holds ``e_j`` of experts
    ``i..E-1``, ``[i, k - j, 1]`` (``P = 2``, given ``xv_rows``) its tangent; ``[:, k+1]`` is
    ``e_{-1} = 0``. Per expert one ``addcmul`` (``e[i][j] = e[i+1][j] + x_i e[i+1][j-1]``, both
    planes) and for the tangent one more (``+ x_i v_i e[i+1][j-1]``); size ``j - 1`` is the next
    block down. Reversed so that each product below pairs two ascending slices (no ``flip``)."""
    num_experts, planes = len(x_rows), 1 if xv_rows is None else 2
    table = torch.empty((num_experts + 1, k + 2, planes, num_tokens), dtype=torch.float64)
    table[:, k + 1] = 0.0
    table[num_experts, : k + 1] = 0.0
    table[num_experts, k, 0] = 1.0
    # Every view the loop touches, made once (slicing inside it costs more than its arithmetic).
    current, smaller = table[:, :-1].unbind(0), table[:, 1:].unbind(0)
    if xv_rows is None:
        for i in reversed(range(num_experts)):
            torch.addcmul(current[i + 1], smaller[i + 1], x_rows[i], out=current[i])
        return table
    current_dot, smaller_value = table[:, :-1, 1].unbind(0), table[:, 1:, 0].unbind(0)
    for i in reversed(range(num_experts)):
        torch.addcmul(current[i + 1], smaller[i + 1], x_rows[i], out=current[i])
        current_dot[i].addcmul_(smaller_value[i + 1], xv_rows[i])
    return table


def _complements(sizes: torch.Tensor, x_rows, xv_rows, k: int) -> torch.Tensor:
    """``(P, E, T)``: for each expert ``i``, ``S_i = sum_j pre[i][j] W[i+1][j]`` (``pre[i][j] =
    e_j`` of experts ``0..i-1``, streamed through two ``(k+1, P, T)`` buffers; ``W = sizes (E+1,
    k, P, T)``), and with ``P = 2`` its tangent ``sum_j (pre_dot W + pre W_dot)``."""
    num_experts, planes, num_tokens = len(x_rows), sizes.shape[2], sizes.shape[3]
    out = torch.empty((planes, num_experts, num_tokens), dtype=torch.float64)
    # Row 0 is e_{-1} = 0; rows 1..k hold e_0..e_{k-1} of the prefix so far. The prefix planes
    # are (tangent, value): swapped against the suffix's, so one dot product over (sizes,
    # planes) gives pre_dot . W + pre . W_dot.
    buffers = torch.zeros((2, k + 1, planes, num_tokens), dtype=torch.float64)
    value = planes - 1
    buffers[0, 1, value] = 1.0
    # Every view the loop touches, made once (slicing inside it costs more than its arithmetic).
    following = sizes[:, :, 0].unbind(0)
    following_both = sizes.flatten(1, 2).unbind(0)
    views = [(b[1:, value], b[1:].flatten(0, 1), b[1:], b[:-1], b[1:, 0], b[:-1, value]) for b in buffers.unbind(0)]
    for i in range(num_experts):
        pre_value, pre_both, pre_sizes, pre_smaller, _, pre_smaller_value = views[i % 2]
        nxt_sizes, nxt_dot = views[(i + 1) % 2][2], views[(i + 1) % 2][4]
        torch.linalg.vecdot(pre_value, following[i + 1], dim=0, out=out[0, i])
        torch.addcmul(pre_sizes, pre_smaller, x_rows[i], out=nxt_sizes)
        if planes == 2:
            torch.linalg.vecdot(pre_both, following_both[i + 1], dim=0, out=out[1, i])
            nxt_dot.addcmul_(pre_smaller_value, xv_rows[i])
    return out


def _sizes_view(suffix: torch.Tensor, k: int, weights: dict) -> torch.Tensor:
    """``W (E+1, k, P, T)``: ``W[i][j] = sum_c a_c e_{c-1-j}`` of experts ``i..`` over the band's
    sizes ``c`` (``weights``: ``c -> a_c (T,)``); exact-k: the view ``e_{k-1-j}`` (the caller
    applies ``a_k``)."""
    if len(weights) == 1 and k in weights:
        return suffix[:, 1 : k + 1]  # row k - (k-1-j) = 1 + j
    num_rows, _, planes, num_tokens = suffix.shape
    # e_{c-1-j} is row k-c+1+j; rows past k+1 (negative sizes) are zero.
    padded = torch.cat([suffix, suffix.new_zeros((num_rows, k, planes, num_tokens))], dim=1)
    return sum(a * padded[:, k - c + 1 : 2 * k - c + 1] for c, a in weights.items())


def _linear(r, row_max, k, k_min, grad_marginals=None, grad_log_z=None):
    """Marginals (or, given ``grad_marginals``, the gradient) and ``log Z`` of rows ``r (T, E)``
    by the float64 linear-space DP. Rows outside the linear range get garbage (replaced)."""
    num_tokens, num_experts = r.shape
    x = torch.exp(r.double().t())  # (E, T); -inf logits give exactly 0
    x_rows = x[:, None, None, :].unbind(0)  # (1, 1, T): broadcast over sizes and planes
    v = None if grad_marginals is None else grad_marginals.double().t()
    xv_rows = None if v is None else (x * v)[:, None, :].unbind(0)
    suffix = _suffix_table(x_rows, xv_rows, k, num_tokens)
    totals = suffix[0, : k + 1, 0].flip(0)  # e_0..e_k of all experts, (k+1, T)
    # The size law p_c over the band (from log e_c + c * max), and a_c = p_c / e_c.
    counts = torch.arange(k + 1, dtype=torch.float64)[:, None]
    log_e = torch.log(totals) + counts * row_max.double().t()
    log_e = torch.where((counts >= k_min) & (counts <= k), log_e, NEG_INF)
    log_z = torch.logsumexp(log_e, dim=0)
    law = torch.exp(log_e - log_z)
    # a_c (T,); 0 where e_c = 0 (fewer than c experts with a finite logit: p_c = 0 too).
    weights = {c: torch.where(totals[c] > 0, law[c] / totals[c], 0.0) for c in range(max(k_min, 1), k + 1)}
    exact = len(weights) == 1
    sums = _complements(_sizes_view(suffix, k, weights), x_rows, xv_rows, k)
    if exact:  # exact-k: a_k applied once, after the sums
        sums *= weights[k]
    marginals = x * sums[0]
    if v is None:
        return marginals.t(), log_z.to(r.dtype)
    # d Z / Z (with Z = sum_c a_c e_c + p_0 = 1): the tangents of the totals, weighted by a_c.
    totals_dot = suffix[0, : k + 1, 1].flip(0)
    z_dot = sum(a * totals_dot[c] for c, a in weights.items())
    grad = v * marginals + x * sums[1] - marginals * z_dot + grad_log_z.double() * marginals
    return grad.t(), log_z


# ------------------------------------------------------------------------------------------------
# Sampling: the reference's sweep on a log-space prefix table


def _log_prefix_table(r: torch.Tensor, k: int) -> torch.Tensor:
    """``P (E+1, k+2, T)``: ``P[i, 1:] = alpha[i]`` (log e_j of the first i experts), row 0 a
    ``-inf`` pad; the reference's ``logaddexp`` on the same operands (bit-identical values)."""
    num_tokens, num_experts = r.shape
    table = torch.empty((num_experts + 1, k + 2, num_tokens), dtype=r.dtype)
    table[:, 0] = NEG_INF
    table[0, 1] = 0.0
    table[0, 2:] = NEG_INF
    current, shifted = table[:, 1:].unbind(0), table[:, :-1].unbind(0)
    rows = r.t().unsqueeze(1).unbind(0)
    take = torch.empty_like(current[0])
    for i in range(num_experts):  # alpha[i+1][j] = logaddexp(alpha[i][j], alpha[i][j-1] + r_i)
        torch.add(shifted[i], rows[i], out=take)
        torch.logaddexp(current[i], take, out=current[i + 1])
    return table


def _sample(r, row_max, uniforms, k, k_min):
    """``(log Z (T,), ids (T, k) int32)``: the reference's ancestral sampling, -1 padded."""
    num_tokens, num_experts = r.shape
    prefix = _log_prefix_table(r, k)
    log_z, p = reference._band_law(prefix[-1, 1:].t(), row_max, k, k_min)
    ids = torch.full((k, num_tokens), -1, dtype=torch.int32)
    cdf = torch.cumsum(p, dim=-1)
    left = (cdf < uniforms[:, num_experts : num_experts + 1].to(r.dtype) * cdf[:, -1:]).sum(-1)
    left = torch.where(torch.isfinite(log_z), left.clamp(k_min, k), 0)[None, :]  # (1, T)
    draws = uniforms.to(r.dtype).t().unsqueeze(1).unbind(0)
    rows = r.t().unsqueeze(1).unbind(0)
    for i in reversed(range(num_experts)):
        # The take share of size `left` at step i (padded rows: alpha[i][left-1] is row left,
        # alpha[i+1][left] row left+1), with the reference's arithmetic.
        new = prefix[i + 1].gather(0, left + 1)
        reachable = new > NEG_INF
        rho = torch.where(
            reachable, torch.exp((prefix[i].gather(0, left) + rows[i]) - torch.where(reachable, new, 0.0)), 0.0
        )
        chosen = (left > 0) & (draws[i] < rho)
        slot = (left - 1).clamp(min=0)
        ids.scatter_(0, slot, torch.where(chosen, i, ids.gather(0, slot)).to(torch.int32))
        left = left - chosen.long()
    return log_z, ids.t()
