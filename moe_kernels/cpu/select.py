"""Exact top-k selection on the CPU: the ``k`` largest keys of each row, largest first, equal keys
in increasing index order, NaN keys last (ranked as -inf) - the order of
:func:`moe_kernels.reference.routing.top_k_lowest_id_first`, at little more than ``torch.topk``.

``torch.topk`` leaves the order of equal keys unspecified and ranks NaN first. Where a row's
``k + 1`` largest keys strictly decrease (no tie inside the ``k`` or at the ``k``-th, no NaN), its
answer is the only correct one. The other rows (on random float32 keys none; on 16-bit logits, with
few distinct values, many) are ranked again exactly, on their own: NaN as -inf, then the
reference's order-preserving int64 packing of key and id, one ``torch.topk``.

The check is one ``(T, k + 1)`` comparison; for a few rows (a decode step) it runs on the host,
from one ``tolist`` of the ``k + 1`` largest (cheaper than the tensor ops' dispatch).
``torch.topk`` itself (a branchy ``nth_element`` per row, ~0.75 us per row of 64 keys on one core)
is the floor of this and of every plain chain: a vectorised selection by ``k`` rounds of row
maxima measured 2x slower here, so none is used.
"""

from __future__ import annotations

import torch

from moe_kernels.reference.routing import top_k_lowest_id_first

POS_INF = float("inf")
NEG_INF = float("-inf")
# Rows up to which the check reads the k + 1 largest keys on the host.
HOST_CHECK_ROWS = 4


def top_k(keys: torch.Tensor, k: int, *, finite_first: bool = False):
    """The ``k`` largest of each row of ``keys (T, E)`` (float32 or float64, ``1 <= k <= E``).

    Returns ``(values (T, k), ids (T, k) int64, bad)``: values descending, their column ids, and
    ``bad`` None, or with ``finite_first`` a ``(T,)`` bool mask of the rows whose largest key is
    NaN or ``+inf`` (their values and ids are exact; the caller, which needs finite maxima,
    recomputes them), or None when there is none.
    """
    num_tokens, num_experts = keys.shape
    wide, wide_ids = torch.topk(keys, min(k + 1, num_experts))
    # A row is exact when its k + 1 largest strictly decrease (no tie among the k nor at the k-th;
    # NaN fails every comparison, and topk ranks it first).
    if num_tokens <= HOST_CHECK_ROWS:  # a decode step: one read of (T, k + 1) values
        tops = wide.tolist()
        inexact = _row_mask([not all(a > b for a, b in zip(top, top[1:])) for top in tops])
        not_finite = _row_mask([not top[0] < POS_INF for top in tops]) if finite_first else None
    else:
        inexact = ~(wide[:, :-1] > wide[:, 1:]).all(-1)
        inexact = inexact if bool(inexact.any()) else None
        not_finite = ~(wide[:, 0] < POS_INF) if finite_first else None  # NaN (ranked first) or +inf
        not_finite = not_finite if not_finite is not None and bool(not_finite.any()) else None
    values, ids = (wide, wide_ids) if k == wide.shape[1] else (wide[:, :k], wide_ids[:, :k])
    if inexact is not None:
        values, ids = values.clone(), ids.clone()
        tied = keys[inexact]
        exact = top_k_lowest_id_first(torch.where(tied.isnan(), NEG_INF, tied), k)
        ids[inexact] = exact
        values[inexact] = tied.gather(1, exact)
    return values, ids, not_finite


def _row_mask(flags: list[bool]) -> torch.Tensor | None:
    """The ``(T,)`` bool mask of ``flags``, or None when none is set."""
    return torch.tensor(flags) if any(flags) else None
