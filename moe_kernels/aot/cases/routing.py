"""Ahead-of-time compile cases of the gate + top-k routing kernels (``ops/routing.py``): every
model of :data:`moe_kernels.shapes.ROUTING_SHAPES` at every token count, each logits dtype, with
the model's routing and with its renormalisation flipped."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from moe_kernels.aot.catalog import TRITON_DTYPES, KernelCase, kernel_case, pointer, register_kernel
from moe_kernels.ops.routing import backward_meta, forward_meta
from moe_kernels.shapes import ROUTING_SHAPES, ROUTING_TOKENS


def routing_label(dtype: str, meta: dict) -> str:
    """A short description of a routing kernel configuration for the AOT report (``meta``: the
    forward's, with its ``ROUTING`` constexpr, or the backward's flat one)."""
    flags = meta["ROUTING"]._asdict() if "ROUTING" in meta else meta
    width = meta["BLOCK_E"] if "BLOCK_E" in meta else flags["G_PAD"] * flags["GS_PAD"]
    parts = [dtype, f"W{width}", f"K{flags['K']}", f"BT{meta['BLOCK_T']}"]
    parts.append("softmax" if flags["SOFTMAX"] else "sigmoid")
    if flags["RENORMALIZE"]:
        parts.append("renorm")
    if flags.get("HAS_BIAS"):
        parts.append("bias")
    if flags.get("GROUPED"):
        score = "top2" if flags["GROUP_TOP2"] else "max"
        parts.append(f"G{flags['G_PAD']}x{flags['GS_PAD']}/{flags['TOPK_GROUPS']}{score}")
    return " ".join(parts)


def row_stride_divisibility(num_experts: int) -> tuple[str, ...]:
    """For contiguous (T, E) logits the row stride is E: a multiple of 16 for most models."""
    return ("E", "stride_lt") if num_experts % 16 == 0 else ()


def routing_problems() -> Iterator[tuple]:
    """``(shape, num_tokens, logits dtype, RoutingConfig)`` over the model registry, each model's
    routing with and without renormalisation."""
    for shape in ROUTING_SHAPES:
        for num_tokens in ROUTING_TOKENS:
            for dtype in TRITON_DTYPES:
                for renormalize in (False, True):
                    yield shape, num_tokens, dtype, dataclasses.replace(shape.routing, renormalize=renormalize)


@register_kernel("softmax_topk_fwd")
def _softmax_topk_fwd_cases() -> Iterator[KernelCase]:
    from moe_kernels.kernels._routing import _softmax_topk_fwd_kernel

    for shape, num_tokens, dtype, routing in routing_problems():
        meta = forward_meta(num_tokens, shape.num_experts, shape.k, routing, shape.has_bias)
        # Without a bias the launcher passes the logits as the (never read) bias pointer.
        bias = "*fp32" if shape.has_bias else pointer(dtype)
        pointers = {"logits_ptr": pointer(dtype), "bias_ptr": bias, "weights_ptr": "*fp32", "ids_ptr": "*i32"}
        label, divisible = routing_label(TRITON_DTYPES[dtype], meta), row_stride_divisibility(shape.num_experts)
        yield kernel_case("softmax_topk_fwd", _softmax_topk_fwd_kernel, pointers, meta, label, divisible)


@register_kernel("softmax_topk_bwd")
def _softmax_topk_bwd_cases() -> Iterator[KernelCase]:
    from moe_kernels.kernels._routing import _softmax_topk_bwd_kernel

    for shape, num_tokens, dtype, routing in routing_problems():
        meta = backward_meta(num_tokens, shape.num_experts, shape.k, routing)
        pointers = {"grad_weights_ptr": "*fp32", "logits_ptr": pointer(dtype), "ids_ptr": "*i32"}
        pointers["grad_logits_ptr"] = pointer(dtype)
        label, divisible = routing_label(TRITON_DTYPES[dtype], meta), row_stride_divisibility(shape.num_experts)
        yield kernel_case("softmax_topk_bwd", _softmax_topk_bwd_kernel, pointers, meta, label, divisible)
