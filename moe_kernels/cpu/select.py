"""Exact top-k selection on the CPU: the ``k`` largest keys of each row, largest first, equal keys
in increasing index order, NaN keys last (ranked as -inf) - the order of
:func:`moe_kernels.reference.routing.top_k_lowest_id_first`, at a fraction of its cost.

``torch.topk`` is fast but leaves the order of equal keys unspecified and ranks NaN first. Where
the ``k + 1`` largest keys of a row are strictly decreasing (no tie among them or at the boundary,
no NaN) its answer is the only correct one; :func:`top_k` returns it with a mask of the other rows
(ties, NaN), which the caller recomputes with the reference's exact ranking. On random float32
keys that mask is empty; on 16-bit logits (few distinct values) it holds a few rows.

Two selections, by size:

- small ``T * E`` (decode, short prefill): ``torch.topk(k + 1)`` and a strictly-decreasing check;
  for a few rows, ``torch.topk(k)`` and the check on the host through ``tolist`` (two reads
  instead of five tensor ops);
- large ``T * E``: ``k`` rounds of a vectorised row max, each masking the keys at or above the
  last max, then the ``k`` survivors' ids by one ``nonzero`` and their order by one
  ``searchsorted``. ``torch.topk`` on the CPU runs a branchy ``nth_element`` per row (about
  1 us per row of 64 keys); a round is two vectorised passes over ``(T, E)``, so for ``k <= 16``
  the rounds win from a few hundred rows up (``benchmarks/bench_cpu.py`` has the numbers).
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")
POS_INF = float("inf")
# Keys (T * E) up to which the tie check reads them on the host.
HOST_CHECK_KEYS = 128
# The rounds replace torch.topk from this many keys (T * E) on, for k up to ROUNDS_MAX_K.
ROUNDS_MIN_KEYS = 16384
ROUNDS_MAX_K = 16


def top_k(keys: torch.Tensor, k: int, *, finite_first: bool = False):
    """The ``k`` largest of each row of ``keys (T, E)`` (any float dtype, ``1 <= k <= E``).

    Returns ``(values (T, k), ids (T, k) int64, bad)``: values descending, their column ids, and
    ``bad`` a ``(T,)`` bool mask of the rows whose answer may differ from the exact ranking (a tie
    among the ``k + 1`` largest, a NaN, or with ``finite_first`` a ``+inf`` first key), or None
    when there is none. Values and ids of bad rows are unspecified. ``values`` may be a view.
    """
    num_tokens, num_experts = keys.shape
    if k <= ROUNDS_MAX_K and k < num_experts and num_tokens * num_experts >= ROUNDS_MIN_KEYS:
        return _top_k_rounds(keys, k, finite_first)
    return _top_k_checked(keys, k, finite_first)


def _top_k_checked(keys: torch.Tensor, k: int, finite_first: bool):
    num_tokens, num_experts = keys.shape
    if num_tokens * num_experts <= HOST_CHECK_KEYS:
        # A few rows: torch.topk(k) and the check on the host, reading every key (no k+1 column
        # to cut off afterwards: on tiny tensors each view or copy costs more than the top-k).
        values, ids = torch.topk(keys, k)
        bad_rows = [
            t
            for t, (row, top) in enumerate(zip(keys.tolist(), values.tolist()))
            if not _exact(row, top, k, finite_first)
        ]
        bad = None
        if bad_rows:
            bad = torch.zeros(num_tokens, dtype=torch.bool)
            bad[bad_rows] = True
        return values, ids, bad
    width = min(k + 1, num_experts)
    values, ids = torch.topk(keys, width)
    first = values.select(1, 0)
    ok = (values.narrow(1, 0, width - 1) > values.narrow(1, 1, width - 1)).all(-1) if width > 1 else first == first
    if finite_first:
        ok &= first < POS_INF
    bad = None if bool(ok.all()) else ~ok
    if width > k:  # narrow: a view, without the cost of Python slicing
        values, ids = values.narrow(1, 0, k), ids.narrow(1, 0, k)
    return values, ids, bad


def _exact(row: list, top: list, k: int, finite_first: bool) -> bool:
    """Whether ``top``, the k largest of ``row`` by ``torch.topk``, is the exact answer: strictly
    decreasing (NaN fails every comparison, and topk ranks NaN first), and no other key at or
    above the k-th (no tie at the boundary)."""
    if finite_first and top[0] == POS_INF:
        return False
    if not all(a > b for a, b in zip(top, top[1:])):
        return False
    return sum(map(top[-1].__le__, row)) == k


def _top_k_rounds(keys: torch.Tensor, k: int, finite_first: bool):
    num_tokens, num_experts = keys.shape
    maxima = [keys.amax(-1, keepdim=True)]
    rest = keys
    for _ in range(k - 1):
        # Equal keys fall together: a tie shows as a count above k below (or as equal maxima).
        rest = rest.masked_fill(rest >= maxima[-1], NEG_INF)
        maxima.append(rest.amax(-1, keepdim=True))
    values = torch.cat(maxima, dim=1)  # (T, k), descending where the row is exact
    chosen = keys >= values[:, k - 1 :]
    # Exact rows: exactly k keys at or above the k-th max (no tie at the boundary), maxima
    # strictly decreasing (no tie among them, which also rules out -inf repeats), no NaN (a NaN
    # max makes every comparison false, so the count is 0).
    ok = chosen.sum(-1) == k
    ok &= (values[:, :-1] > values[:, 1:]).all(-1)
    if finite_first:
        ok &= values[:, 0] < POS_INF
    bad = None if bool(ok.all()) else ~ok
    if bad is not None:  # give bad rows k arbitrary columns so the extraction keeps its shape
        first = torch.arange(num_experts) < k
        chosen = torch.where(ok[:, None], chosen, first)
    ascending = chosen.nonzero()[:, 1].view(num_tokens, k)  # ids of each row's k keys, increasing
    # Each key's place in the descending maxima (exact rows: one distinct maximum per key).
    rank = torch.searchsorted(values.neg(), keys.gather(1, ascending).neg())
    if bad is not None:
        rank = torch.where(ok[:, None], rank, torch.arange(k))
    ids = torch.empty_like(ascending).scatter_(1, rank, ascending)
    return values, ids, bad
