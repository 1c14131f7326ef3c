"""Pure-PyTorch reference of the fused MoE experts op (grouped GEMM + gated activation + weighted
combine): the oracle of the tests and ``moe-kernels validate``, the ``backend="torch"`` path off
the CPU, and the benchmarks' eager baseline.

Layout follows HF transformers v5: ``gate_up_proj (E, 2I, H)`` (gate rows then up rows; GPT-OSS
interleaves them), ``down_proj (E, H, I)``. Slots are sorted by expert and each expert's rows are
multiplied by a grouped GEMM with :func:`torch._grouped_mm`'s convention, so there is no Python loop
over experts or tokens. Computes in float32 (float64 for float64 activations, so that ``gradcheck``
can run on it); outputs come back in the activation dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from moe_kernels.config import GPT_OSS_ALPHA, GPT_OSS_LIMIT, Activation
from moe_kernels.utils import compute_dtype


def expert_counts(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Number of slots routed to each expert.

    ``ids (T, k)`` int32/int64 (-1 = empty slot, not counted) -> ``(E,)`` int32.
    """
    # Shift by one so that -1 lands in bin 0, which is dropped: no data-dependent masking.
    shifted = ids.reshape(-1).long() + 1
    return torch.bincount(shifted, minlength=num_experts + 1)[1 : num_experts + 1].to(torch.int32)


def _group_layout(offsets: torch.Tensor, num_rows: int):
    """Where each of the first ``offsets[-1]`` rows goes in a padded batch of the groups that
    have rows: ``(used (U,) int64, the groups with rows; slot (n,) int64, each row's index in
    used; pos (n,) int64, its position in its group; n; max_rows)``."""
    ends = offsets.long()
    num_groups = ends.numel()
    num_valid = int(ends[-1]) if num_groups else 0
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    counts = ends - starts
    max_rows = int(counts.max()) if num_groups else 0
    used = torch.nonzero(counts > 0).reshape(-1)
    rows = torch.arange(min(num_valid, num_rows), device=offsets.device)
    group = torch.searchsorted(ends, rows, right=True)
    return used, torch.searchsorted(used, group), rows - starts[group], rows.numel(), max_rows


def _pad(x: torch.Tensor, slot: torch.Tensor, pos: torch.Tensor, num_slots: int, max_rows: int) -> torch.Tensor:
    """Rows ``x (n, D)`` scattered into a zero ``(U, max_rows, D)`` batch."""
    padded = x.new_zeros(num_slots, max_rows, x.shape[-1])
    padded[slot, pos] = x
    return padded


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Grouped matmul with :func:`torch._grouped_mm`'s convention.

    ``a (M, K)``, ``b (G, K, N)``, ``offsets (G,)`` int32 (cumulative end row of each group) ->
    ``(M, N)`` in ``a.dtype``: rows ``offsets[g-1]:offsets[g]`` (from 0 for ``g = 0``) are
    ``a[rows] @ b[g]``; empty groups are allowed and rows at or past ``offsets[-1]`` are zero.

    The rows are scattered into a zero-padded ``(U, max_rows, K)`` batch of the ``U`` groups that
    have rows, for one ``bmm`` with those groups' ``b`` only (memory ``U * max_rows * K``, rather
    than the ``M * K * N`` of gathering ``b`` per row; a decode batch touches few of the ``G``
    experts, and only those are read and converted). Reads the group sizes on the host.
    """
    dtype = compute_dtype(a.dtype)
    num_rows, n_cols = a.shape[0], b.shape[-1]
    used, slot, pos, num_valid, max_rows = _group_layout(offsets, num_rows)
    padded = _pad(a[:num_valid].to(dtype), slot, pos, used.numel(), max_rows)
    products = torch.bmm(padded, b[used].to(dtype))
    out = a.new_zeros(num_rows, n_cols, dtype=dtype)
    out[:num_valid] = products[slot, pos]
    return out.to(a.dtype)


def grouped_mm_backward(
    grad_out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`grouped_mm` written out.

    ``grad_out (M, N)``, ``a (M, K)``, ``b (G, K, N)``, ``offsets (G,)`` int32 ->
    ``grad_a (M, K)`` in ``a.dtype`` (``grad_out[rows] @ b[g]^T``, zero past ``offsets[-1]``) and
    ``grad_b (G, K, N)`` in ``b.dtype`` (``a[rows]^T @ grad_out[rows]``, zero for empty groups).
    """
    dtype = compute_dtype(a.dtype)
    num_rows = a.shape[0]
    used, slot, pos, num_valid, max_rows = _group_layout(offsets, num_rows)
    grad_pad = _pad(grad_out[:num_valid].to(dtype), slot, pos, used.numel(), max_rows)  # (U, R, N)
    a_pad = _pad(a[:num_valid].to(dtype), slot, pos, used.numel(), max_rows)  # (U, R, K)
    grad_a = a.new_zeros(a.shape, dtype=dtype)
    grad_a[:num_valid] = torch.bmm(grad_pad, b[used].to(dtype).transpose(1, 2))[slot, pos]
    grad_b = b.new_zeros(b.shape, dtype=dtype)
    grad_b[used] = torch.bmm(a_pad.transpose(1, 2), grad_pad)
    return grad_a.to(a.dtype), grad_b.to(b.dtype)


def _split_gate_up(x: torch.Tensor, activation: Activation) -> tuple[torch.Tensor, torch.Tensor]:
    if activation == Activation.GPT_OSS:
        return x[..., 0::2], x[..., 1::2]
    return x.chunk(2, dim=-1)


def gated_activation(
    gate_up: torch.Tensor, activation: str, *, limit: float = GPT_OSS_LIMIT, alpha: float = GPT_OSS_ALPHA
) -> torch.Tensor:
    """Gated activation of the expert MLP.

    ``gate_up (..., 2I)`` -> ``(..., I)`` in ``gate_up.dtype``:

    - ``"silu"`` (SwiGLU): ``silu(gate) * up`` with ``gate, up`` the first and second halves;
    - ``"gelu"`` / ``"gelu_tanh"`` (GeGLU): ``gelu(gate) * up``, exact erf or tanh approximation;
    - ``"gpt_oss"``: ``gate, up = gate_up[..., 0::2], gate_up[..., 1::2]`` (interleaved),
      ``gate = gate.clamp(max=limit)``, ``up = up.clamp(-limit, limit)``,
      ``(up + 1) * gate * sigmoid(alpha * gate)``.
    """
    activation = Activation.parse(activation)
    gate, up = _split_gate_up(gate_up.to(compute_dtype(gate_up.dtype)), activation)
    if activation == Activation.SILU:
        out = F.silu(gate) * up
    elif activation == Activation.GELU:
        out = F.gelu(gate) * up
    elif activation == Activation.GELU_TANH:
        out = F.gelu(gate, approximate="tanh") * up
    else:
        gate = gate.clamp(max=limit)
        up = up.clamp(-limit, limit)
        out = (up + 1.0) * gate * torch.sigmoid(alpha * gate)
    return out.to(gate_up.dtype)


def gated_activation_backward(grad_out, gate_up, activation, *, limit=GPT_OSS_LIMIT, alpha=GPT_OSS_ALPHA):
    """Gradient of :func:`gated_activation` by autograd (an independent derivation: the package's
    written-out formula, :func:`moe_kernels.activations.gated_activation_backward`, is checked
    against it).

    ``grad_out (..., I)``, ``gate_up (..., 2I)`` -> ``grad_gate_up (..., 2I)`` in
    ``gate_up.dtype``. GPT-OSS clamps pass the gradient where ``-limit <= x <= limit`` (boundary
    included, as torch autograd's ``clamp``) and zero elsewhere.
    """
    with torch.enable_grad():  # in the compute dtype: one rounding to gate_up's dtype at the end
        x = gate_up.detach().to(compute_dtype(gate_up.dtype)).requires_grad_(True)
        out = gated_activation(x, activation, limit=limit, alpha=alpha)
        (grad,) = torch.autograd.grad(out, x, grad_out.to(out.dtype))
    return grad.to(gate_up.dtype)


def _sorted_slots(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The non-empty slots of ``ids (T, k)`` sorted by expert (stable): flat slot indices ``(n,)``,
    their tokens ``(n,)`` and experts ``(n,)`` int64, and the ``(E,)`` int32 group offsets."""
    flat = ids.reshape(-1).long()
    key = torch.where(flat < 0, torch.full_like(flat, num_experts), flat)  # empty slots sort last
    order = torch.argsort(key, stable=True)
    offsets = expert_counts(ids, num_experts).cumsum(0).to(torch.int32)
    slots = order[: int(offsets[-1])]
    return slots, slots // max(ids.shape[-1], 1), key[slots], offsets


class _Intermediates(NamedTuple):
    """Per sorted slot, in the compute dtype: the input rows ``x (n, H)``, the pre-activation
    ``h (n, 2I)``, the activation ``act (n, I)`` and the expert output ``y (n, H)``; the routing
    from :func:`_sorted_slots`; the weights in grouped-GEMM layout ``w1 (E, H, 2I)``, ``w2 (E, I, H)``."""

    slots: torch.Tensor
    tokens: torch.Tensor
    experts: torch.Tensor
    offsets: torch.Tensor
    w1: torch.Tensor
    w2: torch.Tensor
    x: torch.Tensor
    h: torch.Tensor
    act: torch.Tensor
    y: torch.Tensor


def _expert_forward(hidden, gate_up_proj, down_proj, ids, activation, gate_up_bias, down_bias) -> _Intermediates:
    dtype = compute_dtype(hidden.dtype)
    slots, tokens, experts, offsets = _sorted_slots(ids, gate_up_proj.shape[0])
    # In their own dtype: grouped_mm converts only the experts that have rows.
    w1 = gate_up_proj.transpose(1, 2)
    w2 = down_proj.transpose(1, 2)
    x = hidden.to(dtype)[tokens]
    h = grouped_mm(x, w1, offsets)
    if gate_up_bias is not None:
        h = h + gate_up_bias.to(dtype)[experts]
    act = gated_activation(h, activation)
    y = grouped_mm(act, w2, offsets)
    if down_bias is not None:
        y = y + down_bias.to(dtype)[experts]
    return _Intermediates(slots, tokens, experts, offsets, w1, w2, x, h, act, y)


def sorted_pre_activations(
    hidden: torch.Tensor, gate_up_proj: torch.Tensor, ids: torch.Tensor, gate_up_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``h (T*k, 2I)`` in hidden's dtype: the pre-activation ``gate_up_proj[e] @ hidden[t] +
    gate_up_bias[e]`` of every non-empty slot in expert-sorted order (stable), then zero rows for
    the empty slots: the rows the Triton path saves for its backward."""
    dtype = compute_dtype(hidden.dtype)
    slots, tokens, experts, offsets = _sorted_slots(ids, gate_up_proj.shape[0])
    h = grouped_mm(hidden.to(dtype)[tokens], gate_up_proj.transpose(1, 2), offsets)
    if gate_up_bias is not None:
        h = h + gate_up_bias.to(dtype)[experts]
    out = h.new_zeros(ids.numel(), gate_up_proj.shape[1])
    out[: h.shape[0]] = h
    return out.to(hidden.dtype)


def fused_experts(
    hidden, gate_up_proj, down_proj, weights, ids, *, activation="silu", gate_up_bias=None, down_bias=None
):
    """Reference of the fused MoE experts op (arguments assumed valid).

    ``hidden (T, H)``, ``gate_up_proj (E, 2I, H)``, ``down_proj (E, H, I)``, ``weights (T, k)``
    float, ``ids (T, k)`` int32/int64 (-1 = empty slot), ``gate_up_bias (E, 2I)`` and
    ``down_bias (E, H)`` optional -> ``(T, H)`` in ``hidden.dtype``::

        out[t] = sum_j weights[t, j] * (down_proj[e] @ act(gate_up_proj[e] @ hidden[t] + gate_up_bias[e])
                                        + down_bias[e]),   e = ids[t, j] != -1

    Differentiable by autograd with respect to every float input.
    """
    Activation.parse(activation)
    fwd = _expert_forward(hidden, gate_up_proj, down_proj, ids, activation, gate_up_bias, down_bias)
    y = fwd.y
    slot_weights = weights.reshape(-1)[fwd.slots].to(y.dtype)
    out = y.new_zeros(hidden.shape[0], y.shape[-1])
    out.index_add_(0, fwd.tokens, y * slot_weights.unsqueeze(-1))
    return out.to(hidden.dtype)


def fused_experts_backward(
    grad_out, hidden, gate_up_proj, down_proj, weights, ids, *, activation="silu", gate_up_bias=None, down_bias=None
):
    """Gradients of :func:`fused_experts` written out (the forward intermediates are recomputed).

    ``grad_out (T, H)`` and the forward's inputs and options -> ``grad_hidden (T, H)``,
    ``grad_gate_up_proj (E, 2I, H)``, ``grad_down_proj (E, H, I)``, ``grad_weights (T, k)`` (zero
    at empty slots), ``grad_gate_up_bias (E, 2I)`` and ``grad_down_bias (E, H)`` (None without
    the bias), each in its input's dtype.
    """
    Activation.parse(activation)
    fwd = _expert_forward(hidden, gate_up_proj, down_proj, ids, activation, gate_up_bias, down_bias)
    y, tokens, experts, offsets = fwd.y, fwd.tokens, fwd.experts, fwd.offsets
    dtype = y.dtype
    num_experts = gate_up_proj.shape[0]

    grad_y_combined = grad_out.to(dtype)[tokens]  # (n, H)
    grad_weights = weights.new_zeros(weights.numel(), dtype=dtype)
    grad_weights[fwd.slots] = (grad_y_combined * y).sum(dim=-1)
    slot_weights = weights.reshape(-1)[fwd.slots].to(dtype)
    grad_y = grad_y_combined * slot_weights.unsqueeze(-1)

    grad_down_bias = None
    if down_bias is not None:
        grad_down_bias = y.new_zeros(num_experts, y.shape[-1]).index_add_(0, experts, grad_y)
    grad_act, grad_w2 = grouped_mm_backward(grad_y, fwd.act, fwd.w2, offsets)
    grad_h = gated_activation_backward(grad_act, fwd.h, activation)
    grad_gate_up_bias = None
    if gate_up_bias is not None:
        grad_gate_up_bias = grad_h.new_zeros(num_experts, grad_h.shape[-1]).index_add_(0, experts, grad_h)
    grad_x, grad_w1 = grouped_mm_backward(grad_h, fwd.x, fwd.w1, offsets)
    grad_hidden = grad_x.new_zeros(hidden.shape).index_add_(0, tokens, grad_x)

    return (
        grad_hidden.to(hidden.dtype),
        grad_w1.transpose(1, 2).contiguous().to(gate_up_proj.dtype),
        grad_w2.transpose(1, 2).contiguous().to(down_proj.dtype),
        grad_weights.reshape(weights.shape).to(weights.dtype),
        None if grad_gate_up_bias is None else grad_gate_up_bias.to(gate_up_bias.dtype),
        None if grad_down_bias is None else grad_down_bias.to(down_bias.dtype),
    )
