"""Launchers and ``torch.library`` op of the gate + top-k routing (AOT cases: ``aot/cases/routing.py``).

========================  ======================================================================
``softmax_topk``          ``(T, E)`` logits -> ``weights (T, k)`` float32, ``ids (T, k)`` int32
``softmax_topk_backward`` ``grad_weights (T, k)``, logits, ids -> ``grad_logits (T, E)``
========================  ======================================================================

Both take ``use_triton``: True launches the Triton kernels (CUDA, or the CPU interpreter), False
runs the PyTorch path (:mod:`moe_kernels.cpu` for CPU tensors, the reference elsewhere), so that
one registered op (with its fake and autograd) serves every device and backend. The routing
options arrive as a :class:`~moe_kernels.config.RoutingConfig` (flattened across the schema by
the op boundary). Arguments are validated by the public API (``moe_kernels.functional``); the
launchers only check what would make a kernel read or write out of bounds.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from moe_kernels.config import RoutingConfig
from moe_kernels.cpu import routing as cpu_routing
from moe_kernels.ops._boundary import define_op
from moe_kernels.ops._launch import MIN_PROGRAMS, row_tiling, strides, tiling_rows, token_grid, unit_stride_last
from moe_kernels.reference import routing as reference
from moe_kernels.utils import compute_dtype, new_output, next_power_of_2

# Largest E the kernels take: one row must fit one program's registers.
MAX_TRITON_EXPERTS = 4096
# Largest group count the kernels unroll.
MAX_TRITON_GROUPS = 64


class RouteConstexprs(NamedTuple):
    """The ``ROUTING`` constexpr of the routing forward and fused kNN-route kernels (read by
    ``kernels._routing.route_tile`` by field name): ``K`` experts per token (``K_PAD`` its power of
    two), the tile's ``G_PAD`` groups of ``GS_PAD`` columns each, and the routing flags."""

    K: int
    K_PAD: int
    G_PAD: int
    GS_PAD: int
    SOFTMAX: bool
    RENORMALIZE: bool
    HAS_BIAS: bool
    GROUPED: bool
    TOPK_GROUPS: int
    GROUP_TOP2: bool


def forward_meta(num_tokens: int, num_experts: int, k: int, routing: RoutingConfig, has_bias: bool) -> dict:
    """Constexprs and ``num_warps`` of the forward kernel for a problem (a pure function of the
    sizes and the routing, shared with the AOT cases).

    With groups the row tile is group-major, ``G_PAD * GS_PAD`` wide (each group padded to a
    power of two), so the kernel can score all groups with one reshape.
    """
    groups = routing.num_groups or 1
    g_pad, gs_pad = next_power_of_2(groups), next_power_of_2(num_experts // groups)
    block_t, num_warps = row_tiling(g_pad * gs_pad, num_tokens, MIN_PROGRAMS)
    constexprs = RouteConstexprs(
        K=k,
        K_PAD=next_power_of_2(k),
        G_PAD=g_pad,
        GS_PAD=gs_pad,
        SOFTMAX=routing.score_func == "softmax",
        RENORMALIZE=routing.renormalize,
        HAS_BIAS=has_bias,
        GROUPED=routing.num_groups is not None,
        TOPK_GROUPS=routing.topk_groups or 0,
        GROUP_TOP2=routing.group_score == "top2_sum",
    )
    contiguous = routing.num_groups is None or gs_pad * routing.num_groups == num_experts
    return dict(ROUTING=constexprs, BLOCK_T=block_t, CONTIGUOUS=contiguous, num_warps=num_warps)


def backward_meta(num_tokens: int, num_experts: int, k: int, routing: RoutingConfig) -> dict:
    """Constexprs and ``num_warps`` of the backward kernel."""
    block_e = next_power_of_2(num_experts)
    block_t, num_warps = row_tiling(block_e, num_tokens, MIN_PROGRAMS)
    return dict(
        K=k,
        K_PAD=next_power_of_2(k),
        BLOCK_T=block_t,
        BLOCK_E=block_e,
        SOFTMAX=routing.score_func == "softmax",
        RENORMALIZE=routing.renormalize,
        num_warps=num_warps,
    )


def launch_softmax_topk(logits: torch.Tensor, k: int, routing: RoutingConfig, bias: torch.Tensor | None):
    """Run the forward kernel on ``logits (T, E)``; returns fresh ``(T, k)`` float32 / int32."""
    from moe_kernels.kernels._routing import _softmax_topk_fwd_kernel

    num_tokens, num_experts = logits.shape
    logits = unit_stride_last(logits)
    weights = new_output((num_tokens, k), torch.float32, logits.device)
    ids = new_output((num_tokens, k), torch.int32, logits.device)
    if num_tokens == 0:
        return weights, ids
    meta = forward_meta(tiling_rows(num_tokens), num_experts, k, routing, bias is not None)
    _softmax_topk_fwd_kernel[token_grid(meta, num_tokens)](
        logits_ptr=logits,
        bias_ptr=logits if bias is None else bias,  # never read without HAS_BIAS
        weights_ptr=weights,
        ids_ptr=ids,
        T=num_tokens,
        E=num_experts,
        group_size=num_experts // (routing.num_groups or 1),
        **strides(logits, "stride_lt"),
        scale=routing.scale,
        **meta,
    )
    return weights, ids


def launch_softmax_topk_backward(grad_weights, logits, ids, routing: RoutingConfig):
    """Run the backward kernel; returns a fresh contiguous ``(T, E)`` gradient in logits' dtype."""
    from moe_kernels.kernels._routing import _softmax_topk_bwd_kernel

    num_tokens, num_experts = logits.shape
    logits = unit_stride_last(logits)
    grad_logits = new_output((num_tokens, num_experts), logits.dtype, logits.device)
    if num_tokens == 0:
        return grad_logits
    ids = ids.contiguous()
    meta = backward_meta(num_tokens, num_experts, ids.shape[1], routing)
    _softmax_topk_bwd_kernel[token_grid(meta, num_tokens)](
        grad_weights_ptr=grad_weights,
        logits_ptr=logits,
        ids_ptr=ids,
        grad_logits_ptr=grad_logits,
        T=num_tokens,
        E=num_experts,
        **strides(grad_weights, "stride_gt", "stride_gk"),
        **strides(logits, "stride_lt"),
        scale=routing.scale,
        **meta,
    )
    return grad_logits


# ------------------------------------------------------------------------------------------------
# The op


def softmax_topk_forward(
    logits: torch.Tensor, k: int, bias: torch.Tensor | None, routing: RoutingConfig, use_triton: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel, or the PyTorch path (without autograd: the op owns the gradient)."""
    if use_triton:
        return launch_softmax_topk(logits, k, routing, bias)
    if logits.is_cpu:  # the fast CPU path, same semantics; fresh contiguous outputs, no graph
        return cpu_routing.softmax_topk(logits, k, routing, bias)
    with torch.no_grad():
        weights, ids = reference.softmax_topk(logits, k, routing=routing, bias=bias)
    return weights.contiguous(), ids.contiguous()


def softmax_topk_backward(
    grad_weights: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor, routing: RoutingConfig, use_triton: bool
) -> torch.Tensor:
    """The kernel, or the PyTorch path's explicit formula."""
    if use_triton:
        return launch_softmax_topk_backward(grad_weights, logits, ids, routing)
    path = cpu_routing if logits.is_cpu else reference
    return path.softmax_topk_backward(grad_weights, logits, ids, routing=routing).contiguous()


def _fake(inputs):
    logits, shape = inputs.logits, (inputs.logits.shape[0], inputs.k)
    return logits.new_empty(shape, dtype=compute_dtype(logits.dtype)), logits.new_empty(shape, dtype=torch.int32)


def _backward_fake(inputs):
    return inputs.logits.new_empty(inputs.logits.shape)


def _save(ctx, inputs, outputs):
    ctx.save_for_backward(inputs.logits, outputs[1])
    ctx.mark_non_differentiable(outputs[1])
    ctx.routing, ctx.use_triton = inputs.routing, inputs.use_triton


def _grads(ctx, backward, grad_weights, _grad_ids):
    logits, ids = ctx.saved_tensors
    # The bias and the group options only choose ids: no gradient; ids are not differentiable.
    return {"logits": backward(grad_weights, logits, ids, ctx.routing, ctx.use_triton)}


SOFTMAX_TOPK = define_op(softmax_topk_forward, _fake, softmax_topk_backward, _backward_fake, _save, _grads)
