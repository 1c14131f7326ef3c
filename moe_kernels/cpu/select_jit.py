"""Gate selection as one compiled loop (numba, optional: ``pip install 'moe-kernels[cpu]'``; a
wheel, no compiler needed). Without numba, or with ``MOE_KERNELS_NO_JIT=1`` in the environment,
:data:`AVAILABLE` is False and :mod:`moe_kernels.cpu.routing` runs its PyTorch path, which gives
the same answer.

:func:`route` takes the selection keys and the scores (computed by PyTorch, so that they are the
reference's bit for bit) and does the rest of ``softmax_topk`` in one pass per row: the selection
bias, the group limit, the exact top-k, the gather of the weights, the renormalisation and the
scale. The top-k reads the row once, keeping its ``k`` best keys sorted in a small buffer: a key
enters only when strictly larger than the buffer's last, and moves ahead only of strictly smaller
ones, so equal keys stay in increasing index order (+0.0 and -0.0 are equal) and NaN, compared as
-inf, never passes an eligible key. Every row is exact: no tie check follows.

Why one pass: a decode step's routing is a dozen microseconds of per-op dispatch (~1.5 us an op
on one core) around a few hundred nanoseconds of work. Measured on one core at ``(1, 64)``: the
compiled pass 1.4 us, 3.8 with its conversions to and from tensors, ``torch.topk`` alone 1.8 us,
DeepSeek-V3's eleven-op group chain 43 us. Past a decode step it is also the faster: the whole
``softmax_topk`` took 27 against the plain chain's 44 us at ``(64, 128)``, and at 1024 rows
1.4-2.8x the chain's speed on one thread and, split among numba's threads, on two. The first
call of each dtype compiles the loop (seconds, cached on disk after).
"""

from __future__ import annotations

import functools
import os
import threading

import torch

from moe_kernels.config import RENORM_EPS, RoutingConfig

try:  # optional: the PyTorch path stands without them
    import numba
    import numpy as np
except ImportError:  # pragma: no cover - exercised where numba is absent
    numba = np = None

AVAILABLE = numba is not None and os.environ.get("MOE_KERNELS_NO_JIT", "") in ("", "0")
# Rows past which, with several threads, the rows are split among numba's threads (its launch
# costs more than a decode step's rows). At 1024 rows on 2 cores the split pass took 213 / 288 us
# at E = 64 / 128 against 441 / 594 on one core, and the plain chain 345 / 596.
PARALLEL_MIN_ROWS = 64
# numba's default threading layer (workqueue) aborts the process on concurrent parallel calls:
# one at a time, others take the one-core pass.
_PARALLEL_LOCK = threading.Lock()
# What route does with the selected scores (before the scale).
WEIGHTS_SELECTED = 0  # as they are
WEIGHTS_RENORMALIZED = 1  # divided by their sum + RENORM_EPS
WEIGHTS_SOFTMAX = 2  # their softmax (the keys are logits: top-k, then softmax)


def usable(logits: torch.Tensor) -> bool:
    """Whether :func:`route` serves ``logits``: numba present, a CPU tensor, not traced."""
    return AVAILABLE and logits.is_cpu and not torch.compiler.is_compiling()


def route(
    keys: torch.Tensor,
    scores: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
    routing: RoutingConfig,
    weights_from: int,
):
    """``softmax_topk`` from ``keys (T, E)`` (the scores, or with :data:`WEIGHTS_SOFTMAX` the
    logits) and ``scores (T, E)`` (the same tensor where they are the keys), both float32 or both
    float64, and ``bias (E,)`` or None, ``1 <= k <= E``: the selected experts by ``keys + bias``
    (with ``routing``'s group limit), their ``scores`` treated by ``weights_from`` (one of the
    ``WEIGHTS_*`` constants), times ``routing.scale``.

    Returns fresh contiguous ``weights (T, k)`` in the keys' dtype, ``ids (T, k)`` int32 and
    ``bad``: None, or a ``(T,)`` bool mask of the rows holding a NaN or +inf key, whose ids and
    weights the caller must take from the reference (it scores NaN groups and softmaxes of +inf
    otherwise); their ids here are -1.
    """
    keys_array = keys.contiguous().numpy()
    scores_array = keys_array if scores is keys else scores.contiguous().numpy()
    bias = _NO_BIAS if bias is None else bias.to(keys.dtype).contiguous().numpy()
    args = (keys_array, scores_array, bias, _options(k, routing, weights_from))
    if keys_array.shape[0] > PARALLEL_MIN_ROWS:
        weights, ids, bad_rows = call_parallel(_route_rows, _route_rows_parallel, args)
    else:
        weights, ids, bad_rows = _route_rows(*args, 1)
    ids = torch.from_numpy(ids)
    # The mask only when a row holds NaN or +inf (rare): one scalar returned on the common path.
    return torch.from_numpy(weights), ids, (ids[:, 0] < 0 if bad_rows else None)


def call_parallel(serial, parallel, args: tuple):
    """``parallel(*args, threads)`` on the caller's share of the cores (``torch.get_num_threads()``,
    as torch's own ops), or ``serial(*args, 1)`` on one thread or while another parallel call runs
    (numba's default threading layer aborts the process on concurrent parallel calls)."""
    threads = torch.get_num_threads()
    if threads > 1 and _PARALLEL_LOCK.acquire(blocking=False):
        try:
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
            return parallel(*args, threads)
        finally:
            _PARALLEL_LOCK.release()
    return serial(*args, 1)


@functools.lru_cache(maxsize=256)
def _options(k: int, routing: RoutingConfig, weights_from: int):
    """The kernel's options as one float64 array (a numba call pays ~0.1 us per scalar argument,
    ~0.05 per array): ``k``, the groups, top-2 group scores, ``weights_from``, the scale."""
    groups = (routing.num_groups or 1, routing.topk_groups or 1, routing.group_score == "top2_sum")
    return np.array([k, *groups, weights_from, routing.scale], dtype=np.float64)


def _top_k_into(values, k, ranks, slots):
    """The ``k`` largest of ``values`` (no NaN) into ``ranks`` (sorted, descending) and ``slots``
    (their indices). Strict comparisons: an equal value stays behind the ones already there,
    which came first. One call per row: a numba call per value (with its array reference counts)
    cost 10x the loop."""
    filled = 0
    for index in range(values.shape[0]):
        rank = values[index]
        if filled == k:
            if not rank > ranks[k - 1]:
                continue
            slot = k - 1
        else:
            slot = filled
            filled += 1
        while slot > 0 and rank > ranks[slot - 1]:
            ranks[slot] = ranks[slot - 1]
            slots[slot] = slots[slot - 1]
            slot -= 1
        ranks[slot] = rank
        slots[slot] = index


def _route_rows_py(keys, scores, bias, options, num_threads):
    """The loop numba compiles (plain Python and NumPy; see :func:`route`), on one core (the
    thread count is :func:`call_parallel`'s, unused). Returns
    ``(weights, ids, bad_rows)``: the rows holding a NaN or +inf key (their first id -1) are
    counted."""
    weights = np.empty((keys.shape[0], int(options[0])), dtype=scores.dtype)
    ids = np.empty(weights.shape, dtype=np.int32)
    bad_rows = _route_chunk(keys, scores, bias, options, 0, keys.shape[0], weights, ids)
    return weights, ids, bad_rows


def _route_rows_parallel_py(keys, scores, bias, options, num_chunks):
    """:func:`_route_rows_py` with the rows split into ``num_chunks`` chunks (one per thread) run
    by numba's threads."""
    num_tokens = keys.shape[0]
    weights = np.empty((num_tokens, int(options[0])), dtype=scores.dtype)
    ids = np.empty(weights.shape, dtype=np.int32)
    bad_rows = np.zeros(num_chunks, dtype=np.int64)
    for chunk in numba.prange(num_chunks):
        start, stop = chunk * num_tokens // num_chunks, (chunk + 1) * num_tokens // num_chunks
        bad_rows[chunk] = _route_chunk(keys, scores, bias, options, start, stop, weights, ids)
    return weights, ids, bad_rows.sum()


def _route_chunk(keys, scores, bias, options, start, stop, weights, ids):
    """Rows ``start:stop`` of :func:`route` into ``weights`` and ``ids``; returns how many hold a
    NaN or +inf key (their first id -1)."""
    k, num_groups, topk_groups = int(options[0]), int(options[1]), int(options[2])
    group_top2, weights_from, scale = options[3] != 0, int(options[4]), options[5]
    num_experts = keys.shape[1]
    group_size = num_experts // num_groups
    bad_rows = 0
    # Scratch as views of two buffers (each allocation costs ~0.15 us): the row's keys + bias
    # (NaN as -inf, groups masked), the sorted buffers, a group's two largest, the kept groups.
    floats = np.empty(num_experts + k + 2 + 2 * num_groups, dtype=keys.dtype)
    row_keys, ranks = floats[:num_experts], floats[num_experts : num_experts + k]
    tops = floats[num_experts + k : num_experts + k + 2]
    group_scores, group_ranks = floats[-2 * num_groups : -num_groups], floats[-num_groups:]
    ints = np.empty(k + 2 * num_groups, dtype=np.int64)
    slots, group_slots, kept = ints[:k], ints[k : k + num_groups], ints[k + num_groups :]
    with_bias = bias.shape[0] > 0
    for t in range(start, stop):
        bad = False
        for e in range(num_experts):
            value = keys[t, e] + bias[e] if with_bias else keys[t, e]
            bad |= not value < np.inf  # NaN or +inf: the reference's row
            row_keys[e] = value if value == value else -np.inf
        if topk_groups < num_groups:
            for g in range(num_groups):
                # The two largest, with multiplicity, held in the keys' dtype so that their sum
                # rounds as the reference's.
                tops[0] = tops[1] = -np.inf
                for e in range(g * group_size, (g + 1) * group_size):
                    value = row_keys[e]
                    if value > tops[0]:
                        tops[1] = tops[0]
                        tops[0] = value
                    elif value > tops[1]:
                        tops[1] = value
                group_scores[g] = tops[0] + tops[1] if group_top2 else tops[0]
                kept[g] = 0
            _top_k_into(group_scores, topk_groups, group_ranks, group_slots)
            for slot in range(topk_groups):
                kept[group_slots[slot]] = 1
            for g in range(num_groups):
                if kept[g] == 0:
                    row_keys[g * group_size : (g + 1) * group_size] = -np.inf
        _top_k_into(row_keys, k, ranks, slots)
        # float64 sums and quotients, rounded once to the weights' dtype.
        total = 0.0
        for slot in range(k):
            expert = slots[slot]
            ids[t, slot] = expert
            value = scores[t, expert]
            if weights_from == WEIGHTS_SOFTMAX:  # the first selected logit is the row's max
                value = np.exp(value - scores[t, slots[0]])
            weights[t, slot] = value
            total += value
        if weights_from == WEIGHTS_RENORMALIZED:
            total += RENORM_EPS
        divisor = 1.0 if weights_from == WEIGHTS_SELECTED else total
        if divisor != 1.0 or scale != 1.0:
            for slot in range(k):
                weights[t, slot] = weights[t, slot] / divisor * scale
        if bad:
            ids[t, 0] = -1
            bad_rows += 1
    return bad_rows


if numba is not None:
    _top_k_into = numba.njit(cache=True, nogil=True)(_top_k_into)
    _route_chunk = numba.njit(cache=True, nogil=True)(_route_chunk)
    _route_rows = numba.njit(cache=True, nogil=True)(_route_rows_py)
    _route_rows_parallel = numba.njit(cache=True, nogil=True, parallel=True)(_route_rows_parallel_py)
    _NO_BIAS = np.empty(0, dtype=np.float32)
