"""Launchers and ``torch.library`` registration of the kNN-MoE logit mixing op.

========================  ======================================================================
``knn_mix``               router ``(T, E)``, neighbours ``(T, n, E)``, sims ``(T, n)`` ->
                          ``mixed (T, E)`` float32, ``conf (T,)`` float32
``knn_mix_backward``      ``grad_mixed (T, E)``, sims -> ``grad_router (T, E)``,
                          ``grad_neighbors (T, n, E)``
========================  ======================================================================

As for every op, ``use_triton`` picks the Triton kernels or the PyTorch reference, and eager calls
use :class:`KnnMixFunction` (same forward and backward) to skip the dispatcher.
"""

from __future__ import annotations

import torch

from moe_kernels.reference import knn as reference
from moe_kernels.reference.routing import compute_dtype
from moe_kernels.utils import cdiv, new_output, next_power_of_2, row_tiling, unit_stride_last



def knn_meta(num_experts: int, num_neighbors: int, *, weighting: str) -> dict:
    """Constexprs and ``num_warps`` of both kernels (shared with the AOT compile registry)."""
    block_e = next_power_of_2(num_experts)
    block_t, num_warps = row_tiling(block_e)
    return dict(
        N=num_neighbors,
        N_PAD=next_power_of_2(num_neighbors),
        BLOCK_T=block_t,
        BLOCK_E=block_e,
        SIMILARITY=weighting == "similarity",
        num_warps=num_warps,
    )


def launch_knn_mix(router_logits, neighbor_logits, neighbor_sims, weighting, temperature, min_confidence):
    """Run the forward kernel; returns fresh ``mixed (T, E)`` and ``conf (T,)`` float32."""
    from moe_kernels.kernels._knn import _knn_mix_fwd_kernel

    num_tokens, num_neighbors, num_experts = neighbor_logits.shape
    router_logits = unit_stride_last(router_logits)
    neighbor_logits = unit_stride_last(neighbor_logits)
    mixed = new_output((num_tokens, num_experts), torch.float32, router_logits.device)
    conf = new_output((num_tokens,), torch.float32, router_logits.device)
    if num_tokens == 0:
        return mixed, conf
    meta = knn_meta(num_experts, num_neighbors, weighting=weighting)
    _knn_mix_fwd_kernel[(cdiv(num_tokens, meta["BLOCK_T"]),)](
        router_logits,
        neighbor_logits,
        neighbor_sims,
        mixed,
        conf,
        num_tokens,
        num_experts,
        router_logits.stride(0),
        neighbor_logits.stride(0),
        neighbor_logits.stride(1),
        neighbor_sims.stride(0),
        neighbor_sims.stride(1),
        1.0 / temperature,
        float(min_confidence),
        **meta,
    )
    return mixed, conf


def launch_knn_mix_backward(grad_mixed, neighbor_sims, weighting, temperature, min_confidence, router_dtype, neighbor_dtype):
    """Run the backward kernel; returns fresh contiguous ``grad_router`` and ``grad_neighbors``."""
    from moe_kernels.kernels._knn import _knn_mix_bwd_kernel

    num_tokens, num_experts = grad_mixed.shape
    num_neighbors = neighbor_sims.shape[1]
    grad_mixed = unit_stride_last(grad_mixed)
    device = grad_mixed.device
    grad_router = new_output((num_tokens, num_experts), router_dtype, device)
    grad_neighbors = new_output((num_tokens, num_neighbors, num_experts), neighbor_dtype, device)
    if num_tokens == 0:
        return grad_router, grad_neighbors
    meta = knn_meta(num_experts, num_neighbors, weighting=weighting)
    _knn_mix_bwd_kernel[(cdiv(num_tokens, meta["BLOCK_T"]),)](
        grad_mixed,
        neighbor_sims,
        grad_router,
        grad_neighbors,
        num_tokens,
        num_experts,
        grad_mixed.stride(0),
        neighbor_sims.stride(0),
        neighbor_sims.stride(1),
        1.0 / temperature,
        float(min_confidence),
        **meta,
    )
    return grad_router, grad_neighbors


def knn_mix_forward(router_logits, neighbor_logits, neighbor_sims, weighting, temperature, min_confidence, use_triton):
    """The forward of both entry points: the kernel, or the reference without autograd."""
    if use_triton:
        return launch_knn_mix(router_logits, neighbor_logits, neighbor_sims, weighting, temperature, min_confidence)
    with torch.no_grad():
        mixed, conf = reference.knn_mix(
            router_logits,
            neighbor_logits,
            neighbor_sims,
            weighting=weighting,
            temperature=temperature,
            min_confidence=min_confidence,
        )
    return mixed.contiguous(), conf.contiguous()


def knn_mix_backward(grad_mixed, neighbor_sims, weighting, temperature, min_confidence, router_dtype, neighbor_dtype, use_triton):
    """The backward of both entry points: the kernel, or the reference's explicit formula."""
    if use_triton:
        return launch_knn_mix_backward(
            grad_mixed, neighbor_sims, weighting, temperature, min_confidence, router_dtype, neighbor_dtype
        )
    grad_router, grad_neighbors = reference.knn_mix_backward(
        grad_mixed,
        neighbor_sims,
        weighting=weighting,
        temperature=temperature,
        min_confidence=min_confidence,
        router_dtype=router_dtype,
        neighbor_dtype=neighbor_dtype,
    )
    return grad_router.contiguous(), grad_neighbors.contiguous()


@torch.library.custom_op("moe_kernels::knn_mix", mutates_args=())
def knn_mix_op(
    router_logits: torch.Tensor,
    neighbor_logits: torch.Tensor,
    neighbor_sims: torch.Tensor,
    weighting: str,
    temperature: float,
    min_confidence: float,
    use_triton: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return knn_mix_forward(
        router_logits, neighbor_logits, neighbor_sims, weighting, temperature, min_confidence, use_triton
    )


@knn_mix_op.register_fake
def _knn_mix_fake(router_logits, neighbor_logits, neighbor_sims, weighting, temperature, min_confidence, use_triton):
    dtype = compute_dtype(router_logits.dtype)
    return router_logits.new_empty(router_logits.shape, dtype=dtype), router_logits.new_empty(
        router_logits.shape[:1], dtype=dtype
    )


@torch.library.custom_op("moe_kernels::knn_mix_backward", mutates_args=())
def knn_mix_backward_op(
    grad_mixed: torch.Tensor,
    neighbor_sims: torch.Tensor,
    weighting: str,
    temperature: float,
    min_confidence: float,
    router_dtype: torch.dtype,
    neighbor_dtype: torch.dtype,
    use_triton: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return knn_mix_backward(
        grad_mixed, neighbor_sims, weighting, temperature, min_confidence, router_dtype, neighbor_dtype, use_triton
    )


@knn_mix_backward_op.register_fake
def _knn_mix_backward_fake(grad_mixed, neighbor_sims, weighting, temperature, min_confidence, router_dtype, neighbor_dtype, use_triton):
    num_tokens, num_experts = grad_mixed.shape
    grad_router = grad_mixed.new_empty((num_tokens, num_experts), dtype=router_dtype)
    grad_neighbors = grad_mixed.new_empty((num_tokens, neighbor_sims.shape[1], num_experts), dtype=neighbor_dtype)
    return grad_router, grad_neighbors


def _save_for_backward(ctx, router_logits, neighbor_logits, neighbor_sims, weighting, temperature, min_confidence, use_triton):
    ctx.save_for_backward(neighbor_sims)
    ctx.dtypes = (router_logits.dtype, neighbor_logits.dtype)
    ctx.options = (weighting, temperature, min_confidence)
    ctx.use_triton = use_triton


def _grads(ctx, grad_mixed, backward):
    (neighbor_sims,) = ctx.saved_tensors
    grad_router, grad_neighbors = backward(grad_mixed, neighbor_sims, *ctx.options, *ctx.dtypes, ctx.use_triton)
    # Similarities come from a search and get no gradient; nor do the options.
    return grad_router, grad_neighbors, None, None, None, None, None


def _setup_context(ctx, inputs, output):
    _save_for_backward(ctx, *inputs)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_mixed, _grad_conf):
    return _grads(ctx, grad_mixed, knn_mix_backward_op)


knn_mix_op.register_autograd(_backward, setup_context=_setup_context)


class KnnMixFunction(torch.autograd.Function):
    """Eager-mode entry point with the same forward and backward as ``moe_kernels::knn_mix``,
    without the dispatcher's per-call cost (see ``SoftmaxTopkFunction``)."""

    @staticmethod
    def forward(ctx, router_logits, neighbor_logits, neighbor_sims, weighting, temperature, min_confidence, use_triton):
        mixed, conf = knn_mix_forward(
            router_logits, neighbor_logits, neighbor_sims, weighting, temperature, min_confidence, use_triton
        )
        _save_for_backward(
            ctx, router_logits, neighbor_logits, neighbor_sims, weighting, temperature, min_confidence, use_triton
        )
        ctx.mark_non_differentiable(conf)
        return mixed, conf

    @staticmethod
    def backward(ctx, grad_mixed, _grad_conf):
        return _grads(ctx, grad_mixed, knn_mix_backward)
