"""Exact top-k selection on the CPU: the ``k`` largest keys of each row, largest first, equal keys
in increasing index order, NaN keys last (ranked as -inf) - the order of
:func:`moe_kernels.reference.routing.top_k_lowest_id_first`, at little more than ``torch.topk``.

The PyTorch path of the CPU routing (with numba installed, :mod:`moe_kernels.cpu.select_jit`'s
compiled pass selects instead, in the same order). ``torch.topk`` leaves the order of equal keys
unspecified and ranks NaN first, and there are two ways to be exact:

- :func:`exact_ids`: one ``torch.topk`` on float64 keys made unique (each float32 key moved down
  by a multiple of its id far below the float32 spacing), four elementwise ops before it.
- Check ``torch.topk``'s own answer: where a row's ``k + 1`` largest keys strictly decrease (no tie
  among the ``k`` nor at the ``k``-th, no NaN) it is the only correct one. On random float32 keys
  every row passes; the other rows are ranked again by :func:`exact_ids` (up to
  :data:`DECODE_ROWS` rows every row: a few ops on a few rows cost less than gathering and
  scattering the tied ones). The check costs a few ops, not a few per row: for a decode step (up
  to :data:`HOST_CHECK_ROWS` rows) one ``tolist`` of the ``k + 1`` largest, otherwise one
  comparison of two strided views, one reduction and one read.

Keys from 16-bit logits (few distinct values) tie in most rows of a batch, so there
:func:`exact_ids` runs alone (``ties_likely``) past a decode step; float32 keys take the check. Every op is ~1.5 us of
dispatch on one core, as much as a decode step's whole ``torch.topk``, which is the floor of this
and of every plain chain (a branchy ``nth_element`` per row, ~0.75 us per row of 64 keys; a
vectorised selection by ``k`` rounds of row maxima measured 2x slower here, so none is used).
"""

from __future__ import annotations

import functools

import torch

from moe_kernels.reference.routing import top_k_lowest_id_first

POS_INF = float("inf")
NEG_INF = float("-inf")
# Rows up to which the check reads the k + 1 largest keys on the host.
HOST_CHECK_ROWS = 4
# Rows up to which a tie anywhere ranks every row again (past it: only the tied rows).
DECODE_ROWS = 64
# exact_ids' tie break: a key moves down by its id times this share of its magnitude, ...
TIE_STEP = 2.0**-48
# ... plus this (so that zeros move too: id * 2^-248, exact in float64), ...
ZERO_MAGNITUDE = 2.0**-200
# ... with NaN and -inf at -FAR and +inf at FAR: finite float64 keys beyond every float32.
FAR = 2.0**200


def top_k(
    keys: torch.Tensor,
    k: int,
    *,
    finite_first: bool = False,
    ties_likely: bool = False,
    id_dtype: torch.dtype = torch.int64,
):
    """The ``k`` largest of each row of ``keys (T, E)`` (float32 or float64, ``1 <= k <= E``);
    ``ties_likely`` (keys from 16-bit values) ranks every row by :func:`exact_ids` at once past
    :data:`HOST_CHECK_ROWS` rows (a row ties with odds of 21% at E = 64 to 65% at E = 512 on
    bfloat16 logits: for a decode step the check, cheap on the host, still wins).

    Returns ``(values (T, k), ids (T, k) id_dtype, bad)``: values, descending, and their column
    ids (int64 or int32; views of fresh tensors, not always contiguous), and ``bad`` None, or with
    ``finite_first`` a ``(T,)`` bool mask of the rows holding a NaN or ``+inf`` key (their values
    and ids are exact; the caller, which needs finite maxima, recomputes them), or None when there
    is none.
    """
    values, ids, bad = _torch_top_k(keys, k, finite_first, ties_likely)
    return values, (ids if id_dtype == torch.int64 else ids.to(id_dtype)), bad


def _torch_top_k(keys: torch.Tensor, k: int, finite_first: bool, ties_likely: bool):
    """:func:`top_k` in PyTorch ops, ids int64."""
    num_tokens, num_experts = keys.shape
    if ties_likely and num_tokens > HOST_CHECK_ROWS:
        ids = exact_ids(keys, k)
        # amax propagates NaN: one read tells whether any row holds NaN or +inf.
        bad = None
        if finite_first and not keys.amax().item() < POS_INF:
            bad = ~(keys.amax(dim=-1) < POS_INF)
        return keys.gather(1, ids), ids, bad
    width = min(k + 1, num_experts)
    wide, wide_ids = torch.topk(keys, width)
    # topk ranks NaN first: a row holds NaN or +inf exactly when its largest key is one.
    if num_tokens <= HOST_CHECK_ROWS:
        tops = wide.tolist()
        # topk's values never increase, so strictly decreasing = no repeat (0.0 and -0.0 repeat)
        # and no NaN (ranked first): one set instead of k comparisons.
        tied_rows = [top[0] != top[0] or len(set(top)) < width for top in tops]
        tied = True in tied_rows
        bad = [not top[0] < POS_INF for top in tops] if finite_first else ()
        bad = torch.tensor(bad) if True in bad else None
    else:
        # Each key against the next, as two strided views of the fresh (T, k + 1) values (diff and
        # slicing cost several dispatches each); NaN fails the comparison.
        pairs = (num_tokens, width - 1)
        steps_down = torch.gt(wide.as_strided(pairs, (width, 1)), wide.as_strided(pairs, (width, 1), 1))
        tied_rows = None
        tied = not steps_down.all().item()
        bad = ~(wide[:, 0] < POS_INF) if finite_first and not wide.amax().item() < POS_INF else None
    if tied and num_tokens <= DECODE_ROWS:
        ids = exact_ids(keys, k)
        return keys.gather(1, ids), ids, bad
    # The first k columns as views (one cheap dispatch each; the callers' next op copies them).
    values, ids = wide.as_strided((num_tokens, k), (width, 1)), wide_ids.as_strided((num_tokens, k), (width, 1))
    if tied:  # past DECODE_ROWS: the tied rows alone
        rows = torch.tensor(tied_rows) if tied_rows is not None else ~steps_down.all(-1)
        tied_keys = keys[rows]
        exact = exact_ids(tied_keys, k)
        ids[rows] = exact
        values[rows] = tied_keys.gather(1, exact)
    return values, ids, bad


def exact_ids(keys: torch.Tensor, k: int) -> torch.Tensor:
    """The ids ``(T, k)`` int64 of the ``k`` largest of ``keys (T, E)`` in the reference's order
    (equal keys lower id first, -0.0 equal to +0.0, NaN as -inf).

    float32 keys: one ``torch.topk`` on unique float64 keys, each key moved down by its id times
    :data:`TIE_STEP` of its magnitude (plus :data:`ZERO_MAGNITUDE`, so zeros move too), with NaN
    and -inf at ``-FAR`` and +inf at ``FAR``. A float32 key has 29 bits to spare in float64: moves
    of at most ``E * 2^-48`` of the magnitude (E < 2^23) never reach half the gap to the next
    float32 key, so the order of unequal keys stands, while one step (2^-48 of the magnitude, 16
    float64 ulps) survives rounding, so equal keys rank by id. Four elementwise ops where the
    reference's int64 packing takes a dozen (float64 keys, with no bits to spare, take it).
    """
    if keys.dtype != torch.float32:
        return top_k_lowest_id_first(torch.where(keys.isnan(), NEG_INF, keys), k)
    wide = keys.to(torch.float64).nan_to_num_(nan=-FAR, posinf=FAR, neginf=-FAR)
    magnitude = wide.abs().add_(ZERO_MAGNITUDE)
    return torch.addcmul(wide, magnitude, _negative_steps(keys.shape[1], keys.device)).topk(k).indices


@functools.lru_cache(maxsize=64)
def _negative_steps(num_experts: int, device: torch.device) -> torch.Tensor:
    """``-id * TIE_STEP`` for the ids of ``num_experts`` keys, float64 on ``device``."""
    if num_experts >= 1 << 23:
        raise ValueError(f"exact_ids: E must be below 2^23, got {num_experts}")
    return torch.arange(num_experts, dtype=torch.float64, device=device).mul_(-TIE_STEP)
