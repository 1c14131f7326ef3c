"""The exact top-k selection as one compiled loop (numba, optional: ``pip install
'moe-kernels[cpu]'``; a wheel, no compiler needed). Without numba, or with ``MOE_KERNELS_NO_JIT=1``
in the environment, :data:`AVAILABLE` is False and :mod:`moe_kernels.cpu.select` runs its PyTorch
path, which gives the same answer.

Each row is read once, keeping its ``k`` best keys sorted in a small buffer: a key enters only
when strictly larger than the buffer's last, and moves ahead only of strictly smaller ones, so
equal keys stay in increasing index order (+0.0 and -0.0 are equal) and NaN, compared as -inf,
never passes an eligible key. No tie check follows: every row is exact. One call replaces
``torch.topk``, the check's ops and its host read; measured on one core it costs 3.9 us at
``(1, 64)`` against ``torch.topk``'s 1.8 (the call's fixed cost), and from 64 rows it is faster
than ``torch.topk`` (21 against 31 us at ``(64, 128)``, 77 against 206 at ``(64, 512)``). The
first call of each dtype compiles the loop (about a second, cached on disk after).
"""

from __future__ import annotations

import os

import torch

try:  # optional: the PyTorch path stands without them
    import numba
    import numpy as np
except ImportError:  # pragma: no cover - exercised where numba is absent
    numba = np = None

AVAILABLE = numba is not None and os.environ.get("MOE_KERNELS_NO_JIT", "") in ("", "0")
POS_INF = float("inf")
_JIT_DTYPES = (torch.float32, torch.float64)
# The pass runs on one core, while torch.topk splits the rows among the threads. On one core the
# pass takes 0.87 / 0.65 / 0.41 of torch.topk's time at 1024 rows of E = 64 / 128 / 512, so with
# n threads it still wins where E >= MULTITHREAD_MIN_EXPERTS * (n - 1); below that torch.topk runs
# past MULTITHREAD_MAX_ROWS rows (on 2 cores it was 1.4-1.8x faster at E = 64-128).
MULTITHREAD_MAX_ROWS = 64
MULTITHREAD_MIN_EXPERTS = 384


def usable(keys: torch.Tensor) -> bool:
    """Whether :func:`top_k` takes ``keys (T, E)``: numba present, CPU, float32 / float64, not
    traced, and where it is the faster (see :data:`MULTITHREAD_MAX_ROWS`)."""
    if not AVAILABLE or keys.dtype not in _JIT_DTYPES or not keys.is_cpu or torch.compiler.is_compiling():
        return False
    num_tokens, num_experts = keys.shape
    if num_tokens <= MULTITHREAD_MAX_ROWS:
        return True
    return num_experts >= MULTITHREAD_MIN_EXPERTS * (torch.get_num_threads() - 1)


def top_k(keys: torch.Tensor, k: int, finite_first: bool, id_dtype: torch.dtype = torch.int64):
    """:func:`moe_kernels.cpu.select.top_k` of ``keys (T, E)`` in one compiled pass: fresh
    contiguous ``values (T, k)`` (the keys, NaN included), ``ids (T, k)`` of ``id_dtype`` (int64
    or int32), and with ``finite_first`` the ``(T,)`` bool mask of rows holding NaN or +inf (None
    when none)."""
    keys = keys.contiguous()
    num_tokens = keys.shape[0]
    values = torch.empty((num_tokens, k), dtype=keys.dtype)
    ids = torch.empty((num_tokens, k), dtype=id_dtype)
    any_not_finite = _select_rows(keys.numpy(), k, values.numpy(), ids.numpy())
    # The mask only when some key is NaN or +inf (rare): a decode step allocates two tensors.
    bad = ~(keys.amax(dim=-1) < POS_INF) if finite_first and any_not_finite else None
    return values, ids, bad


def _select_rows_py(keys, k, values, ids):
    """The loop numba compiles (plain Python and NumPy; see the module doc); returns whether any
    key is NaN or +inf."""
    num_tokens, num_experts = keys.shape
    ranks = np.empty(k, dtype=keys.dtype)  # the buffer's keys, NaN as -inf
    not_finite = False
    for t in range(num_tokens):
        row = keys[t]
        filled = 0
        for e in range(num_experts):
            value = row[e]
            rank = value if value == value else -np.inf
            if not value < np.inf:  # NaN or +inf
                not_finite = True
            if filled == k:
                if not rank > ranks[k - 1]:
                    continue
                slot = k - 1
            else:
                slot = filled
                filled += 1
            while slot > 0 and rank > ranks[slot - 1]:
                ranks[slot] = ranks[slot - 1]
                values[t, slot] = values[t, slot - 1]
                ids[t, slot] = ids[t, slot - 1]
                slot -= 1
            ranks[slot] = rank
            values[t, slot] = value
            ids[t, slot] = e
    return not_finite


_select_rows = numba.njit(cache=True, nogil=True)(_select_rows_py) if numba is not None else None
