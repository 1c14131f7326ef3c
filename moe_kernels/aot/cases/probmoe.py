"""Ahead-of-time compile cases of the ProbMoE DP kernels (``ops/probmoe.py``)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from moe_kernels.aot.catalog import TRITON_DTYPES, KernelCase, kernel_case, pointer, register_kernel
from moe_kernels.ops.probmoe import exact_k_meta
from moe_kernels.shapes import PROBMOE_SHAPES, PROBMOE_TOKENS, ROUTING_SHAPES


def _problems() -> Iterator[tuple[int, int, int, torch.dtype, bool]]:
    """(T, E, k, logits dtype, sample) over the benchmark's (E, k), the routing registry's, and
    the largest k the ops promise to handle well (32, at E = 512). The dtype only changes the
    logits' load and T only the tile height, so each (E, k) compiles at a small and a large T,
    with bf16 and float32 at the large one."""
    pairs = set(PROBMOE_SHAPES) | {(shape.num_experts, shape.k) for shape in ROUTING_SHAPES} | {(512, 32)}
    small, large = min(PROBMOE_TOKENS), max(PROBMOE_TOKENS)
    for num_experts, k in sorted(pairs):
        yield small, num_experts, k, torch.float32, True
        for sample in (False, True):
            yield large, num_experts, k, torch.bfloat16, sample
        yield large, num_experts, k, torch.float32, False


def _label(dtype: str, meta: dict) -> str:
    sample = " sample" if meta.get("SAMPLE") else ""
    return f"{dtype} K{meta['K_PAD']} BT{meta['BLOCK_T']} BE{meta['BLOCK_E']} w{meta['num_warps']}{sample}"


@register_kernel("exact_k_fwd")
def _exact_k_fwd_cases() -> Iterator[KernelCase]:
    from moe_kernels.kernels._probmoe import _exact_k_fwd_kernel

    for num_tokens, num_experts, k, dtype, sample in _problems():
        meta = dict(exact_k_meta(num_tokens, num_experts, k), SAMPLE=sample)
        pointers = {"logits_ptr": pointer(dtype), "seed_ptr": "*i64", "marginals_ptr": "*fp32", "log_z_ptr": "*fp32"}
        pointers.update(ids_ptr="*i32", scratch_ptr="*fp32")
        label = _label(TRITON_DTYPES[dtype], meta)
        yield kernel_case("exact_k_fwd", _exact_k_fwd_kernel, pointers, meta, label)


@register_kernel("exact_k_bwd")
def _exact_k_bwd_cases() -> Iterator[KernelCase]:
    from moe_kernels.kernels._probmoe import _exact_k_bwd_kernel

    for num_tokens, num_experts, k, dtype, sample in _problems():
        if sample:  # the backward has no sampling variant
            continue
        meta = exact_k_meta(num_tokens, num_experts, k, backward=True)
        pointers = {"logits_ptr": pointer(dtype), "grad_m_ptr": "*fp32", "grad_log_z_ptr": "*fp32"}
        pointers.update(grad_ptr=pointer(dtype), scratch_ptr="*fp32")
        label = _label(TRITON_DTYPES[dtype], meta)
        yield kernel_case("exact_k_bwd", _exact_k_bwd_kernel, pointers, meta, label)
