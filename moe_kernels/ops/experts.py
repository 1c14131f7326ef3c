"""Routing metadata, launchers and ``torch.library`` registration of the fused experts op.

========================  ======================================================================
``fused_experts``         hidden ``(T, H)``, ``gate_up_proj (E, 2I, H)``, ``down_proj (E, H, I)``,
                          weights ``(T, k)``, ids ``(T, k)`` -> ``out (T, H)``, and the saved
                          pre-activation ``h (T*k, 2I)`` (``(0, 2I)`` on the reference path)
``fused_experts_backward`` -> grads of hidden, both projections, weights, both biases
========================  ======================================================================

The Triton path, forward: :func:`launch_moe_align` sorts the T*k slots by expert on the device (no
host sync, fixed shapes; one kernel for decode-sized routings, which also gathers the routing
weights and checks the ids); a grouped GEMM gathers each slot's token row in its loads (no permuted copy
of the activations) and computes the gate and up halves of ``h = x @ gate_up^T`` together, the
gated activation in its epilogue (``h`` is stored only for a backward); a second grouped GEMM
scales each row by its routing weight in its epilogue; a combine kernel sums each token's k rows
in a fixed order (deterministic, no atomics). Backward: the same grouped GEMM kernels (with the
token gather on the gradient), the weight-gradient grouped GEMM for both projections, and one
kernel for the activation's backward fused with the routing weights' gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from moe_kernels.ops import grouped_mm as gmm
from moe_kernels.reference import experts as reference
from moe_kernels.reference.experts import ACTIVATIONS, GPT_OSS_ALPHA, GPT_OSS_LIMIT
from moe_kernels.utils import cdiv, new_output, next_power_of_2


class MoEAlignment(NamedTuple):
    """The T*k routing slots (slot ``t * k + j``) sorted by expert, stable; empty slots (id -1)
    last. Every tensor has a fixed size: R = T*k rows or E experts.

    - ``order (R,) int64``: slot at each sorted position.
    - ``tokens (R,) int32``: its token, the row the first GEMM gathers.
    - ``experts (R,) int32``: its expert, E for an empty slot.
    - ``positions (R,) int32``: the inverse: sorted position of each slot.
    - ``counts (E,) int32``: slots per expert; ``offsets (E,) int32``: their cumulative sums, the
      grouped GEMM's group ends (rows from ``offsets[-1]`` on are the empty slots).
    """

    order: torch.Tensor
    tokens: torch.Tensor
    experts: torch.Tensor
    positions: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor


def slot_experts_and_counts(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(key (T*k,) int64, counts (E+1,) int32)``: each slot's expert with E for an empty slot,
    and the slots per key, by a scatter-add (``bincount`` on CUDA reads its maximum back to the
    host)."""
    flat = ids.reshape(-1).long()
    key = torch.where(flat < 0, torch.full_like(flat, num_experts), flat)
    counts = torch.zeros(num_experts + 1, dtype=torch.int32, device=ids.device)
    return key, counts.scatter_add_(0, key, torch.ones_like(key, dtype=torch.int32))


def moe_align(ids: torch.Tensor, num_experts: int) -> MoEAlignment:
    """Sort the slots of ``ids (T, k)`` (int32/int64, -1 = empty) by expert, on the device and
    without a host sync (CUDA-graph safe): a stable argsort and a scatter-add count."""
    k = ids.shape[1]
    key, counts = slot_experts_and_counts(ids, num_experts)
    order = torch.argsort(key, stable=True)
    num_slots = key.numel()
    positions = torch.empty(num_slots, dtype=torch.int32, device=ids.device)
    positions.scatter_(0, order, torch.arange(num_slots, dtype=torch.int32, device=ids.device))
    return MoEAlignment(
        order=order,
        tokens=(order // max(k, 1)).to(torch.int32),
        experts=key[order].to(torch.int32),
        positions=positions,
        counts=counts[:num_experts],
        offsets=counts[:num_experts].cumsum(0, dtype=torch.int32),
    )


# The one-program alignment kernel sorts all slots in registers: it takes R = T*k up to this
# (decode batches, where launch counts matter) and E + 2 bins up to ALIGN_KERNEL_MAX_BINS; larger
# routings take moe_align's torch path, a device sort spread over many SMs.
ALIGN_KERNEL_MAX_SLOTS = 1024
ALIGN_KERNEL_MAX_BINS = 1024


def align_meta(num_slots: int, num_experts: int) -> dict | None:
    """Constexprs and ``num_warps`` of the alignment kernel, or None where it does not apply."""
    bins = next_power_of_2(num_experts + 2)
    if not 0 < num_slots <= ALIGN_KERNEL_MAX_SLOTS or bins > ALIGN_KERNEL_MAX_BINS:
        return None
    block = max(16, next_power_of_2(num_slots))
    return dict(BLOCK_R=block, NUM_BINS=bins, num_warps=4 if block <= 256 else 8)


def launch_moe_align(ids: torch.Tensor, num_experts: int, weights: torch.Tensor):
    """The Triton path's alignment: ``(MoEAlignment, row_weight (R,) float32, valid () int32)``,
    where ``row_weight`` is ``weights (T, k)`` in sorted order and ``valid`` is nonzero iff every
    id is in [-1, E). One kernel launch for decode-sized routings (:func:`align_meta`), else
    :func:`moe_align` and two torch ops. No host sync either way."""
    from moe_kernels.kernels._experts import _moe_align_kernel

    num_tokens, k = ids.shape
    num_slots = num_tokens * k
    meta = align_meta(num_slots, num_experts)
    if meta is None:
        align = moe_align(ids, num_experts)
        row_weight = weights.reshape(-1).to(torch.float32)[align.order]
        valid = ((ids >= -1) & (ids < num_experts)).all()
        return align, row_weight, valid
    device = ids.device
    order = new_output((num_slots,), torch.int64, device)
    tokens, experts, positions = (new_output((num_slots,), torch.int32, device) for _ in range(3))
    row_weight = new_output((num_slots,), torch.float32, device)
    counts, offsets = (new_output((num_experts,), torch.int32, device) for _ in range(2))
    valid = new_output((), torch.int32, device)
    _moe_align_kernel[(1,)](
        ids.contiguous(), weights.contiguous(), order, tokens, experts, positions, row_weight, counts, offsets,
        valid, num_slots, num_experts, K=k, **meta,
    )
    align = MoEAlignment(order=order, tokens=tokens, experts=experts, positions=positions, counts=counts,
                         offsets=offsets)
    return align, row_weight, valid


def _elementwise_meta(width: int) -> dict:
    """Constexprs and ``num_warps`` of the activation kernels: 2048-element tiles, at most 128
    columns wide."""
    block = min(128, next_power_of_2(max(width, 1)))
    return dict(BLOCK_R=max(1, 2048 // block), BLOCK_I=block, num_warps=4)


def launch_gated_activation(h: torch.Tensor, activation: str) -> torch.Tensor:
    """``act (R, I)`` in h's dtype from the pre-activation ``h (R, 2I)``."""
    from moe_kernels.kernels._experts import _gated_act_fwd_kernel

    num_rows, width = h.shape
    inter = width // 2
    act = new_output((num_rows, inter), h.dtype, h.device)
    if act.numel() == 0:
        return act
    meta = _elementwise_meta(inter)
    grid = (cdiv(num_rows, meta["BLOCK_R"]), cdiv(inter, meta["BLOCK_I"]))
    _gated_act_fwd_kernel[grid](
        h, act, num_rows, inter, h.stride(0), GPT_OSS_LIMIT, GPT_OSS_ALPHA,
        ACTIVATION=ACTIVATIONS.index(activation), **meta,
    )
    return act


def launch_gated_activation_backward(grad_act, h, row_weight, activation):
    """``(grad_h (R, 2I) = row_weight * d act/d h . grad_act, grad_row_weight (R,) = sum(grad_act *
    act))`` for ``grad_act`` the gradient of the *unweighted* activation."""
    from moe_kernels.kernels._experts import _gated_act_bwd_kernel

    num_rows, width = h.shape
    inter = width // 2
    grad_h = new_output((num_rows, width), h.dtype, h.device)
    grad_weight = new_output((num_rows,), torch.float32, h.device)
    if num_rows == 0:
        return grad_h, grad_weight
    meta = _elementwise_meta(inter)
    meta["BLOCK_R"] = max(1, meta["BLOCK_R"] // 2)
    _gated_act_bwd_kernel[(cdiv(num_rows, meta["BLOCK_R"]),)](
        grad_act.contiguous(), h, row_weight, grad_h, grad_weight, num_rows, inter, h.stride(0),
        GPT_OSS_LIMIT, GPT_OSS_ALPHA, ACTIVATION=ACTIVATIONS.index(activation), **meta,
    )
    return grad_h, grad_weight


def launch_combine(rows: torch.Tensor, positions: torch.Tensor, num_tokens: int, k: int, dtype) -> torch.Tensor:
    """``out (T, H)`` in ``dtype``: ``out[t] = sum_j rows[positions[t * k + j]]``."""
    from moe_kernels.kernels._experts import _combine_kernel

    width = rows.shape[1]
    out = new_output((num_tokens, width), dtype, rows.device)
    if out.numel() == 0:
        return out
    meta = combine_meta(width, k)
    _combine_kernel[(cdiv(num_tokens, meta["BLOCK_T"]), cdiv(width, meta["BLOCK_H"]))](
        rows.contiguous(), positions, out, num_tokens, width, **meta,
    )
    return out


def combine_meta(width: int, k: int) -> dict:
    """Constexprs and ``num_warps`` of the combine kernel: 2048-element tiles, rows up to 256
    wide, ``k`` unrolled."""
    block_h = min(256, next_power_of_2(width))
    return dict(K=k, BLOCK_T=max(1, 2048 // block_h), BLOCK_H=block_h, num_warps=4)


def _bias_rows(bias: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """``bias[experts]`` with a zero row for the empty-slot expert id E."""
    padded = torch.cat([bias, bias.new_zeros(1, bias.shape[1])])
    return padded[experts.long()]


def launch_fused_experts(hidden, gate_up_proj, down_proj, weights, ids, activation, gate_up_bias, down_bias,
                         save_h=True):
    """Triton forward; returns ``(out (T, H), h)`` in hidden's dtype, ``h (T*k, 2I)`` the
    pre-activation the backward reads, or ``(0, 2I)`` without ``save_h`` (inference: never
    written)."""
    num_tokens, k = ids.shape
    align, row_weight, valid = launch_moe_align(ids, gate_up_proj.shape[0], weights)
    torch._assert_async(valid, f"fused_experts: ids must be in [-1, {gate_up_proj.shape[0]})")
    num_slots = num_tokens * k
    act, h = gmm.launch_grouped_gated_mm(
        hidden, gate_up_proj.transpose(1, 2), align.offsets, activation, a_rows=align.tokens, bias=gate_up_bias,
        out_rows=num_slots, store_h=save_h,
    )
    if h is None:
        h = hidden.new_empty((0, gate_up_proj.shape[1]))
    if down_bias is None:
        rows = gmm.launch_grouped_mm(act, down_proj.transpose(1, 2), align.offsets, row_scale=row_weight)
    else:  # the bias goes in before the routing weight
        rows = gmm.launch_grouped_mm(act, down_proj.transpose(1, 2), align.offsets)
        rows = ((rows + _bias_rows(down_bias, align.experts)) * row_weight[:, None]).to(hidden.dtype)
    return launch_combine(rows, align.positions, num_tokens, k, hidden.dtype), h


def launch_fused_experts_backward(grad_out, hidden, gate_up_proj, down_proj, weights, ids, h, activation,
                                  gate_up_bias, down_bias):
    """Triton backward; returns the six gradients (empty tensors for absent biases)."""
    num_tokens, k = ids.shape
    num_experts = gate_up_proj.shape[0]
    align, row_weight, _ = launch_moe_align(ids, num_experts, weights)  # the forward checked the ids
    num_slots = num_tokens * k
    if h.shape[0] != num_slots:  # a forward that did not save h (a direct call of the op): recompute it
        _, h = gmm.launch_grouped_gated_mm(
            hidden, gate_up_proj.transpose(1, 2), align.offsets, activation, a_rows=align.tokens, bias=gate_up_bias,
            out_rows=num_slots,
        )
    grad_out = grad_out.to(hidden.dtype).contiguous()
    # d(out)/d(act) before the routing weight: grad_out of each slot's token through down_proj.
    grad_act = gmm.launch_grouped_mm(grad_out, down_proj, align.offsets, a_rows=align.tokens, out_rows=num_slots)
    grad_h, grad_row_weight = launch_gated_activation_backward(grad_act, h, row_weight, activation)
    if down_bias is not None:
        grad_row_weight = grad_row_weight + (
            grad_out[align.tokens.long()].float() * _bias_rows(down_bias, align.experts).float()
        ).sum(-1)
    act = launch_gated_activation(h, activation)
    grad_down = gmm.launch_grouped_mm_weight_grad(
        grad_out, act, align.offsets, num_experts, a_rows=align.tokens, row_scale=row_weight
    )
    grad_rows = gmm.launch_grouped_mm(grad_h, gate_up_proj, align.offsets)
    grad_hidden = launch_combine(grad_rows, align.positions, num_tokens, k, hidden.dtype)
    grad_gate_up = gmm.launch_grouped_mm_weight_grad(
        hidden, grad_h, align.offsets, num_experts, a_rows=align.tokens
    ).transpose(1, 2).contiguous()
    grad_weights = grad_row_weight[align.positions.long()].reshape(weights.shape).to(weights.dtype)
    grad_gate_up_bias = hidden.new_empty(0)
    if gate_up_bias is not None:
        grad_gate_up_bias = _segment_sum(grad_h, align, num_experts, gate_up_bias.dtype)
    grad_down_bias = hidden.new_empty(0)
    if down_bias is not None:
        weighted = grad_out[align.tokens.long()].float() * row_weight[:, None]
        grad_down_bias = _segment_sum(weighted, align, num_experts, down_bias.dtype)
    return grad_hidden, grad_gate_up.to(gate_up_proj.dtype), grad_down.to(down_proj.dtype), grad_weights, \
        grad_gate_up_bias, grad_down_bias


def _segment_sum(rows: torch.Tensor, align: MoEAlignment, num_experts: int, dtype) -> torch.Tensor:
    """Per-expert sums of sorted ``rows (R, D)`` -> ``(E, D)``, from prefix sums at the group
    ends (deterministic, no atomics)."""
    prefix = torch.cat([rows.new_zeros(1, rows.shape[1], dtype=torch.float32), rows.float().cumsum(0)])
    ends = prefix[align.offsets.long()]
    starts = torch.cat([prefix[:1], ends[:-1]])
    return (ends - starts).to(dtype)


def fused_experts_forward(hidden, gate_up_proj, down_proj, weights, ids, activation, gate_up_bias, down_bias,
                          use_triton, save_h):
    """The forward of both entry points: the kernels (saving ``h`` for the backward with
    ``save_h``), or the reference (which saves no ``h``)."""
    if use_triton:
        return launch_fused_experts(
            hidden, gate_up_proj, down_proj, weights, ids, activation, gate_up_bias, down_bias, save_h
        )
    out = reference.fused_experts(
        hidden, gate_up_proj, down_proj, weights, ids,
        activation=activation, gate_up_bias=gate_up_bias, down_bias=down_bias,
    )
    return out.contiguous(), hidden.new_empty((0, gate_up_proj.shape[1]))


def fused_experts_backward(grad_out, hidden, gate_up_proj, down_proj, weights, ids, h, activation, gate_up_bias,
                           down_bias, use_triton):
    """The backward of both entry points: the kernels, or the reference's explicit formulas."""
    if use_triton:
        return launch_fused_experts_backward(
            grad_out, hidden, gate_up_proj, down_proj, weights, ids, h, activation, gate_up_bias, down_bias
        )
    grads = reference.fused_experts_backward(
        grad_out, hidden, gate_up_proj, down_proj, weights, ids,
        activation=activation, gate_up_bias=gate_up_bias, down_bias=down_bias,
    )
    # A fresh empty tensor per absent bias: a custom op's outputs may not alias each other.
    return tuple(hidden.new_empty(0) if g is None else g.contiguous() for g in grads)


@torch.library.custom_op("moe_kernels::fused_experts", mutates_args=())
def fused_experts_op(
    hidden: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    activation: str,
    gate_up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None,
    use_triton: bool,
    save_h: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return fused_experts_forward(
        hidden, gate_up_proj, down_proj, weights, ids, activation, gate_up_bias, down_bias, use_triton, save_h
    )


@fused_experts_op.register_fake
def _fused_experts_fake(hidden, gate_up_proj, down_proj, weights, ids, activation, gate_up_bias, down_bias,
                        use_triton, save_h):
    saved_rows = ids.shape[0] * ids.shape[1] if use_triton and save_h else 0
    return hidden.new_empty(hidden.shape), hidden.new_empty((saved_rows, gate_up_proj.shape[1]))


@torch.library.custom_op("moe_kernels::fused_experts_backward", mutates_args=())
def fused_experts_backward_op(
    grad_out: torch.Tensor,
    hidden: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    h: torch.Tensor,
    activation: str,
    gate_up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None,
    use_triton: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return fused_experts_backward(
        grad_out, hidden, gate_up_proj, down_proj, weights, ids, h, activation, gate_up_bias, down_bias, use_triton
    )


@fused_experts_backward_op.register_fake
def _fused_experts_backward_fake(grad_out, hidden, gate_up_proj, down_proj, weights, ids, h, activation,
                                 gate_up_bias, down_bias, use_triton):
    return (
        hidden.new_empty(hidden.shape),
        gate_up_proj.new_empty(gate_up_proj.shape),
        down_proj.new_empty(down_proj.shape),
        weights.new_empty(weights.shape),
        hidden.new_empty(0) if gate_up_bias is None else gate_up_bias.new_empty(gate_up_bias.shape),
        hidden.new_empty(0) if down_bias is None else down_bias.new_empty(down_bias.shape),
    )


def _save(ctx, hidden, gate_up_proj, down_proj, weights, ids, activation, gate_up_bias, down_bias, use_triton,
          save_h, h):  # save_h: taken to match the op's inputs (setup_context passes them all); h tells
    ctx.save_for_backward(hidden, gate_up_proj, down_proj, weights, ids, h, gate_up_bias, down_bias)
    ctx.activation, ctx.use_triton = activation, use_triton


def _grads(ctx, grad_out, backward):
    hidden, gate_up_proj, down_proj, weights, ids, h, gate_up_bias, down_bias = ctx.saved_tensors
    grads = backward(
        grad_out, hidden, gate_up_proj, down_proj, weights, ids, h, ctx.activation, gate_up_bias, down_bias,
        ctx.use_triton,
    )
    grad_hidden, grad_gate_up, grad_down, grad_weights, grad_gate_up_bias, grad_down_bias = grads
    return (
        grad_hidden, grad_gate_up, grad_down, grad_weights, None, None,
        grad_gate_up_bias if gate_up_bias is not None else None,
        grad_down_bias if down_bias is not None else None,
        None,
        None,
    )


def _setup_context(ctx, inputs, output):
    _save(ctx, *inputs, output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_out, _grad_h):
    return _grads(ctx, grad_out, fused_experts_backward_op)


fused_experts_op.register_autograd(_backward, setup_context=_setup_context)


class FusedExpertsFunction(torch.autograd.Function):
    """Eager-mode entry point with the same forward and backward as ``moe_kernels::fused_experts``."""

    @staticmethod
    def forward(ctx, hidden, gate_up_proj, down_proj, weights, ids, activation, gate_up_bias, down_bias, use_triton,
                save_h):
        out, h = fused_experts_forward(
            hidden, gate_up_proj, down_proj, weights, ids, activation, gate_up_bias, down_bias, use_triton, save_h
        )
        _save(ctx, hidden, gate_up_proj, down_proj, weights, ids, activation, gate_up_bias, down_bias, use_triton,
              save_h, h)
        ctx.mark_non_differentiable(h)
        return out, h

    @staticmethod
    def backward(ctx, grad_out, _grad_h):
        return _grads(ctx, grad_out, fused_experts_backward)
