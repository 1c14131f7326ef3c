"""Launchers and ``torch.library`` registration of the kNN-MoE ops (AOT cases: ``aot/cases/knn.py``).

==========================  ====================================================================
``knn_mix``                 router ``(T, E)``, neighbours ``(T, n, E)``, sims ``(T, n)`` ->
                            ``mixed (T, E)`` float32, ``conf (T,)`` float32
``knn_mix_backward``        ``grad_mixed (T, E)``, sims -> ``grad_router (T, E)``,
                            ``grad_neighbors (T, n, E)``
``knn_route``               router ``(T, E)``, neighbour ids ``(T, n)`` and sims ``(T, n)``,
                            memory ``(N, E)`` -> ``weights (T, k)`` float32, ``ids (T, k)``
                            int32, ``conf (T,)`` float32
``knn_route_backward``      ``grad_weights (T, k)`` and the forward's inputs and ids ->
                            ``grad_router (T, E)``, ``grad_memory (N, E)`` (``(0,)`` when the
                            memory needs no gradient)
==========================  ====================================================================

The fused route's forward is one kernel (gather, confidence, mix and the routing of
``softmax_topk``; no ``(T, E)`` intermediate in memory). Its backward: a kernel recomputes the
mixed logits ``(T, E)`` float32 with the confidences and neighbour shares ``conf * w_j``; the
routing backward kernel turns ``grad_weights`` into ``grad_mixed``; then ``grad_router = (1 - conf)
* grad_mixed`` and, only when the memory requires grad, ``grad_memory`` by ``index_add_`` of
``conf * w_j * grad_mixed`` over the neighbour ids (float32 accumulation, one ``(T, E)`` temporary
per neighbour slot). On CUDA ``index_add_`` accumulates with atomics, so ``grad_memory`` is not
bit-deterministic from run to run when tokens share a memory row
(``torch.use_deterministic_algorithms`` makes it so).

As for every op, ``use_triton`` picks the Triton kernels or the PyTorch path; the ops are built by
:func:`moe_kernels.ops._boundary.define_op`. Arguments are validated by ``moe_kernels.functional.knn``,
except the neighbour ids on the Triton path: the fused kernel masks its gathers to ``[0, N)``,
flags a bad id and the launcher asserts on the flag (``torch._assert_async``, no host sync).
"""

from __future__ import annotations

import torch

from moe_kernels.config import KnnMixing, RoutingConfig
from moe_kernels.cpu import knn as cpu_knn
from moe_kernels.ops._boundary import define_op
from moe_kernels.ops._launch import MIN_PROGRAMS, row_tiling, strides, tiling_rows, token_grid, unit_stride_last
from moe_kernels.ops.routing import forward_meta, launch_softmax_topk_backward
from moe_kernels.reference import knn as reference
from moe_kernels.utils import compute_dtype, new_output, next_power_of_2


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
        **strides(router_logits, "stride_rt"),
        **strides(neighbor_logits, "stride_nt", "stride_nn"),
        **strides(neighbor_sims, "stride_st", "stride_sn"),
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
        **strides(grad_mixed, "stride_gt"),
        **strides(neighbor_sims, "stride_st", "stride_sn"),
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


def _mix_fake(inputs):
    router_logits = inputs.router_logits
    dtype = compute_dtype(router_logits.dtype)
    return router_logits.new_empty(router_logits.shape, dtype=dtype), router_logits.new_empty(
        router_logits.shape[:1], dtype=dtype
    )


def _mix_backward_fake(inputs):
    grad_mixed, (num_tokens, num_experts) = inputs.grad_mixed, inputs.grad_mixed.shape
    grad_router = grad_mixed.new_empty((num_tokens, num_experts), dtype=inputs.router_dtype)
    grad_neighbors_shape = (num_tokens, inputs.neighbor_sims.shape[1], num_experts)
    return grad_router, grad_mixed.new_empty(grad_neighbors_shape, dtype=inputs.neighbor_dtype)


def _mix_save(ctx, inputs, outputs):
    ctx.save_for_backward(inputs.neighbor_sims)
    ctx.mark_non_differentiable(outputs[1])
    ctx.options = (inputs.mixing, inputs.router_logits.dtype, inputs.neighbor_logits.dtype, inputs.use_triton)


def _mix_grads(ctx, backward, grad_mixed, _grad_conf):
    (neighbor_sims,) = ctx.saved_tensors
    grad_router, grad_neighbors = backward(grad_mixed, neighbor_sims, *ctx.options)
    # Similarities come from a search and get no gradient; nor do the options.
    return {"router_logits": grad_router, "neighbor_logits": grad_neighbors}


KNN_MIX = define_op(knn_mix_forward, _mix_fake, knn_mix_backward, _mix_backward_fake, _mix_save, _mix_grads)


def _tiling(width: int, num_neighbors: int, num_tokens: int = 0, min_programs: int = 0) -> tuple[int, int]:
    """``(BLOCK_T, num_warps)``: the routing's row tiling at half its elements per thread.

    Next to the routing's tiles, the gather kernels hold the router tile, the accumulated and the
    loaded memory tile and a ``(BLOCK_T, N_PAD)`` similarity and weight tile. At the routing's 4
    elements per thread (8 at n = 32 with E = 8) they took 72-102 registers on sm_90 / sm_80 and
    spilled at E = 8, n = 32; at 2 they take at most 64 (``moe-kernels info --kernels``).
    """
    return row_tiling(2 * max(width, next_power_of_2(num_neighbors)), num_tokens, min_programs)


def knn_route_meta(
    num_tokens: int,
    num_experts: int,
    k: int,
    num_neighbors: int,
    routing: RoutingConfig,
    has_bias: bool,
    mixing: KnnMixing,
) -> dict:
    """Constexprs and ``num_warps`` of the fused forward kernel: the routing forward kernel's
    (:func:`~moe_kernels.ops.routing.forward_meta`: same column layout; rows per program from
    :func:`_tiling`) plus the neighbour count and weighting (shared with the AOT registry)."""
    meta = forward_meta(num_tokens, num_experts, k, routing, has_bias)
    width = meta["ROUTING"].G_PAD * meta["ROUTING"].GS_PAD
    block_t, num_warps = _tiling(width, num_neighbors, num_tokens, MIN_PROGRAMS)
    meta.update(BLOCK_T=block_t, num_warps=num_warps, **neighbor_meta(num_neighbors, mixing))
    return meta


def knn_route_mixed_meta(num_experts: int, num_neighbors: int, mixing: KnnMixing) -> dict:
    """Constexprs and ``num_warps`` of the backward's recompute kernel: :func:`knn_meta`'s with
    :func:`_tiling`."""
    return knn_meta(num_experts, num_neighbors, mixing, tiling=lambda width: _tiling(width, num_neighbors))


def _gather_args(router_logits, neighbor_ids, neighbor_sims, memory_logits, mixing: KnnMixing) -> dict:
    """The arguments both gather kernels take by the same names: the router and memory logits
    (made unit-stride in their rows), ids, sims, the memory's rows, every stride and the mixing
    scalars."""
    router_logits, memory_logits = unit_stride_last(router_logits), unit_stride_last(memory_logits)
    return dict(
        router_ptr=router_logits,
        memory_ptr=memory_logits,
        nbr_ids_ptr=neighbor_ids,
        sims_ptr=neighbor_sims,
        M_rows=memory_logits.shape[0],
        **strides(router_logits, "stride_rt"),
        **strides(memory_logits, "stride_mn"),
        **strides(neighbor_ids, "stride_it", "stride_in"),
        **strides(neighbor_sims, "stride_st", "stride_sn"),
        **mixing_scalars(mixing),
    )


def launch_knn_route(
    router_logits, neighbor_ids, neighbor_sims, memory_logits, k, routing: RoutingConfig, bias, mixing: KnnMixing
):
    """Run the fused forward kernel; returns fresh ``weights (T, k)`` float32, ``ids (T, k)``
    int32 and ``conf (T,)`` float32. Neighbour ids outside the memory's rows are checked in the
    kernel (they gather nothing) and fail an asynchronous device assert afterwards."""
    from moe_kernels.kernels._knn import _knn_route_fwd_kernel

    num_tokens, num_experts = router_logits.shape
    device, num_rows = router_logits.device, memory_logits.shape[0]
    weights = new_output((num_tokens, k), torch.float32, device)
    ids = new_output((num_tokens, k), torch.int32, device)
    conf = new_output((num_tokens,), torch.float32, device)
    if num_tokens == 0:
        return weights, ids, conf
    valid = torch.ones((), dtype=torch.int32, device=device)
    num_neighbors = neighbor_sims.shape[1]
    meta = knn_route_meta(tiling_rows(num_tokens), num_experts, k, num_neighbors, routing, bias is not None, mixing)
    gather = _gather_args(router_logits, neighbor_ids, neighbor_sims, memory_logits, mixing)
    _knn_route_fwd_kernel[token_grid(meta, num_tokens)](
        bias_ptr=gather["router_ptr"] if bias is None else bias,  # never read without HAS_BIAS
        weights_ptr=weights,
        ids_ptr=ids,
        conf_ptr=conf,
        valid_ptr=valid,
        T=num_tokens,
        E=num_experts,
        group_size=num_experts // (routing.num_groups or 1),
        scale=routing.scale,
        **gather,
        **meta,
    )
    torch._assert_async(valid, f"knn_route: neighbor_ids must lie in [0, N) = [0, {num_rows})")
    return weights, ids, conf


def launch_knn_route_mixed(router_logits, neighbor_ids, neighbor_sims, memory_logits, mixing: KnnMixing):
    """Recompute ``mixed (T, E)`` float32, ``conf (T,)`` float32 and ``share (T, n)`` float32
    (``conf * w_j``, 0 where ``conf == 0``) with the forward's arithmetic."""
    from moe_kernels.kernels._knn import _knn_route_mixed_kernel

    num_tokens, num_experts = router_logits.shape
    num_neighbors = neighbor_sims.shape[1]
    device = router_logits.device
    mixed = new_output((num_tokens, num_experts), torch.float32, device)
    conf = new_output((num_tokens,), torch.float32, device)
    share = new_output((num_tokens, num_neighbors), torch.float32, device)
    if num_tokens == 0:
        return mixed, conf, share
    meta = knn_route_mixed_meta(num_experts, num_neighbors, mixing)
    _knn_route_mixed_kernel[token_grid(meta, num_tokens)](
        mixed_ptr=mixed,
        conf_ptr=conf,
        share_ptr=share,
        T=num_tokens,
        E=num_experts,
        **_gather_args(router_logits, neighbor_ids, neighbor_sims, memory_logits, mixing),
        **meta,
    )
    return mixed, conf, share


def launch_knn_route_backward(
    grad_weights, router_logits, neighbor_ids, neighbor_sims, memory_logits, ids, *, routing, mixing, memory_grad
):
    """The backward on the kernels: returns ``grad_router`` (router dtype) and ``grad_memory``
    (memory dtype; ``None`` unless ``memory_grad``)."""
    mixed, conf, share = launch_knn_route_mixed(router_logits, neighbor_ids, neighbor_sims, memory_logits, mixing)
    grad_mixed = launch_softmax_topk_backward(grad_weights, mixed, ids, routing)
    grad_router = ((1.0 - conf)[:, None] * grad_mixed).to(router_logits.dtype)
    if not memory_grad:
        return grad_router, None
    grad_memory = torch.zeros(memory_logits.shape, dtype=torch.float32, device=grad_mixed.device)
    # One neighbour slot at a time: a (T, E) temporary instead of (T * n, E).
    for j in range(neighbor_ids.shape[1]):
        grad_memory.index_add_(0, neighbor_ids[:, j], share[:, j, None] * grad_mixed)
    return grad_router, grad_memory.to(memory_logits.dtype)


def knn_route_forward(
    router_logits: torch.Tensor,
    neighbor_ids: torch.Tensor,
    neighbor_sims: torch.Tensor,
    memory_logits: torch.Tensor,
    k: int,
    bias: torch.Tensor | None,
    routing: RoutingConfig,
    mixing: KnnMixing,
    use_triton: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused kernel, or the PyTorch path without autograd."""
    inputs = (router_logits, neighbor_ids, neighbor_sims, memory_logits, k)
    if use_triton:
        return launch_knn_route(*inputs, routing, bias, mixing)
    if router_logits.is_cpu:  # the fast CPU path, same semantics
        return cpu_knn.knn_route(*inputs, routing, bias, mixing)
    with torch.no_grad():
        weights, ids, conf = reference.knn_route(*inputs, routing=routing, bias=bias, mixing=mixing)
    return weights.contiguous(), ids.contiguous(), conf.contiguous()


def knn_route_backward(
    grad_weights: torch.Tensor,
    router_logits: torch.Tensor,
    neighbor_ids: torch.Tensor,
    neighbor_sims: torch.Tensor,
    memory_logits: torch.Tensor,
    ids: torch.Tensor,
    routing: RoutingConfig,
    mixing: KnnMixing,
    memory_grad: bool,
    use_triton: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_router, grad_memory)``, ``grad_memory`` an empty ``(0,)`` tensor unless
    ``memory_grad`` (a registered op cannot return None)."""
    args = (grad_weights, router_logits, neighbor_ids, neighbor_sims, memory_logits, ids)
    if use_triton:
        backward = launch_knn_route_backward
    else:
        backward = (cpu_knn if router_logits.is_cpu else reference).knn_route_backward
    grad_router, grad_memory = backward(*args, routing=routing, mixing=mixing, memory_grad=memory_grad)
    if grad_memory is None:
        grad_memory = memory_logits.new_empty((0,))
    return grad_router.contiguous(), grad_memory.contiguous()


def _route_fake(inputs):
    router_logits, num_tokens = inputs.router_logits, inputs.router_logits.shape[0]
    dtype = compute_dtype(router_logits.dtype)
    weights = router_logits.new_empty((num_tokens, inputs.k), dtype=dtype)
    ids = router_logits.new_empty((num_tokens, inputs.k), dtype=torch.int32)
    return weights, ids, router_logits.new_empty((num_tokens,), dtype=dtype)


def _route_backward_fake(inputs):
    grad_router = inputs.router_logits.new_empty(inputs.router_logits.shape)
    memory_logits = inputs.memory_logits
    return grad_router, memory_logits.new_empty(memory_logits.shape if inputs.memory_grad else (0,))


def _route_save(ctx, inputs, outputs):
    # No copies: the backward recomputes the mixed logits from the inputs themselves.
    ctx.save_for_backward(
        inputs.router_logits, inputs.neighbor_ids, inputs.neighbor_sims, inputs.memory_logits, outputs[1]
    )
    ctx.mark_non_differentiable(outputs[1], outputs[2])
    ctx.routing, ctx.mixing, ctx.use_triton = inputs.routing, inputs.mixing, inputs.use_triton


def _route_grads(ctx, backward, grad_weights, _grad_ids, _grad_conf):
    memory_grad = ctx.needs_input_grad[3]
    grad_router, grad_memory = backward(
        grad_weights, *ctx.saved_tensors, ctx.routing, ctx.mixing, memory_grad, ctx.use_triton
    )
    # Ids and similarities come from a search and get no gradient; nor do the bias and options.
    return {"router_logits": grad_router, "memory_logits": grad_memory if memory_grad else None}


KNN_ROUTE = define_op(
    knn_route_forward, _route_fake, knn_route_backward, _route_backward_fake, _route_save, _route_grads
)
