"""``fused_experts`` on the CPU in batch-invariant mode (:func:`moe_kernels.set_batch_invariant`):
every routed row computed by the same compiled code whatever the batch, so a token's output is
bitwise the same alone, in any batch and at any position of it.

Why not the GEMM libraries: oneDNN / MKL pick their kernels by the row count (measured, float32,
H = 2048: a row's result differs between 1, 2-15 and 16+ rows, and from 300 rows on two threads),
and a transcendental in a vectorised PyTorch loop rounds differently in the tail than in the body,
so a row's elements can change with where the row lands. Here, per routed row:

- each output feature is one dot product over ``K`` written as one compiled loop (numba), the
  same loop for every row: its summation order depends on ``K`` only (the loop is compiled with
  reassociation allowed, so it vectorises; the order it picks is fixed by the code, not by the
  batch). Rows are taken in blocks of one expert (at most :data:`BLOCK_ROWS`) so that a weight row
  read once serves the block; 16-bit weight rows are widened to float32 once per block;
- the gated activation is a scalar loop per element (``math.exp`` / ``erf`` / ``tanh``), the same
  for every element;
- 16-bit pre-activations and activations are rounded to the dtype by PyTorch conversions
  (correctly rounded, elementwise), and the ``k`` slots of a token are added in slot order.

What it costs, measured: see the README's batch-invariance table (``moe-kernels bench --op
replay``). Needs numba (``pip install 'moe-kernels[cpu]'``).
"""

from __future__ import annotations

import math

import torch

from moe_kernels.config import GPT_OSS_ALPHA, GPT_OSS_LIMIT, Activation
from moe_kernels.cpu import select_jit

try:  # the select_jit gate decides whether numba runs at all
    import numba
    import numpy as np
except ImportError:  # pragma: no cover - exercised where numba is absent
    numba = np = None

# Routed rows of one expert per block: their inputs (a few hundred KB at H = 2048) stay in cache
# while each weight row is applied to all of them.
BLOCK_ROWS = 32
_FAST = {"reassoc", "contract", "nsz", "arcp"}  # no "nnan" / "ninf": non-finite values propagate
_ACTIVATIONS = {Activation.SILU: 0, Activation.GELU: 1, Activation.GELU_TANH: 2, Activation.GPT_OSS: 3}


def _dot_block(a, rows, s0, s1, weight_row, n, out):
    """``out[s, n] = a[rows[s]] . weight_row`` for the block's rows ``s0:s1``."""
    for s in range(s0, s1):
        x = a[rows[s]]
        total = np.float32(0.0)
        for k in range(weight_row.shape[0]):
            total += x[k] * weight_row[k]
        out[s, n] = total


def _block(a, rows, weights, widen, experts, starts, b, out):
    """Block ``b`` (rows ``starts[b]:starts[b+1]``, one expert) of :func:`rows_times_weights`.
    ``weights`` holds bit patterns (one compiled body for every dtype): ``widen`` 0, float32's
    (copied); 1, bfloat16's (shifted up); 2, float16's (looked up)."""
    s0, s1 = starts[b], starts[b + 1]
    expert = experts[s0]
    width = weights.shape[2]
    bits = np.empty(width, dtype=np.uint32)
    row = bits.view(np.float32)
    for n in range(weights.shape[1]):
        source = weights[expert, n]
        if widen == 0:
            for k in range(width):
                bits[k] = source[k]
        elif widen == 1:
            for k in range(width):
                bits[k] = np.uint32(source[k]) << np.uint32(16)
        else:
            for k in range(width):
                row[k] = _HALF_TO_FLOAT[source[k]]
        _dot_block(a, rows, s0, s1, row, n, out)


def _rows_serial_py(a, rows, weights, widen, experts, starts, out, threads):
    for b in range(starts.shape[0] - 1):
        _block(a, rows, weights, widen, experts, starts, b, out)


def _rows_parallel_py(a, rows, weights, widen, experts, starts, out, threads):
    for b in numba.prange(starts.shape[0] - 1):
        _block(a, rows, weights, widen, experts, starts, b, out)


def _gate(gate, code):
    """The gate nonlinearity of activation ``code`` at one float64 value."""
    if code == 0:
        return gate / (1.0 + math.exp(-gate))
    if code == 1:
        return 0.5 * gate * (1.0 + math.erf(gate * 0.7071067811865476))
    return 0.5 * gate * (1.0 + math.tanh(0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)))


def _activate_py(h, code, scale, out):
    """``out[s] = act(h[s]) * scale[s]`` in float64 per element, one scalar loop for all."""
    half = out.shape[1]
    for s in range(h.shape[0]):
        for j in range(half):
            if code == 3:  # GPT-OSS: interleaved gate / up, clamped
                gate, up = min(h[s, 2 * j], GPT_OSS_LIMIT), min(max(h[s, 2 * j + 1], -GPT_OSS_LIMIT), GPT_OSS_LIMIT)
                value = (up + 1.0) * gate / (1.0 + math.exp(-GPT_OSS_ALPHA * gate))
            else:
                value = _gate(float(h[s, j]), code) * h[s, half + j]
            out[s, j] = value * scale[s]


if select_jit.AVAILABLE:
    _HALF_TO_FLOAT = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)
    _dot_block = numba.njit(cache=True, nogil=True, fastmath=_FAST)(_dot_block)
    _block = numba.njit(cache=True, nogil=True)(_block)
    _rows_serial = numba.njit(cache=True, nogil=True)(_rows_serial_py)
    _rows_parallel = numba.njit(cache=True, nogil=True, parallel=True)(_rows_parallel_py)
    _gate = numba.njit(cache=True, nogil=True)(_gate)
    _activate = numba.njit(cache=True, nogil=True)(_activate_py)


def _numpy_weights(weights: torch.Tensor):
    """``(array, widen)``: the ``(E, N, K)`` weights' bit patterns (uint32 / uint16), no copy of
    contiguous weights."""
    weights = weights.contiguous()
    if weights.dtype == torch.float32:
        return weights.view(torch.int32).numpy().view(np.uint32), 0
    return weights.view(torch.int16).numpy().view(np.uint16), 1 if weights.dtype == torch.bfloat16 else 2


def _blocks(experts: torch.Tensor) -> torch.Tensor:
    """Start rows of the blocks of ``experts`` (sorted): a new block at each new expert and every
    :data:`BLOCK_ROWS` rows of one, then the end row."""
    count = experts.numel()
    position = torch.arange(count)
    first = torch.ones(count, dtype=torch.bool)
    first[1:] = experts[1:] != experts[:-1]
    run_start = torch.cummax(torch.where(first, position, 0), 0).values
    starts = position[first | ((position - run_start) % BLOCK_ROWS == 0)]
    return torch.cat([starts, torch.tensor([count])])


def rows_times_weights(a: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor):
    """``out[s] = weights[experts[s]] @ a[rows[s]]``: ``a (R, K)`` float32, ``rows`` / ``experts
    (n,)`` int64 (``experts`` sorted), ``weights (E, N, K)`` -> ``(n, N)`` float32, each element
    by the one compiled loop."""
    out = np.empty((rows.numel(), weights.shape[1]), dtype=np.float32)
    array, widen = _numpy_weights(weights)
    args = (a.numpy(), rows.numpy(), array, widen, experts.numpy(), _blocks(experts).numpy(), out)
    select_jit.call_parallel(_rows_serial, _rows_parallel, args)
    return torch.from_numpy(out)


def forward(hidden, gate_up_proj, down_proj, activation, gate_up_bias, down_bias, k, slots, tokens, experts, weights):
    """``(out (T, H) in hidden's dtype, h (n, 2I))``: the layer for the routed ``slots`` (of the
    ``T * k``) sorted by expert (``tokens``, ``experts`` theirs, ``weights (n,)`` their routing
    weights), ``h`` the pre-activations in hidden's dtype. ``RuntimeError`` without numba."""
    if not select_jit.AVAILABLE:
        raise RuntimeError(
            "fused_experts: batch-invariant mode on the CPU needs numba (pip install 'moe-kernels[cpu]'; "
            "MOE_KERNELS_NO_JIT unset)"
        )
    dtype, (num_tokens, hidden_size) = hidden.dtype, hidden.shape
    h = rows_times_weights(hidden.float().contiguous(), tokens, gate_up_proj, experts)
    if gate_up_bias is not None:
        h += gate_up_bias[experts].float()
    h = h.to(dtype)  # rounded as plain PyTorch in this dtype rounds its pre-activation
    act = np.empty((h.shape[0], h.shape[1] // 2), dtype=np.float32)
    _activate(h.float().numpy(), _ACTIVATIONS[Activation.parse(activation)], weights.float().numpy(), act)
    act = torch.from_numpy(act).to(dtype).float()
    y = rows_times_weights(act, torch.arange(act.shape[0]), down_proj, experts)
    if down_bias is not None:
        y += down_bias[experts].float() * weights.float()[:, None]
    # Each token's slot rows added in slot order (empty slots 0): k elementwise float32 adds.
    per_slot = torch.zeros((num_tokens * k, hidden_size), dtype=torch.float32)
    per_slot[slots] = y
    per_slot = per_slot.view(num_tokens, k, hidden_size)
    out = per_slot[:, 0].clone()
    for slot in range(1, k):
        out += per_slot[:, slot]
    return out.to(dtype), h
