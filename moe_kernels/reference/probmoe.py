"""Pure-PyTorch reference of the ProbMoE exact-k / dynamic-k ops: the test oracle, the
``backend="torch"`` path off the CPU and the benchmarks' eager baseline. Semantics are documented on
:func:`moe_kernels.exact_k_marginals` and :func:`moe_kernels.probmoe_route`.

The law: ``P(S) ∝ exp(sum_{i in S} r_i)`` over the subsets ``S`` of the E experts whose size is
in the band ``k_min <= |S| <= k`` (exact-k: ``k_min = k``). Per token, with ``K = k``:

- prefix DP in log space, ``alpha[i][j] = log e_j(exp(r_0..r_{i-1}))`` (``(E+1, K+1)`` table)::

      alpha[i+1][j] = logaddexp(alpha[i][j], alpha[i][j-1] + r_i)

  Every step is one ``logaddexp``; its two *shares* ``a = exp(alpha[i][j] - alpha[i+1][j])``
  ("skip expert i") and ``b = 1 - a`` ("take expert i") are probabilities, so everything after
  the table is a linear recursion on numbers in [0, 1].
- ``log Z = logsumexp_{c in band} alpha[E][c]``; the cardinality law is ``p_c = exp(alpha[E][c] -
  log Z)``.
- marginals ``m_i = d log Z / d r_i`` by the adjoint ("outside") recursion, from ``abar[E] = p``
  down: ``m_i = sum_j abar[i+1][j] b[i][j]``, ``abar[i][j] = abar[i+1][j] a[i][j] +
  abar[i+1][j+1] b[i][j+1]``.
- an exact sample by the same backward sweep (ancestral sampling): draw ``c ~ p``, then for
  ``i = E-1 .. 0`` take expert ``i`` with probability ``b[i][c_left]``.
- the gradient of the marginals, ``Cov(z) @ v`` (``dm/dr`` is the covariance of the law,
  symmetric, so the VJP is a JVP), by running both recursions on dual numbers: O(E K) per token.

Why log space and not scaled linear space: ``e_j`` spans ``exp(+-80 j)`` across the K+1 columns
of one row for logits in [-80, 80], beyond float32's range, and no single scale fits every
column. Logits are shifted by their row maximum first (``alpha[i][j]`` moves by ``j * max``,
which every share cancels), which keeps the table's magnitudes, and so its rounding, small.

Every function takes ``(T, E)`` logits and computes in float32 (float64 for float64 logits).
"""

from __future__ import annotations

import torch

from moe_kernels.utils import compute_dtype

NEG_INF = float("-inf")


def _row_max_shift(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r - max, max)`` with the max over the row's finite logits (0 for a row with none), so
    that a -inf logit stays -inf and a row without any finite logit computes no NaN from it."""
    finite = torch.where(torch.isfinite(r), r, torch.full_like(r, NEG_INF))
    row_max = finite.amax(dim=-1, keepdim=True) if r.shape[-1] else r.new_zeros(r.shape[:-1] + (1,))
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    return r - row_max, row_max


def _shift_right(x: torch.Tensor, fill: float) -> torch.Tensor:
    """``y[..., j] = x[..., j-1]``, ``y[..., 0] = fill``."""
    return torch.cat([torch.full_like(x[..., :1], fill), x[..., :-1]], dim=-1)


def _shift_left(x: torch.Tensor) -> torch.Tensor:
    """``y[..., j] = x[..., j+1]``, ``y[..., K] = 0``."""
    return torch.cat([x[..., 1:], torch.zeros_like(x[..., :1])], dim=-1)


def _shares(prev: torch.Tensor, new: torch.Tensor, take: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The skip / take shares of one logaddexp step, 0 where ``new`` is an unreachable state."""
    reachable = new > NEG_INF
    safe_new = torch.where(reachable, new, torch.zeros_like(new))
    skip = torch.where(reachable, torch.exp(prev - safe_new), torch.zeros_like(new))
    take_share = torch.where(reachable, torch.exp(take - safe_new), torch.zeros_like(new))
    return skip, take_share


def prefix_table(logits: torch.Tensor, k: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The prefix DP on max-shifted logits.

    Returns ``rows`` (E+1 tensors ``(T, k+1)``, ``rows[i][:, j] = alpha[i][j] - j * max``) and the
    row max ``(T, 1)``, in the compute dtype.
    """
    r, row_max = _row_max_shift(logits.to(compute_dtype(logits.dtype)))
    row = torch.full((r.shape[0], k + 1), NEG_INF, dtype=r.dtype, device=r.device)
    row[:, 0] = 0.0
    rows = [row]
    for i in range(r.shape[1]):
        rows.append(torch.logaddexp(rows[-1], _shift_right(rows[-1], NEG_INF) + r[:, i : i + 1]))
    return rows, row_max


def _band_law(last_row: torch.Tensor, row_max: torch.Tensor, k: int, k_min: int):
    """``(log Z (T,), p (T, k+1))`` from the table's last row: the band's log normaliser and the
    cardinality law (0 outside the band)."""
    counts = torch.arange(k + 1, device=last_row.device, dtype=last_row.dtype)
    log_e = last_row + counts * row_max  # undo the shift: log e_c of the raw logits
    in_band = (counts >= k_min) & (counts <= k)
    log_e = torch.where(in_band, log_e, torch.full_like(log_e, NEG_INF))
    log_z = torch.logsumexp(log_e, dim=-1)
    p = torch.where(in_band, torch.exp(log_e - log_z[:, None]), torch.zeros_like(log_e))
    return log_z, p


def _step_shares(rows, r, i):
    take = _shift_right(rows[i], NEG_INF) + r[:, i : i + 1]
    return _shares(rows[i], rows[i + 1], take)


def exact_k_forward(
    logits: torch.Tensor, k: int, k_min: int, uniforms: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Marginals, log normaliser and (given ``uniforms``) one exact sample.

    Args:
        logits: ``(T, E)`` float logits ``r``.
        k, k_min: the band ``k_min <= |S| <= k`` (``k_min = k``: exact-k).
        uniforms: ``(T, E+1)`` uniforms in [0, 1): column E draws the size, column i decides
            expert i. ``None``: no sample (``ids`` is ``(T, 0)``).

    Returns:
        ``marginals (T, E)`` (``P(i in S)``, summing to the expected size), ``log_z (T,)``
        (``log sum_{S in band} exp(sum_{i in S} r_i)``), both in the compute dtype, and ``ids
        (T, k)`` int32: the sampled experts in increasing id order, ``-1`` after the last.
    """
    rows, row_max = prefix_table(logits, k)
    r = logits.to(compute_dtype(logits.dtype)) - row_max
    num_tokens, num_experts = r.shape
    log_z, abar = _band_law(rows[-1], row_max, k, k_min)
    marginals = torch.empty_like(r)
    sample = uniforms is not None
    if sample:
        ids = torch.full((num_tokens, k), -1, dtype=torch.int32, device=r.device)
        cdf = torch.cumsum(abar, dim=-1)
        left = (cdf < uniforms[:, num_experts : num_experts + 1].to(r.dtype) * cdf[:, -1:]).sum(-1)
        # A row without a valid law (NaN, +inf, or no subset in the band) samples nothing.
        left = torch.where(torch.isfinite(log_z), left.clamp(k_min, k), 0)[:, None]
    for i in reversed(range(num_experts)):
        skip, take = _step_shares(rows, r, i)
        marginals[:, i] = (abar * take).sum(-1)
        if sample:
            rho = take.gather(1, left)
            chosen = (left > 0) & (uniforms[:, i : i + 1].to(r.dtype) < rho)
            slot = (left - 1).clamp(min=0)
            ids.scatter_(1, slot, torch.where(chosen, i, ids.gather(1, slot)).to(torch.int32))
            left = left - chosen.long()
        abar = abar * skip + _shift_left(abar * take)
    if not sample:
        ids = torch.empty((num_tokens, 0), dtype=torch.int32, device=r.device)
    return marginals, log_z, ids


def exact_k_backward(logits, grad_marginals, grad_log_z, k, k_min):
    """Gradient of ``(marginals, log_z)`` with respect to the logits: ``Cov(z) @ grad_marginals +
    grad_log_z * marginals``, by the prefix DP and the adjoint recursion on dual numbers.

    Args:
        logits: ``(T, E)``; grad_marginals: ``(T, E)``; grad_log_z: ``(T,)``.

    Returns:
        ``(T, E)`` in ``logits.dtype``.
    """
    rows, row_max = prefix_table(logits, k)
    cdt = compute_dtype(logits.dtype)
    r = logits.to(cdt) - row_max
    v = grad_marginals.to(cdt)
    num_experts = r.shape[1]
    # Tangents of the table in the direction v (the shift by the row max is a constant).
    dots = [torch.zeros_like(rows[0])]
    shares = []
    for i in range(num_experts):
        skip, take = _step_shares(rows, r, i)
        shares.append((skip, take))
        dots.append(skip * dots[i] + take * (_shift_right(dots[i], 0.0) + v[:, i : i + 1]))
    _, abar = _band_law(rows[-1], row_max, k, k_min)
    abar_dot = abar * (dots[-1] - (abar * dots[-1]).sum(-1, keepdim=True))
    grad = torch.empty_like(r)
    for i in reversed(range(num_experts)):
        skip, take = shares[i]
        skip_dot = skip * (dots[i] - dots[i + 1])
        marginal = (abar * take).sum(-1)
        marginal_dot = (abar_dot * take - abar * skip_dot).sum(-1)
        grad[:, i] = marginal_dot + grad_log_z.to(cdt) * marginal
        abar_dot = abar_dot * skip + abar * skip_dot + _shift_left(abar_dot * take - abar * skip_dot)
        abar = abar * skip + _shift_left(abar * take)
    return grad.to(logits.dtype)
