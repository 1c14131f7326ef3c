"""Launchers and ``torch.library`` registration of the kNN-MoE logit mixing op.

========================  ======================================================================
``knn_mix``               router ``(T, E)``, neighbours ``(T, n, E)``, sims ``(T, n)`` ->
                          ``mixed (T, E)`` float32, ``conf (T,)`` float32
``knn_mix_backward``      ``grad_mixed (T, E)``, sims -> ``grad_router (T, E)``,
                          ``grad_neighbors (T, n, E)``
========================  ======================================================================

As for every op, ``use_triton`` picks the Triton kernels or the PyTorch reference; the op is built
by :func:`moe_kernels.ops._boundary.define_op`.
"""

from __future__ import annotations

import torch

from moe_kernels.config import KnnMixing
from moe_kernels.cpu import knn as cpu_knn
from moe_kernels.ops._boundary import define_op
from moe_kernels.reference import knn as reference
from moe_kernels.utils import compute_dtype, new_output, next_power_of_2, row_tiling, token_grid, unit_stride_last


def neighbor_meta(num_neighbors: int, mixing: KnnMixing) -> dict:
    """The neighbour constexprs every kNN kernel takes: ``N``, ``N_PAD`` and ``SIMILARITY``."""
    return dict(N=num_neighbors, N_PAD=next_power_of_2(num_neighbors), SIMILARITY=mixing.weighting == "similarity")


def knn_meta(num_experts: int, num_neighbors: int, mixing: KnnMixing, tiling=row_tiling) -> dict:
    """Constexprs and ``num_warps`` of both kernels (shared with the AOT cases); ``tiling``
    maps the padded row width to ``(BLOCK_T, num_warps)``."""
    block_e = next_power_of_2(num_experts)
    block_t, num_warps = tiling(block_e)
    return dict(BLOCK_T=block_t, BLOCK_E=block_e, num_warps=num_warps, **neighbor_meta(num_neighbors, mixing))


def mixing_scalars(mixing: KnnMixing) -> dict:
    """The mixing scalars every kNN kernel takes by keyword."""
    return dict(inv_temperature=1.0 / mixing.temperature, min_confidence=mixing.min_confidence)


def launch_knn_mix(router_logits, neighbor_logits, neighbor_sims, mixing: KnnMixing):
    """Run the forward kernel; returns fresh ``mixed (T, E)`` and ``conf (T,)`` float32."""
    from moe_kernels.kernels._knn import _knn_mix_fwd_kernel

    num_tokens, num_neighbors, num_experts = neighbor_logits.shape
    router_logits = unit_stride_last(router_logits)
    neighbor_logits = unit_stride_last(neighbor_logits)
    mixed = new_output((num_tokens, num_experts), torch.float32, router_logits.device)
    conf = new_output((num_tokens,), torch.float32, router_logits.device)
    if num_tokens == 0:
        return mixed, conf
    meta = knn_meta(num_experts, num_neighbors, mixing)
    _knn_mix_fwd_kernel[token_grid(meta, num_tokens)](
        router_ptr=router_logits,
        neighbors_ptr=neighbor_logits,
        sims_ptr=neighbor_sims,
        mixed_ptr=mixed,
        conf_ptr=conf,
        T=num_tokens,
        E=num_experts,
        stride_rt=router_logits.stride(0),
        stride_nt=neighbor_logits.stride(0),
        stride_nn=neighbor_logits.stride(1),
        stride_st=neighbor_sims.stride(0),
        stride_sn=neighbor_sims.stride(1),
        **mixing_scalars(mixing),
        **meta,
    )
    return mixed, conf


def launch_knn_mix_backward(grad_mixed, neighbor_sims, mixing: KnnMixing, router_dtype, neighbor_dtype):
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
    meta = knn_meta(num_experts, num_neighbors, mixing)
    _knn_mix_bwd_kernel[token_grid(meta, num_tokens)](
        grad_mixed_ptr=grad_mixed,
        sims_ptr=neighbor_sims,
        grad_router_ptr=grad_router,
        grad_neighbors_ptr=grad_neighbors,
        T=num_tokens,
        E=num_experts,
        stride_gt=grad_mixed.stride(0),
        stride_st=neighbor_sims.stride(0),
        stride_sn=neighbor_sims.stride(1),
        **mixing_scalars(mixing),
        **meta,
    )
    return grad_router, grad_neighbors


def knn_mix_forward(
    router_logits: torch.Tensor,
    neighbor_logits: torch.Tensor,
    neighbor_sims: torch.Tensor,
    mixing: KnnMixing,
    use_triton: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel, or the PyTorch path without autograd."""
    if use_triton:
        return launch_knn_mix(router_logits, neighbor_logits, neighbor_sims, mixing)
    if router_logits.is_cpu:  # the fast CPU path, same semantics
        return cpu_knn.knn_mix(router_logits, neighbor_logits, neighbor_sims, mixing)
    with torch.no_grad():
        mixed, conf = reference.knn_mix(router_logits, neighbor_logits, neighbor_sims, mixing=mixing)
    return mixed.contiguous(), conf.contiguous()


def knn_mix_backward(
    grad_mixed: torch.Tensor,
    neighbor_sims: torch.Tensor,
    mixing: KnnMixing,
    router_dtype: torch.dtype,
    neighbor_dtype: torch.dtype,
    use_triton: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel, or the PyTorch path's explicit formula."""
    if use_triton:
        return launch_knn_mix_backward(grad_mixed, neighbor_sims, mixing, router_dtype, neighbor_dtype)
    path = cpu_knn if grad_mixed.is_cpu else reference
    grad_router, grad_neighbors = path.knn_mix_backward(
        grad_mixed, neighbor_sims, mixing=mixing, router_dtype=router_dtype, neighbor_dtype=neighbor_dtype
    )
    return grad_router.contiguous(), grad_neighbors.contiguous()


def _fake(inputs):
    router_logits = inputs.router_logits
    dtype = compute_dtype(router_logits.dtype)
    return router_logits.new_empty(router_logits.shape, dtype=dtype), router_logits.new_empty(
        router_logits.shape[:1], dtype=dtype
    )


def _backward_fake(inputs):
    grad_mixed, (num_tokens, num_experts) = inputs.grad_mixed, inputs.grad_mixed.shape
    grad_router = grad_mixed.new_empty((num_tokens, num_experts), dtype=inputs.router_dtype)
    grad_neighbors_shape = (num_tokens, inputs.neighbor_sims.shape[1], num_experts)
    return grad_router, grad_mixed.new_empty(grad_neighbors_shape, dtype=inputs.neighbor_dtype)


def _save(ctx, inputs, outputs):
    ctx.save_for_backward(inputs.neighbor_sims)
    ctx.mark_non_differentiable(outputs[1])
    ctx.options = (inputs.mixing, inputs.router_logits.dtype, inputs.neighbor_logits.dtype, inputs.use_triton)


def _grads(ctx, backward, grad_mixed, _grad_conf):
    (neighbor_sims,) = ctx.saved_tensors
    grad_router, grad_neighbors = backward(grad_mixed, neighbor_sims, *ctx.options)
    # Similarities come from a search and get no gradient; nor do the options.
    return {"router_logits": grad_router, "neighbor_logits": grad_neighbors}


KNN_MIX = define_op(knn_mix_forward, _fake, knn_mix_backward, _backward_fake, _save, _grads)
