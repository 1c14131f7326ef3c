"""Launchers and ``torch.library`` registration of the gate + top-k op.

Ops (namespace ``moe_kernels``):

========================  ======================================================================
``softmax_topk``          ``(T, E)`` logits -> ``weights (T, k)`` float32, ``ids (T, k)`` int32
``softmax_topk_backward`` ``grad_weights (T, k)``, logits, ids -> ``grad_logits (T, E)``
========================  ======================================================================

Both take ``use_triton``: True launches the Triton kernels (CUDA, or the CPU interpreter), False
runs the PyTorch reference, so that one registered op (with its fake and autograd) serves every
device and backend. Arguments are validated by the public API (``moe_kernels.functional``); the
launchers only check what would make a kernel read or write out of bounds.
"""

from __future__ import annotations

import torch

from moe_kernels import reference
from moe_kernels._compat import interpreter_enabled
from moe_kernels.utils import cdiv, new_output, next_power_of_2, row_tiling, unit_stride_last

# Largest E the kernels take: one row must fit one program's registers.
MAX_TRITON_EXPERTS = 4096
# Largest group count the kernels unroll.
MAX_TRITON_GROUPS = 64
# Small batches are spread over at least this many programs (about one per SM of an H100) so a
# decode step is not serialised on a few SMs. The interpreter runs programs one after another at
# a large fixed cost each, so there the fewest programs win.
_MIN_PROGRAMS = 1 if interpreter_enabled() else 128


def forward_meta(
    num_tokens: int,
    num_experts: int,
    k: int,
    *,
    renormalize: bool,
    score_func: str,
    has_bias: bool,
    num_groups: int,
    topk_groups: int,
    group_score: str,
) -> dict:
    """Constexprs and ``num_warps`` of the forward kernel for a problem (a pure function of the
    sizes and flags, shared with the ahead-of-time compile registry).

    With groups the row tile is group-major, ``G_PAD * GS_PAD`` wide (each group padded to a
    power of two), so the kernel can score all groups with one reshape.
    """
    groups = max(num_groups, 1)
    g_pad, gs_pad = next_power_of_2(groups), next_power_of_2(num_experts // groups)
    block_t, num_warps = row_tiling(g_pad * gs_pad, num_tokens, _MIN_PROGRAMS)
    return dict(
        K=k,
        K_PAD=next_power_of_2(k),
        BLOCK_T=block_t,
        G_PAD=g_pad,
        GS_PAD=gs_pad,
        SOFTMAX=score_func == "softmax",
        RENORMALIZE=renormalize,
        HAS_BIAS=has_bias,
        GROUPED=num_groups > 0,
        TOPK_GROUPS=topk_groups,
        GROUP_TOP2=group_score == "top2_sum",
        CONTIGUOUS=num_groups == 0 or gs_pad * num_groups == num_experts,
        num_warps=num_warps,
    )


def backward_meta(num_tokens: int, num_experts: int, k: int, *, renormalize: bool, score_func: str) -> dict:
    """Constexprs and ``num_warps`` of the backward kernel."""
    block_e = next_power_of_2(num_experts)
    block_t, num_warps = row_tiling(block_e, num_tokens, _MIN_PROGRAMS)
    return dict(
        K=k,
        K_PAD=next_power_of_2(k),
        BLOCK_T=block_t,
        BLOCK_E=block_e,
        SOFTMAX=score_func == "softmax",
        RENORMALIZE=renormalize,
        num_warps=num_warps,
    )


def _grid(meta: dict, num_tokens: int) -> tuple[int]:
    return (cdiv(num_tokens, meta["BLOCK_T"]),)


def launch_softmax_topk(
    logits: torch.Tensor,
    k: int,
    renormalize: bool,
    score_func: str,
    bias: torch.Tensor | None,
    num_groups: int,
    topk_groups: int,
    group_score: str,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel on ``logits (T, E)``; returns fresh ``(T, k)`` float32 / int32."""
    from moe_kernels.kernels._routing import _softmax_topk_fwd_kernel

    num_tokens, num_experts = logits.shape
    logits = unit_stride_last(logits)
    weights = new_output((num_tokens, k), torch.float32, logits.device)
    ids = new_output((num_tokens, k), torch.int32, logits.device)
    if num_tokens == 0:
        return weights, ids
    meta = forward_meta(
        num_tokens,
        num_experts,
        k,
        renormalize=renormalize,
        score_func=score_func,
        has_bias=bias is not None,
        num_groups=num_groups,
        topk_groups=topk_groups,
        group_score=group_score,
    )
    _softmax_topk_fwd_kernel[_grid(meta, num_tokens)](
        logits,
        logits if bias is None else bias,  # never read without HAS_BIAS
        weights,
        ids,
        num_tokens,
        num_experts,
        num_experts // max(num_groups, 1),  # group_size
        logits.stride(0),
        float(scale),
        **meta,
    )
    return weights, ids


def launch_softmax_topk_backward(
    grad_weights: torch.Tensor,
    logits: torch.Tensor,
    ids: torch.Tensor,
    renormalize: bool,
    score_func: str,
    scale: float,
) -> torch.Tensor:
    """Run the backward kernel; returns a fresh contiguous ``(T, E)`` gradient in logits' dtype."""
    from moe_kernels.kernels._routing import _softmax_topk_bwd_kernel

    num_tokens, num_experts = logits.shape
    logits = unit_stride_last(logits)
    k = ids.shape[1]
    grad_logits = new_output((num_tokens, num_experts), logits.dtype, logits.device)
    if num_tokens == 0:
        return grad_logits
    ids = ids.contiguous()
    meta = backward_meta(num_tokens, num_experts, k, renormalize=renormalize, score_func=score_func)
    _softmax_topk_bwd_kernel[_grid(meta, num_tokens)](
        grad_weights,
        logits,
        ids,
        grad_logits,
        num_tokens,
        num_experts,
        grad_weights.stride(0),
        grad_weights.stride(1),
        logits.stride(0),
        float(scale),
        **meta,
    )
    return grad_logits


def softmax_topk_forward(
    logits: torch.Tensor,
    k: int,
    renormalize: bool,
    score_func: str,
    bias: torch.Tensor | None,
    num_groups: int,
    topk_groups: int,
    group_score: str,
    scale: float,
    use_triton: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward of both entry points (the registered op and the eager Function): the kernel,
    or the reference (without autograd: the caller owns the gradient)."""
    if use_triton:
        return launch_softmax_topk(
            logits, k, renormalize, score_func, bias, num_groups, topk_groups, group_score, scale
        )
    with torch.no_grad():
        weights, ids = reference.softmax_topk(
            logits,
            k,
            renormalize=renormalize,
            score_func=score_func,
            bias=bias,
            num_groups=num_groups or None,
            topk_groups=topk_groups or None,
            group_score=group_score,
            scale=scale,
        )
    return weights.contiguous(), ids.contiguous()


def softmax_topk_backward(
    grad_weights: torch.Tensor,
    logits: torch.Tensor,
    ids: torch.Tensor,
    renormalize: bool,
    score_func: str,
    scale: float,
    use_triton: bool,
) -> torch.Tensor:
    """The backward of both entry points: the kernel, or the reference's explicit formula."""
    if use_triton:
        return launch_softmax_topk_backward(grad_weights, logits, ids, renormalize, score_func, scale)
    grad = reference.softmax_topk_backward(
        grad_weights, logits, ids, renormalize=renormalize, score_func=score_func, scale=scale
    )
    return grad.contiguous()


@torch.library.custom_op("moe_kernels::softmax_topk", mutates_args=())
def softmax_topk_op(
    logits: torch.Tensor,
    k: int,
    renormalize: bool,
    score_func: str,
    bias: torch.Tensor | None,
    num_groups: int,
    topk_groups: int,
    group_score: str,
    scale: float,
    use_triton: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return softmax_topk_forward(
        logits, k, renormalize, score_func, bias, num_groups, topk_groups, group_score, scale, use_triton
    )


@softmax_topk_op.register_fake
def _softmax_topk_fake(logits, k, renormalize, score_func, bias, num_groups, topk_groups, group_score, scale, use_triton):
    num_tokens = logits.shape[0]
    weights = logits.new_empty((num_tokens, k), dtype=reference.routing.compute_dtype(logits.dtype))
    ids = logits.new_empty((num_tokens, k), dtype=torch.int32)
    return weights, ids


@torch.library.custom_op("moe_kernels::softmax_topk_backward", mutates_args=())
def softmax_topk_backward_op(
    grad_weights: torch.Tensor,
    logits: torch.Tensor,
    ids: torch.Tensor,
    renormalize: bool,
    score_func: str,
    scale: float,
    use_triton: bool,
) -> torch.Tensor:
    return softmax_topk_backward(grad_weights, logits, ids, renormalize, score_func, scale, use_triton)


@softmax_topk_backward_op.register_fake
def _softmax_topk_backward_fake(grad_weights, logits, ids, renormalize, score_func, scale, use_triton):
    return logits.new_empty(logits.shape)


def _save_for_backward(ctx, logits, ids, renormalize, score_func, scale, use_triton):
    ctx.save_for_backward(logits, ids)
    ctx.mark_non_differentiable(ids)
    ctx.renormalize, ctx.score_func, ctx.scale, ctx.use_triton = renormalize, score_func, scale, use_triton


def _setup_context(ctx, inputs, output):
    logits, _, renormalize, score_func, _, _, _, _, scale, use_triton = inputs
    _save_for_backward(ctx, logits, output[1], renormalize, score_func, scale, use_triton)


def _backward(ctx, grad_weights, _grad_ids):
    logits, ids = ctx.saved_tensors
    grad_logits = softmax_topk_backward_op(
        grad_weights, logits, ids, ctx.renormalize, ctx.score_func, ctx.scale, ctx.use_triton
    )
    # The bias, the group settings and the flags get no gradient; ids are not differentiable.
    return grad_logits, None, None, None, None, None, None, None, None, None


softmax_topk_op.register_autograd(_backward, setup_context=_setup_context)


class SoftmaxTopkFunction(torch.autograd.Function):
    """Eager-mode entry point with the same arguments, forward and backward as
    ``moe_kernels::softmax_topk``, without the dispatcher: a registered op with autograd costs
    about 100 us more per call than this on a 2-core CPU host (~160 vs ~55 us over the bare
    forward), which would dwarf a few-microsecond routing kernel. ``torch.compile`` traces the
    registered op instead (see ``moe_kernels.functional.routing``)."""

    @staticmethod
    def forward(ctx, logits, k, renormalize, score_func, bias, num_groups, topk_groups, group_score, scale, use_triton):
        weights, ids = softmax_topk_forward(
            logits, k, renormalize, score_func, bias, num_groups, topk_groups, group_score, scale, use_triton
        )
        _save_for_backward(ctx, logits, ids, renormalize, score_func, scale, use_triton)
        return weights, ids

    @staticmethod
    def backward(ctx, grad_weights, _grad_ids):
        logits, ids = ctx.saved_tensors
        grad_logits = softmax_topk_backward(
            grad_weights, logits, ids, ctx.renormalize, ctx.score_func, ctx.scale, ctx.use_triton
        )
        return grad_logits, None, None, None, None, None, None, None, None, None
