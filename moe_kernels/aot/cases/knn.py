"""Ahead-of-time compile cases of the kNN-MoE kernels (``ops/knn.py``): the mixing op over the
routing registry's expert counts, and the fused route over every model's own routing and token
counts. The logits dtype only changes the loads: bf16 stands for both 16-bit
dtypes in the fused route. Neighbour ids come as int64 from ``RoutingMemory.search``; int32 ids
compile once per expert count (n = 8, bf16, similarity weighting) to cover their load."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from moe_kernels.aot.cases.routing import routing_label
from moe_kernels.aot.catalog import TRITON_DTYPES, KernelCase, kernel_case, pointer, register_kernel
from moe_kernels.config import KnnMixing
from moe_kernels.ops.knn import knn_meta, knn_route_meta, knn_route_mixed_meta
from moe_kernels.shapes import ROUTING_SHAPES, ROUTING_TOKENS

# Neighbours per token the benchmarks use (kNN-MoE's default 8, and a wide 32).
KNN_NEIGHBORS = (8, 32)
MIXINGS = (KnnMixing("similarity"), KnnMixing("softmax"))
EXPERT_COUNTS = sorted({shape.num_experts for shape in ROUTING_SHAPES})


def knn_label(dtype: str, meta: dict) -> str:
    """A short description of a kNN kernel configuration for the AOT report."""
    weighting = "sim" if meta["SIMILARITY"] else "softmax"
    return f"{dtype} W{meta['BLOCK_E']} n{meta['N']} BT{meta['BLOCK_T']} {weighting}"


@register_kernel("knn_mix_fwd")
def _knn_mix_fwd_cases() -> Iterator[KernelCase]:
    from moe_kernels.kernels._knn import _knn_mix_fwd_kernel

    for num_experts, num_neighbors, dtype, mixing in _mix_problems():
        meta = knn_meta(num_experts, num_neighbors, mixing)
        pointers = {"router_ptr": pointer(dtype), "neighbors_ptr": pointer(dtype), "sims_ptr": "*fp32"}
        pointers.update(mixed_ptr="*fp32", conf_ptr="*fp32")
        divisible = ("E", "stride_rt", "stride_nn") if num_experts % 16 == 0 else ()
        label = knn_label(TRITON_DTYPES[dtype], meta)
        yield kernel_case("knn_mix_fwd", _knn_mix_fwd_kernel, pointers, meta, label, divisible)


@register_kernel("knn_mix_bwd")
def _knn_mix_bwd_cases() -> Iterator[KernelCase]:
    from moe_kernels.kernels._knn import _knn_mix_bwd_kernel

    for num_experts, num_neighbors, dtype, mixing in _mix_problems():
        meta = knn_meta(num_experts, num_neighbors, mixing)
        pointers = {"grad_mixed_ptr": "*fp32", "sims_ptr": "*fp32", "grad_router_ptr": pointer(dtype)}
        pointers["grad_neighbors_ptr"] = pointer(dtype)
        divisible = ("E", "stride_gt") if num_experts % 16 == 0 else ()
        label = knn_label(TRITON_DTYPES[dtype], meta)
        yield kernel_case("knn_mix_bwd", _knn_mix_bwd_kernel, pointers, meta, label, divisible)


@register_kernel("knn_route_fwd")
def _knn_route_fwd_cases() -> Iterator[KernelCase]:
    """Over the routing registry (each model's own routing, its token counts' tilings) and
    :func:`_route_variants`."""
    from moe_kernels.kernels._knn import _knn_route_fwd_kernel

    outputs = {"weights_ptr": "*fp32", "ids_ptr": "*i32", "conf_ptr": "*fp32", "valid_ptr": "*i32"}
    for shape in ROUTING_SHAPES:
        for num_tokens in ROUTING_TOKENS:
            for dtype, num_neighbors, mixing in _route_variants():
                problem = (num_tokens, shape.num_experts, shape.k, num_neighbors, shape.routing, shape.has_bias)
                meta = knn_route_meta(*problem, mixing)
                # Without a bias the launcher passes the router logits as the bias pointer.
                bias = {"bias_ptr": "*fp32" if shape.has_bias else pointer(dtype)}
                prefix = f"{routing_label(TRITON_DTYPES[dtype], meta)} n{num_neighbors}"
                prefix += " sim" if meta["SIMILARITY"] else " softmax"
                divisible = _route_divisible(shape.num_experts, num_neighbors)
                for id_type in _id_types(dtype, num_neighbors, mixing):
                    pointers, label = {**_gather_pointers(dtype, id_type), **bias, **outputs}, f"{prefix} ids-{id_type}"
                    yield kernel_case("knn_route_fwd", _knn_route_fwd_kernel, pointers, meta, label, divisible)


@register_kernel("knn_route_mixed")
def _knn_route_mixed_cases() -> Iterator[KernelCase]:
    from moe_kernels.kernels._knn import _knn_route_mixed_kernel

    outputs = {"mixed_ptr": "*fp32", "conf_ptr": "*fp32", "share_ptr": "*fp32"}
    for num_experts in EXPERT_COUNTS:
        for dtype, num_neighbors, mixing in _route_variants():
            meta = knn_route_mixed_meta(num_experts, num_neighbors, mixing)
            prefix, divisible = knn_label(TRITON_DTYPES[dtype], meta), _route_divisible(num_experts, num_neighbors)
            for id_type in _id_types(dtype, num_neighbors, mixing):
                pointers, label = {**_gather_pointers(dtype, id_type), **outputs}, f"{prefix} ids-{id_type}"
                yield kernel_case("knn_route_mixed", _knn_route_mixed_kernel, pointers, meta, label, divisible)


def _mix_problems() -> Iterator[tuple[int, int, torch.dtype, KnnMixing]]:
    """(E, n, logits dtype, mixing) over the routing shapes' expert counts."""
    for num_experts in EXPERT_COUNTS:
        for num_neighbors in KNN_NEIGHBORS:
            for dtype in TRITON_DTYPES:
                for mixing in MIXINGS:
                    yield num_experts, num_neighbors, dtype, mixing


def _route_variants() -> Iterator[tuple[torch.dtype, int, KnnMixing]]:
    """(dtype, n, mixing) compiled for every shape and tiling: bf16 with both n and both
    weightings; float32 (the same code but for the loads) once."""
    for num_neighbors in KNN_NEIGHBORS:
        for mixing in MIXINGS:
            yield torch.bfloat16, num_neighbors, mixing
    yield torch.float32, KNN_NEIGHBORS[0], MIXINGS[0]


def _id_types(dtype: torch.dtype, num_neighbors: int, mixing: KnnMixing) -> tuple[str, ...]:
    if dtype == torch.bfloat16 and num_neighbors == KNN_NEIGHBORS[0] and mixing == MIXINGS[0]:
        return ("i64", "i32")
    return ("i64",)


def _route_divisible(num_experts: int, num_neighbors: int) -> tuple[str, ...]:
    """Contiguous inputs: the logits' row strides are E, the ids' and sims' row strides n."""
    out = ("E", "stride_rt", "stride_mn") if num_experts % 16 == 0 else ()
    return out + (("stride_it", "stride_st") if num_neighbors % 16 == 0 else ())


def _gather_pointers(dtype: torch.dtype, id_type: str) -> dict[str, str]:
    """The pointers both gather kernels take: router and memory logits, ids, sims."""
    return {
        "router_ptr": pointer(dtype),
        "memory_ptr": pointer(dtype),
        "nbr_ids_ptr": "*" + id_type,
        "sims_ptr": "*fp32",
    }
