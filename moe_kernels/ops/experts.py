"""Launchers, ``torch.library`` op and AOT cases of the fused experts op.

========================  ======================================================================
``fused_experts``         hidden ``(T, H)``, ``gate_up_proj (E, 2I, H)``, ``down_proj (E, H, I)``,
                          weights ``(T, k)``, ids ``(T, k)`` -> ``out (T, H)``, and the saved
                          pre-activation ``h (T*k, 2I)`` with ``save_h``, else ``(0, 2I)``
``fused_experts_backward`` -> grads of hidden, both projections, weights, both biases
========================  ======================================================================

The Triton path, forward: :func:`~moe_kernels.ops.align.launch_moe_align` sorts the T*k slots by
expert on the device (no host sync, fixed shapes; one kernel for decode-sized routings, which also gathers the routing
weights and checks the ids); a grouped GEMM gathers each slot's token row in its loads (no permuted copy
of the activations) and computes the gate and up halves of ``h = x @ gate_up^T`` together, the
gated activation in its epilogue (``h`` is stored only for a backward); a second grouped GEMM
scales each row by its routing weight in its epilogue; a combine kernel sums each token's k rows
in a fixed order (deterministic, no atomics). Backward: the same grouped GEMM kernels (with the
token gather on the gradient), the weight-gradient grouped GEMM for both projections, and one
kernel for the activation's backward fused with the routing weights' gradient.
"""

from __future__ import annotations

import torch

from moe_kernels.config import GPT_OSS_ALPHA, GPT_OSS_LIMIT, Activation
from moe_kernels.cpu import experts as cpu_experts
from moe_kernels.ops import grouped_mm as gmm
from moe_kernels.ops._boundary import define_op
from moe_kernels.ops._launch import strides
from moe_kernels.ops.align import MoEAlignment, launch_moe_align
from moe_kernels.reference import experts as reference
from moe_kernels.utils import cdiv, new_output, next_power_of_2


def activation_meta(width: int, activation: str | Activation, backward: bool) -> dict:
    """Constexprs and ``num_warps`` of the activation kernels for an activation ``width`` (I)
    wide: 2048-element tiles (1024 backward), at most 128 columns wide; shared with the AOT cases."""
    block = min(128, next_power_of_2(max(width, 1)))
    rows = max(1, 2048 // block)
    if backward:
        rows = max(1, rows // 2)
    return dict(BLOCK_R=rows, BLOCK_I=block, ACTIVATION=int(Activation.parse(activation)), num_warps=4)


# GPT-OSS's clamp limit and sigmoid slope: the scalars every activation kernel takes.
_GPT_OSS = dict(limit=GPT_OSS_LIMIT, alpha=GPT_OSS_ALPHA)


def launch_gated_activation(h: torch.Tensor, activation: str) -> torch.Tensor:
    """``act (R, I)`` in h's dtype from the pre-activation ``h (R, 2I)``."""
    from moe_kernels.kernels._experts import _gated_act_fwd_kernel

    num_rows, width = h.shape
    inter = width // 2
    act = new_output((num_rows, inter), h.dtype, h.device)
    if act.numel() == 0:
        return act
    meta = activation_meta(inter, activation, backward=False)
    grid = (cdiv(num_rows, meta["BLOCK_R"]), cdiv(inter, meta["BLOCK_I"]))
    _gated_act_fwd_kernel[grid](h_ptr=h, act_ptr=act, R=num_rows, I=inter, stride_h=h.stride(0), **_GPT_OSS, **meta)
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
    meta = activation_meta(inter, activation, backward=True)
    _gated_act_bwd_kernel[(cdiv(num_rows, meta["BLOCK_R"]),)](
        grad_act_ptr=grad_act.contiguous(),
        h_ptr=h,
        row_weight_ptr=row_weight,
        grad_h_ptr=grad_h,
        grad_weight_ptr=grad_weight,
        R=num_rows,
        I=inter,
        **strides(h, "stride_h"),
        **_GPT_OSS,
        **meta,
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
    grid = (cdiv(num_tokens, meta["BLOCK_T"]), cdiv(width, meta["BLOCK_H"]))
    _combine_kernel[grid](
        rows_ptr=rows.contiguous(), position_ptr=positions, out_ptr=out, T=num_tokens, H=width, **meta
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


def _up_projection(hidden, gate_up_proj, align: MoEAlignment, activation, gate_up_bias, store_h=True):
    """``(act, h)`` of every sorted slot (:func:`~moe_kernels.ops.grouped_mm.launch_grouped_gated_mm`
    gathering each slot's token row); ``h`` None without ``store_h``."""
    return gmm.launch_grouped_gated_mm(
        hidden,
        gate_up_proj.transpose(1, 2),
        align.offsets,
        activation,
        a_rows=align.tokens,
        bias=gate_up_bias,
        out_rows=align.tokens.shape[0],
        store_h=store_h,
    )


def launch_fused_experts(
    hidden, gate_up_proj, down_proj, weights, ids, activation, gate_up_bias, down_bias, save_h=True
):
    """Triton forward; returns ``(out (T, H), h)`` in hidden's dtype, ``h (T*k, 2I)`` the
    pre-activation the backward reads, or ``(0, 2I)`` without ``save_h`` (inference: never
    written)."""
    num_tokens, k = ids.shape
    align, row_weight, valid = launch_moe_align(ids, gate_up_proj.shape[0], weights)
    torch._assert_async(valid, f"fused_experts: ids must be in [-1, {gate_up_proj.shape[0]})")
    act, h = _up_projection(hidden, gate_up_proj, align, activation, gate_up_bias, store_h=save_h)
    if h is None:
        h = hidden.new_empty((0, gate_up_proj.shape[1]))
    if down_bias is None:
        rows = gmm.launch_grouped_mm(act, down_proj.transpose(1, 2), align.offsets, row_scale=row_weight)
    else:  # the bias goes in before the routing weight
        rows = gmm.launch_grouped_mm(act, down_proj.transpose(1, 2), align.offsets)
        rows = ((rows + _bias_rows(down_bias, align.experts)) * row_weight[:, None]).to(hidden.dtype)
    return launch_combine(rows, align.positions, num_tokens, k, hidden.dtype), h


def launch_fused_experts_backward(
    grad_out, hidden, gate_up_proj, down_proj, weights, ids, h, activation, gate_up_bias, down_bias
):
    """Triton backward; returns the six gradients (empty tensors for absent biases)."""
    num_tokens, k = ids.shape
    num_experts = gate_up_proj.shape[0]
    align, row_weight, _ = launch_moe_align(ids, num_experts, weights)  # the forward checked the ids
    num_slots = num_tokens * k
    if h.shape[0] != num_slots:  # a forward that did not save h (a direct call of the op): recompute it
        _, h = _up_projection(hidden, gate_up_proj, align, activation, gate_up_bias)
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
    grad_gate_up = (
        gmm.launch_grouped_mm_weight_grad(hidden, grad_h, align.offsets, num_experts, a_rows=align.tokens)
        .transpose(1, 2)
        .contiguous()
    )
    grad_weights = grad_row_weight[align.positions.long()].reshape(weights.shape).to(weights.dtype)
    grad_gate_up_bias = hidden.new_empty(0)
    if gate_up_bias is not None:
        grad_gate_up_bias = _segment_sum(grad_h, align, num_experts, gate_up_bias.dtype)
    grad_down_bias = hidden.new_empty(0)
    if down_bias is not None:
        weighted = grad_out[align.tokens.long()].float() * row_weight[:, None]
        grad_down_bias = _segment_sum(weighted, align, num_experts, down_bias.dtype)
    return (
        grad_hidden,
        grad_gate_up.to(gate_up_proj.dtype),
        grad_down.to(down_proj.dtype),
        grad_weights,
        grad_gate_up_bias,
        grad_down_bias,
    )


def _segment_sum(rows: torch.Tensor, align: MoEAlignment, num_experts: int, dtype) -> torch.Tensor:
    """Per-expert sums of sorted ``rows (R, D)`` -> ``(E, D)``, from prefix sums at the group
    ends (deterministic, no atomics)."""
    prefix = torch.cat([rows.new_zeros(1, rows.shape[1], dtype=torch.float32), rows.float().cumsum(0)])
    ends = prefix[align.offsets.long()]
    starts = torch.cat([prefix[:1], ends[:-1]])
    return (ends - starts).to(dtype)


def fused_experts_forward(
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
    """The kernels, or the reference; ``(out (T, H), h)`` with ``h (T*k, 2I)`` the pre-activation
    the Triton and CPU backwards read when ``save_h`` (the public function sets it on those paths
    when an input requires grad), else ``(0, 2I)``. The reference recomputes what it needs."""
    args = (hidden, gate_up_proj, down_proj, weights, ids)
    if use_triton:
        return launch_fused_experts(*args, activation, gate_up_bias, down_bias, save_h)
    if hidden.is_cpu:  # the fast CPU path (same semantics), which saves h for its backward too
        return cpu_experts.fused_experts_forward(*args, activation, gate_up_bias, down_bias, save_h)
    out = reference.fused_experts(*args, activation=activation, gate_up_bias=gate_up_bias, down_bias=down_bias)
    if not save_h:
        return out.contiguous(), hidden.new_empty((0, gate_up_proj.shape[1]))
    # A direct call of the op asking for h on the reference path: the same rows the kernels save
    # (the reference's backward does not read them; it recomputes its intermediates).
    return out.contiguous(), reference.sorted_pre_activations(hidden, gate_up_proj, ids, gate_up_bias)


def fused_experts_backward(
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
    """The kernels, or the reference's explicit formulas; an empty tensor for each absent bias."""
    if use_triton:
        return launch_fused_experts_backward(
            grad_out, hidden, gate_up_proj, down_proj, weights, ids, h, activation, gate_up_bias, down_bias
        )
    args = (grad_out, hidden, gate_up_proj, down_proj, weights, ids)
    if hidden.is_cpu:  # reads the forward's h when it saved it
        grads = cpu_experts.fused_experts_backward(*args, activation, gate_up_bias, down_bias, h)
    else:
        grads = reference.fused_experts_backward(
            *args, activation=activation, gate_up_bias=gate_up_bias, down_bias=down_bias
        )
    # A fresh empty tensor per absent bias: a custom op's outputs may not alias each other.
    return tuple(hidden.new_empty(0) if g is None else g.contiguous() for g in grads)


def _fake(inputs):
    saved_rows = inputs.ids.numel() if inputs.save_h else 0
    hidden = inputs.hidden
    return hidden.new_empty(hidden.shape), hidden.new_empty((saved_rows, inputs.gate_up_proj.shape[1]))


def _backward_fake(inputs):
    """Each gradient like its input (an empty tensor for an absent bias)."""
    like = (inputs.hidden, inputs.gate_up_proj, inputs.down_proj, inputs.weights, inputs.gate_up_bias, inputs.down_bias)
    return tuple(inputs.hidden.new_empty(0) if t is None else t.new_empty(t.shape) for t in like)


def _save(ctx, inputs, outputs):
    tensors = (inputs.hidden, inputs.gate_up_proj, inputs.down_proj, inputs.weights, inputs.ids, outputs[1])
    ctx.save_for_backward(*tensors, inputs.gate_up_bias, inputs.down_bias)
    ctx.mark_non_differentiable(outputs[1])
    ctx.activation, ctx.use_triton = inputs.activation, inputs.use_triton


def _grads(ctx, backward, grad_out, _grad_h):
    *tensors, gate_up_bias, down_bias = ctx.saved_tensors  # hidden, both projections, weights, ids, h
    grads = backward(grad_out, *tensors, ctx.activation, gate_up_bias, down_bias, ctx.use_triton)
    names = ("hidden", "gate_up_proj", "down_proj", "weights", "gate_up_bias", "down_bias")
    present = {"gate_up_bias": gate_up_bias is not None, "down_bias": down_bias is not None}
    return {name: grad for name, grad in zip(names, grads) if present.get(name, True)}


FUSED_EXPERTS = define_op(fused_experts_forward, _fake, fused_experts_backward, _backward_fake, _save, _grads)
