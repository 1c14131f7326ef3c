"""Exact top-k selection on the CPU: the ``k`` largest keys of each row, largest first, equal keys
in increasing index order, NaN keys last (ranked as -inf) - the order of
:func:`moe_kernels.reference.routing.top_k_lowest_id_first`, at little more than ``torch.topk``.

``torch.topk`` leaves the order of equal keys unspecified and ranks NaN first. Where a row's
``k`` largest keys are strictly decreasing and no other key reaches the ``k``-th (no tie inside
or at the boundary, no NaN), its answer is the only correct one; :func:`top_k` returns it with a
mask of the other rows, which the caller recomputes with the reference's exact ranking (an
order-preserving int64 packing of key and id). On random float32 keys the mask is empty; on 16-bit
logits (few distinct values) it holds a few rows.

The check selects ``k + 1`` keys and compares neighbours, a ``(T, k + 1)`` pass; for a few rows it
runs on the host, from one ``tolist`` of the
keys (cheaper than the tensor ops' dispatch). ``torch.topk`` itself (a branchy ``nth_element`` per
row, ~0.75 us per row of 64 keys on one core) is the floor of this and of every plain chain: a
vectorised selection by ``k`` rounds of row maxima measured 2x slower here, so none is used.
"""

from __future__ import annotations

import torch

POS_INF = float("inf")
# Keys (T * E) up to which the tie check reads them on the host.
HOST_CHECK_KEYS = 128


def top_k(keys: torch.Tensor, k: int, *, finite_first: bool = False):
    """The ``k`` largest of each row of ``keys (T, E)`` (any float dtype, ``1 <= k <= E``).

    Returns ``(values (T, k), ids (T, k) int64, bad)``: values descending, their column ids, and
    ``bad`` a ``(T,)`` bool mask of the rows whose answer may differ from the exact ranking (a
    tie among the ``k`` largest or at the ``k``-th, a NaN, or with ``finite_first`` a ``+inf``
    first key), or None when there is none. Values and ids of bad rows are unspecified.
    """
    num_tokens, num_experts = keys.shape
    if num_tokens * num_experts <= HOST_CHECK_KEYS:
        values, ids = torch.topk(keys, k)
        bad_rows = [
            t
            for t, (row, top) in enumerate(zip(keys.tolist(), values.tolist()))
            if not _exact(row, top, k, finite_first)
        ]
        if not bad_rows:
            return values, ids, None
        bad = torch.zeros(num_tokens, dtype=torch.bool)
        bad[bad_rows] = True
        return values, ids, bad
    # The k + 1 largest (as a multiset topk is exact; only the order of equal keys is not): the
    # answer is exact when they strictly decrease - no tie among the k, none at the k-th (the
    # (k+1)-th is smaller), no NaN (topk ranks NaN first and NaN fails every comparison). One
    # (T, k + 1) comparison, where counting the keys at or above the k-th is a (T, E) pass.
    wide, wide_ids = torch.topk(keys, min(k + 1, num_experts))
    ok = (wide[:, :-1] > wide[:, 1:]).all(-1)
    if finite_first:
        ok &= wide[:, 0] < POS_INF
    return wide[:, :k], wide_ids[:, :k], None if bool(ok.all()) else ~ok


def _exact(row: list, top: list, k: int, finite_first: bool) -> bool:
    """Whether ``top``, the k largest of ``row`` by ``torch.topk``, is the exact answer: strictly
    decreasing (NaN fails every comparison, and topk ranks NaN first), and no other key at or
    above the k-th (no tie at the boundary)."""
    if finite_first and top[0] == POS_INF:
        return False
    if not all(a > b for a, b in zip(top, top[1:])):
        return False
    return sum(map(top[-1].__le__, row)) == k
