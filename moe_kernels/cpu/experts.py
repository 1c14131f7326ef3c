"""``grouped_mm`` and ``fused_experts`` on the CPU, on ``torch._grouped_mm``: the functions of
:mod:`moe_kernels.reference.experts` without its padded batch.

On the CPU ``torch._grouped_mm`` (torch 2.13) is a loop over the groups in C++ calling one GEMM
per non-empty group: no Python per expert, no copy of any weight, empty experts cost nothing.
That is what a CPU MoE layer wants (HF transformers' ``grouped_mm`` experts use it too); the
reference's one padded ``bmm`` reads and converts every used expert's weights and pads rows.

Two caveats of the CPU kernel, both guarded here:

- rows at or past ``offsets[-1]`` of its output are left uninitialised (garbage, even NaN): the
  calls here pass exactly the ``offsets[-1]`` valid rows (read on the host, free on CPU), and the
  op's rows past them are written as zeros;
- its autograd backward fails on a zero-stride gradient (the gradient of a ``.sum()``): nothing
  here differentiates through it; the explicit backwards make every operand contiguous.

Both ops take float32 / bfloat16 / float16 there (each GEMM accumulates in float32 and rounds
its output once) with 16-byte aligned strides and pointers; anything else (float64 for
gradcheck, odd sizes) goes to the reference. In 16-bit, ``fused_experts`` rounds the
pre-activation and the activation to the dtype, as plain PyTorch in that dtype does (HF's eager
experts): its 16-bit results are judged against float64 relative to plain PyTorch's error in the
same dtype (:func:`moe_kernels.testing.assert_within_plain`), and the token sum stays in float32.

Two layouts of the GEMMs. float32, and 16-bit batches past :data:`WEIGHTS_LEFT_MAX_ROWS` routed
rows, multiply rows by weights (``h = x @ W1^T``, rows first), in blocks of experts. 16-bit decode
batches multiply the weights by the rows (``h^T = W1 @ x^T``, features first): oneDNN reads each
expert's weights in place as the left operand, where as the right one it repacks them on every
call (the right operand's packing costs 1.15-1.3x at decode sizes with AMX). Slots are sorted by
expert with a stable sort, so results are deterministic; the combine adds in slot order, as the
reference's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_kernels.activations import gated_activation, gated_activation_backward
from moe_kernels.config import Activation
from moe_kernels.cpu import experts_invariant, experts_small
from moe_kernels.reference import experts as reference
from moe_kernels.utils import is_batch_invariant, new_output, slot_experts

GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Rows (slots) per block of experts in fused_experts' forward: about 7 MB of float32
# intermediates at H = 512, I = 256, which a last-level cache holds (see _expert_blocks). The
# backward's blocks are larger: with several blocks each block's weight gradients are copied into
# the full ones (one more write of E * 3 * H * I floats), which only pays off when each expert
# has many rows.
BLOCK_ROWS = 1024
BACKWARD_BLOCK_ROWS = 4096
# 16-bit batches of up to this many routed rows (T*k) take the features-first GEMMs: from there on
# (prefill) both layouts' GEMMs take the same time and the rows-first elementwise passes and
# combine are cheaper (OLMoE-1B-7B's layer, bfloat16, 1 thread: 1.17x faster at 512 rows, even at
# 2048).
WEIGHTS_LEFT_MAX_ROWS = 1024


def _aligned(*tensors: torch.Tensor) -> bool:
    """``torch._grouped_mm``'s CPU requirements on each operand as passed (ATen's
    ``check_valid_strides_and_return_transposed``): a supported dtype, 16-byte aligned data, one of
    the two matrix dims of stride 1 -- tried in ATen's order, column-major first, which is what
    a ``(1, 1)`` matrix of strides ``(1, 1)`` takes -- and the other's stride a multiple of 16 bytes
    and at least the matrix's extent."""
    for t in tensors:
        if t.dtype not in GROUPED_MM_DTYPES or t.data_ptr() % 16:
            return False
        alignment = 16 // t.element_size()
        (rows, cols), (row_stride, col_stride) = t.shape[-2:], t.stride()[-2:]
        if row_stride == 1 and col_stride >= max(1, rows):
            leading = col_stride
        elif col_stride == 1 and row_stride >= max(1, cols):
            leading = row_stride
        else:
            return False
        if leading % alignment:
            return False
    return True


def _grouped(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``torch._grouped_mm`` on exactly the valid rows: ``a (n, K)`` with ``n = offsets[-1]``."""
    return torch._grouped_mm(a, b, offs=offsets)


# ------------------------------------------------------------------------------------------------
# grouped_mm


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """:func:`moe_kernels.reference.experts.grouped_mm` on the CPU: ``(M, N)`` in ``a.dtype``,
    rows at or past ``offsets[-1]`` zero."""
    if not _aligned(a, b):
        return reference.grouped_mm(a, b, offsets)
    num_rows = a.shape[0]
    valid = int(offsets[-1]) if offsets.numel() else 0
    out = new_output((num_rows, b.shape[-1]), a.dtype, a.device)
    if valid:
        out[:valid] = _grouped(a[:valid], b, offsets)
    out[valid:] = 0
    return out


def grouped_mm_backward(
    grad_out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`moe_kernels.reference.experts.grouped_mm_backward` on the CPU: ``grad_a (M, K)``
    (zero past ``offsets[-1]``) and ``grad_b (G, K, N)`` (zero for empty groups)."""
    grad_out = grad_out.to(a.dtype).contiguous()  # a zero-stride gradient (of a .sum()) included
    if not _aligned(a, b, grad_out, a.t(), b.transpose(1, 2)):
        return reference.grouped_mm_backward(grad_out, a, b, offsets)
    valid = int(offsets[-1]) if offsets.numel() else 0
    grad_a = new_output(tuple(a.shape), a.dtype, a.device)
    grad_a[valid:] = 0
    if not valid:
        return grad_a, torch.zeros_like(b, memory_format=torch.contiguous_format)
    rows = grad_out[:valid]
    grad_a[:valid] = _grouped(rows, b.transpose(1, 2), offsets)
    grad_b = _grouped(a[:valid].t(), rows, offsets)  # (G, K, N); empty groups come back zero
    return grad_a, grad_b.to(b.dtype)


# ------------------------------------------------------------------------------------------------
# fused_experts


def _routing(ids: torch.Tensor, num_experts: int):
    """``(slots (n,), tokens (n,), experts (n,) int64, offsets (E,) int32)``: the non-empty slots
    of ``ids (T, k)`` sorted by expert (stable), as the reference's ``_sorted_slots``."""
    key = slot_experts(ids, num_experts)
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=num_experts + 1)
    offsets = counts[:num_experts].cumsum(0, dtype=torch.int32)
    num_valid = int(offsets[-1])
    slots = order[:num_valid]
    return slots, slots // max(ids.shape[1], 1), key[slots], offsets


def _can_use(hidden, gate_up_proj, down_proj) -> bool:
    """Experts ``torch._grouped_mm`` takes in both layouts of the GEMMs."""
    weights_as_given = (gate_up_proj, down_proj)
    return _aligned(hidden, *weights_as_given, *(w.transpose(1, 2) for w in weights_as_given))


def _weights_left(hidden: torch.Tensor, ids: torch.Tensor) -> bool:
    """Whether the forward takes the features-first GEMMs (16-bit decode batches)."""
    return hidden.dtype != torch.float32 and ids.numel() <= WEIGHTS_LEFT_MAX_ROWS


def _expert_blocks(offsets: torch.Tensor, num_valid: int, block_rows: int):
    """``(first expert, end expert, first row, end row)`` blocks of consecutive experts whose rows
    (sorted by expert) add up to about ``block_rows`` (an expert with more rows is a block of
    its own): the layer runs block by block so that each block's rows, pre-activations and
    outputs stay in cache between its two GEMMs, as a per-expert loop's do (one pass over all
    ``T*k`` rows spills them to memory: 25% slower at 16k rows of H = 512, I = 256). The blocks
    come from one pass over the ``E`` offsets as host ints (no tensor op per expert, only past
    ``block_rows`` rows, where the GEMMs take milliseconds); the layer then loops over the few
    blocks. One block up to ``block_rows`` rows."""
    num_experts = offsets.numel()
    if num_valid == 0:
        return []
    if num_valid <= block_rows:
        return [(0, num_experts, 0, num_valid)]
    blocks, first_expert, first_row = [], 0, 0
    for expert, end in enumerate(offsets.tolist()):
        if end - first_row >= block_rows:
            blocks.append((first_expert, expert + 1, first_row, end))
            first_expert, first_row = expert + 1, end
    if first_expert < num_experts:  # the last experts join the last block (rows or not), so that
        if num_valid > first_row:  # the blocks cover every expert: each gets its weight gradient
            blocks.append((first_expert, num_experts, first_row, num_valid))
        else:
            e0, _, r0, r1 = blocks.pop()
            blocks.append((e0, num_experts, r0, r1))
    return blocks


def _pre_activation(hidden, w1, gate_up_bias, tokens, experts, offsets):
    """``(x (n, H), h (n, 2I))``: the rows' inputs and pre-activations, in expert order (``w1``:
    the block's ``(e, H, 2I)`` weights, ``offsets`` relative to the block)."""
    x = hidden[tokens]
    h = _grouped(x, w1, offsets)
    if gate_up_bias is not None:
        h += gate_up_bias[experts]
    return x, h


def fused_experts_forward(
    hidden, gate_up_proj, down_proj, weights, ids, activation, gate_up_bias, down_bias, save_h
) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's CPU forward: ``(out (T, H), h)`` in hidden's dtype, ``h (T*k, 2I)`` the
    pre-activation of every non-empty slot in expert order, then zero rows (the layout of
    :func:`moe_kernels.reference.experts.sorted_pre_activations`), when ``save_h``, else
    ``(0, 2I)``. Saving ``h`` spares the backward both forward GEMMs' recomputation (``x`` is
    regathered and the activation recomputed from ``h``, both cheap)."""
    Activation.parse(activation)
    width = gate_up_proj.shape[1]
    if is_batch_invariant() and hidden.dtype in GROUPED_MM_DTYPES:
        slots, tokens, experts, _ = _routing(ids, gate_up_proj.shape[0])
        routed = (ids.shape[1], slots, tokens, experts, weights.reshape(-1)[slots])
        out, h = experts_invariant.forward(
            hidden, gate_up_proj, down_proj, activation, gate_up_bias, down_bias, *routed
        )
        if not save_h:
            return out, hidden.new_empty((0, width))
        saved = hidden.new_zeros((ids.numel(), width))
        saved[: h.shape[0]] = h
        return out, saved
    if not _can_use(hidden, gate_up_proj, down_proj):
        args = (hidden, gate_up_proj, down_proj, weights, ids)
        bias = dict(activation=activation, gate_up_bias=gate_up_bias, down_bias=down_bias)
        out = reference.fused_experts(*args, **bias).contiguous()
        if not save_h:
            return out, hidden.new_empty((0, width))
        return out, reference.sorted_pre_activations(hidden, gate_up_proj, ids, gate_up_bias)
    if experts_small.applies(gate_up_proj, down_proj, ids):  # a few slots of small experts
        return experts_small.forward(
            hidden, gate_up_proj, down_proj, weights, ids, activation, gate_up_bias, down_bias, save_h
        )
    slots, tokens, experts, offsets = _routing(ids, gate_up_proj.shape[0])
    saved = hidden.new_zeros((ids.numel(), width)) if save_h else hidden.new_empty((0, width))
    slot_weights = weights.reshape(-1)[slots][:, None]
    args = (hidden, gate_up_proj, down_proj, activation, gate_up_bias, down_bias)
    if _weights_left(hidden, ids):
        return _forward_features_first(*args, slots, tokens, experts, offsets, slot_weights, saved), saved
    return _forward_rows_first(*args, slots, tokens, experts, offsets, slot_weights, saved), saved


def _forward_rows_first(
    hidden, gate_up_proj, down_proj, activation, gate_up_bias, down_bias, slots, tokens, experts, offsets,
    slot_weights, saved,
) -> torch.Tensor:  # fmt: skip
    """``out (T, H)``, block by block of experts, ``h`` rows written into ``saved`` (when it has
    rows); the token sum in float32."""
    out = torch.zeros(hidden.shape, dtype=torch.float32)
    w1, w2 = gate_up_proj.transpose(1, 2), down_proj.transpose(1, 2)
    for e0, e1, r0, r1 in _expert_blocks(offsets, slots.numel(), BLOCK_ROWS):
        rows, block_offsets = slice(r0, r1), offsets[e0:e1] - r0
        _, h = _pre_activation(hidden, w1[e0:e1], gate_up_bias, tokens[rows], experts[rows], block_offsets)
        if saved.shape[0]:
            saved[rows] = h
        # The routing weight scales the activation rows (I wide) before the down projection, not
        # its H-wide output: one pass over fewer bytes.
        y = _grouped(gated_activation(h, activation, scale=slot_weights[rows]), w2[e0:e1], block_offsets)
        if down_bias is not None:
            y += down_bias[experts[rows]] * slot_weights[rows]
        out.index_add_(0, tokens[rows], y.float())
    return out.to(hidden.dtype)


def _forward_features_first(
    hidden, gate_up_proj, down_proj, activation, gate_up_bias, down_bias, slots, tokens, experts, offsets,
    slot_weights, saved,
) -> torch.Tensor:  # fmt: skip
    """``out (T, H)`` from ``h^T = W1 @ x^T (2I, n)`` and ``y^T = W2 @ act^T (H, n)``: each
    elementwise pass runs along contiguous rows of those, and the token sum is one more GEMM,
    ``out = P @ y`` with ``P (T, n)`` the 0/1 slot-to-token matrix (float32 accumulation, one
    rounding; fewer ops than a scatter, which a decode step pays for in cold caches).

    The ``n`` routed rows are padded to a multiple of 16 bytes (with token 0, weight 0): ``act^T``
    is a right operand with ``n`` columns, whose row stride ``torch._grouped_mm`` wants aligned.
    The GEMMs leave the columns past ``n`` unwritten (the offsets end at ``n``); nothing reads them.
    ``x^T`` is gathered row-major (``H`` rows of ``n``): oneDNN's GEMV reads such a right operand
    faster than a column-major one (1.2-1.5x on a single routed row per expert)."""
    num_tokens, num_valid = hidden.shape[0], slots.numel()
    if not num_valid:
        return hidden.new_zeros(hidden.shape)
    slot_weights = slot_weights[:, 0]
    pad = -num_valid % (16 // hidden.element_size())
    if pad:  # (a decode step of k = 8 slots per token needs none)
        tokens, experts, slot_weights = (F.pad(t, (0, pad)) for t in (tokens, experts, slot_weights))
    h_t = torch._grouped_mm(gate_up_proj, hidden.t()[:, tokens], offs=offsets)
    if gate_up_bias is not None:
        h_t += gate_up_bias[experts].t()
    if saved.shape[0]:
        saved[:num_valid] = h_t[:, :num_valid].t()
    y_t = torch._grouped_mm(down_proj, gated_activation(h_t, activation, dim=0, scale=slot_weights), offs=offsets)
    if down_bias is not None:
        y_t += (down_bias[experts] * slot_weights[:, None]).t()
    assignment = (torch.arange(num_tokens)[:, None] == tokens[None, :num_valid]).to(hidden.dtype)
    return torch.mm(assignment, y_t[:, :num_valid].t())


def fused_experts_backward(
    grad_out, hidden, gate_up_proj, down_proj, weights, ids, activation, gate_up_bias, down_bias, h
) -> tuple:
    """:func:`moe_kernels.reference.experts.fused_experts_backward` on the CPU: the six gradients
    (None for an absent bias), each in its input's dtype, empty experts' weight gradients zero.
    ``h``: the forward's saved pre-activations (``T*k`` rows, see :func:`fused_experts_forward`),
    else (fewer rows) recomputed."""
    Activation.parse(activation)
    if not _can_use(hidden, gate_up_proj, down_proj):
        return reference.fused_experts_backward(
            grad_out,
            hidden,
            gate_up_proj,
            down_proj,
            weights,
            ids,
            activation=activation,
            gate_up_bias=gate_up_bias,
            down_bias=down_bias,
        )
    if experts_small.applies(gate_up_proj, down_proj, ids):
        return experts_small.backward(
            grad_out, hidden, gate_up_proj, down_proj, weights, ids, activation, gate_up_bias, down_bias
        )
    num_experts = gate_up_proj.shape[0]
    slots, tokens, experts, offsets = _routing(ids, num_experts)
    # The sums over slots (the input's and the biases' gradients) and the routing weights' dot
    # products in float32 (16-bit inputs are rounded once, at the end).
    grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32)
    grad_weights = torch.zeros(weights.numel(), dtype=weights.dtype)
    blocks = _expert_blocks(offsets, slots.numel(), BACKWARD_BLOCK_ROWS)
    # Weight gradients: with one block, the kernel's outputs over all experts (it writes zeros for
    # experts without rows, once); with several, each block's experts are copied in (the blocks
    # cover every expert); with none (no routed slot), zeros.
    single = len(blocks) == 1
    grad_gate_up = grad_down = None
    if not single:  # filled block by block (new_output: a test can poison them)
        alloc = (lambda t: new_output(tuple(t.shape), t.dtype, t.device)) if blocks else torch.zeros_like
        grad_gate_up, grad_down = alloc(gate_up_proj), alloc(down_proj)
    grad_gate_up_bias = None if gate_up_bias is None else torch.zeros(gate_up_bias.shape, dtype=torch.float32)
    grad_down_bias = None if down_bias is None else torch.zeros(down_bias.shape, dtype=torch.float32)
    saved_h = h.shape[0] == ids.numel()
    w1 = gate_up_proj.transpose(1, 2)
    all_weights = weights.reshape(-1)[slots][:, None]
    for e0, e1, r0, r1 in blocks:
        rows, block_offsets = slice(r0, r1), offsets[e0:e1] - r0
        block_tokens, block_experts, slot_weights = tokens[rows], experts[rows], all_weights[rows]
        if saved_h:
            x, pre = hidden[block_tokens], h[rows]
        else:
            x, pre = _pre_activation(hidden, w1[e0:e1], gate_up_bias, block_tokens, block_experts, block_offsets)
        act = gated_activation(pre, activation)
        grad_rows = grad_out.to(hidden.dtype)[block_tokens]  # fresh and contiguous, whatever its strides
        # The gradient through the down projection before the routing weight: the weight's
        # gradient is its dot product with the activation (plus the bias term), the activation's
        # is it scaled by the weight.
        grad_act = _grouped(grad_rows, down_proj[e0:e1], block_offsets)  # (n, I)
        grad_slot = (grad_act.float() * act).sum(-1)
        if down_bias is not None:
            grad_slot += (grad_rows.float() * down_bias[block_experts]).sum(-1)
            grad_down_bias.index_add_(0, block_experts, grad_rows * slot_weights)
        grad_weights[slots[rows]] = grad_slot.to(weights.dtype)
        grad_h = gated_activation_backward(grad_act, pre, activation).mul_(slot_weights)
        if grad_gate_up_bias is not None:
            grad_gate_up_bias.index_add_(0, block_experts, grad_h.float())
        grad_hidden.index_add_(0, block_tokens, _grouped(grad_h, gate_up_proj[e0:e1], block_offsets).float())
        # (e, H, I) and (e, 2I, H), down_proj's and gate_up_proj's layouts, of the routed experts.
        act.mul_(slot_weights)
        if single:
            grad_down = _grouped(grad_rows.t(), act, block_offsets)
            grad_gate_up = _grouped(grad_h.t(), x, block_offsets)
        else:
            grad_down[e0:e1] = _grouped(grad_rows.t(), act, block_offsets)
            grad_gate_up[e0:e1] = _grouped(grad_h.t(), x, block_offsets)
    return (
        grad_hidden.to(hidden.dtype),
        grad_gate_up,
        grad_down,
        grad_weights.view(weights.shape),
        None if gate_up_bias is None else grad_gate_up_bias.to(gate_up_bias.dtype),
        None if down_bias is None else grad_down_bias.to(down_bias.dtype),
    )
