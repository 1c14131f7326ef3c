"""Ahead-of-time compile cases of the expert-compute kernels: the grouped GEMMs (``ops/grouped_mm.py``)
of every GEMM ``fused_experts`` and ``grouped_mm`` run, the gated activations, the combine
(``ops/experts.py``) and the token alignment (``ops/align.py``), over
:data:`moe_kernels.shapes.EXPERT_SHAPES`."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from moe_kernels.aot.catalog import TRITON_DTYPES, KernelCase, kernel_case, pointer, register_kernel
from moe_kernels.config import Activation
from moe_kernels.ops.align import ALIGN_KERNEL_MAX_SLOTS, align_meta
from moe_kernels.ops.experts import activation_meta, combine_meta
from moe_kernels.ops.tuned_configs import grouped_mm_meta
from moe_kernels.shapes import EXPERT_SHAPES

# The activation and combine kernels only convert on load and store: bf16 stands for both 16-bit
# dtypes.
EXPERT_DTYPES = (torch.bfloat16, torch.float32)
# Row counts of the two tile regimes the GEMM heuristic distinguishes (decode-ish and prefill).
GEMM_ROWS = (256, 32768)
# The forward GEMM's epilogue constexprs: plain, or the gated activation (code, bias, h stored).
PLAIN = dict(GATED=False, ACTIVATION=int(Activation.SILU), HAS_BIAS=False, STORE_H=False)


def _expert_gemms():
    """(label, M rows, N, K, b's unit stride, gather, scale, epilogue) of every forward-kernel
    GEMM of fused_experts and grouped_mm, over the experts registry. The up projection runs
    gated (N the activation's width), without storing h (inference) and storing it (training),
    with GPT-OSS's activation and biases for its shape; the plain up GEMM is grouped_mm's own."""
    for shape in EXPERT_SHAPES:
        hidden, inter = shape.hidden, shape.intermediate
        code = Activation.parse(shape.activation)
        gated = dict(PLAIN, GATED=True, ACTIVATION=int(code), HAS_BIAS=code == Activation.GPT_OSS)
        for rows in GEMM_ROWS:
            yield "up", rows, 2 * inter, hidden, "stride_bk", True, False, PLAIN
            yield "up_act", rows, inter, hidden, "stride_bk", True, False, gated
            yield "up_act_h", rows, inter, hidden, "stride_bk", True, False, dict(gated, STORE_H=True)
            yield "down", rows, hidden, inter, "stride_bk", False, True, PLAIN
            yield "d_act", rows, inter, hidden, "stride_bn", True, False, PLAIN
            yield "d_rows", rows, hidden, 2 * inter, "stride_bn", False, False, PLAIN


def _gemm_case(kernel_name, fn, pointers, meta, unit_strides, gather, scale, dims, label) -> KernelCase:
    """A case with the strides the JIT sees as 1 specialised to constexpr 1 (as it compiles
    them), the other strides and sizes marked divisible by 16 when they are."""
    meta = dict(meta, GATHER_A=gather, SCALE_ROWS=scale, **dict.fromkeys(unit_strides, 1))
    divisible = tuple(name for name, value in dims.items() if name not in unit_strides and value % 16 == 0)
    return kernel_case(kernel_name, fn, pointers, meta, label, divisible)


@register_kernel("grouped_mm")
def _grouped_mm_cases() -> Iterator[KernelCase]:
    from moe_kernels.kernels._grouped_mm import _grouped_mm_kernel

    for dtype in EXPERT_DTYPES:
        ptr = pointer(dtype)
        pointers = {"a_ptr": ptr, "b_ptr": ptr, "c_ptr": ptr, "group_end_ptr": "*i32", "a_rows_ptr": "*i32"}
        pointers.update(row_scale_ptr="*fp32", h_ptr=ptr, bias_ptr=ptr)
        if dtype == torch.bfloat16:
            gemms = list(_expert_gemms())
        else:
            gemms = [
                ("up", 32768, 1536, 2048, "stride_bk", True, False, PLAIN),
                ("up_act", 32768, 768, 2048, "stride_bk", True, False, dict(PLAIN, GATED=True)),
            ]
        for name, rows, n_cols, k_dim, b_unit, gather, scale, epilogue in gemms:
            meta = dict(grouped_mm_meta(rows, n_cols, k_dim, dtype, gated=epilogue["GATED"]), **epilogue)
            label = (
                f"{TRITON_DTYPES[dtype]} {name} {meta['BLOCK_M']}x{meta['BLOCK_N']}x{meta['BLOCK_K']}"
                f"{' gather' if gather else ''}{' scale' if scale else ''}"
                f"{' ' + Activation(epilogue['ACTIVATION']).label if epilogue['GATED'] else ''}"
                f"{' bias' if epilogue['HAS_BIAS'] else ''}"
            )
            b_cols = n_cols * (2 if epilogue["GATED"] else 1)
            dims = dict(N=n_cols, K=k_dim, stride_am=k_dim, stride_cm=n_cols, stride_bg=b_cols * k_dim)
            dims.update(stride_bk=b_cols, stride_bn=k_dim)
            unit = ("stride_ak", "stride_cn", b_unit)
            yield _gemm_case("grouped_mm", _grouped_mm_kernel, pointers, meta, unit, gather, scale, dims, label)


@register_kernel("grouped_mm_weight_grad")
def _grouped_mm_weight_grad_cases() -> Iterator[KernelCase]:
    from moe_kernels.kernels._grouped_mm import _grouped_mm_weight_grad_kernel

    pointers = {"a_ptr": "*bf16", "dc_ptr": "*bf16", "db_ptr": "*bf16", "group_end_ptr": "*i32"}
    pointers.update(a_rows_ptr="*i32", row_scale_ptr="*fp32")
    for shape in EXPERT_SHAPES:
        hidden, inter = shape.hidden, shape.intermediate
        # grad of down_proj (gathered grad_out, scaled) and of gate_up_proj (gathered hidden).
        for name, k_dim, n_cols, scale in (("d_down", hidden, inter, True), ("d_gate_up", hidden, 2 * inter, False)):
            meta = grouped_mm_meta(32768, n_cols, k_dim, torch.bfloat16, weight_grad=True)
            label = (
                f"bf16 {name} {meta['BLOCK_K_OUT']}x{meta['BLOCK_N']} rows{meta['BLOCK_M']} "
                f"gather{' scale' if scale else ''}"
            )
            dims = dict(N=n_cols, K=k_dim, stride_am=k_dim, stride_dm=n_cols, stride_bg=n_cols * k_dim)
            dims["stride_bk"] = n_cols
            unit = ("stride_ak", "stride_dn", "stride_bn")
            fn = _grouped_mm_weight_grad_kernel
            yield _gemm_case("grouped_mm_weight_grad", fn, pointers, meta, unit, True, scale, dims, label)


def _activation_cases(kernel_name: str, backward: bool) -> Iterator[KernelCase]:
    from moe_kernels.kernels import _experts

    fn = _experts._gated_act_bwd_kernel if backward else _experts._gated_act_fwd_kernel
    for inter in sorted({shape.intermediate for shape in EXPERT_SHAPES}):
        for dtype in EXPERT_DTYPES:
            if backward:
                pointers = {"grad_act_ptr": pointer(dtype), "h_ptr": pointer(dtype), "row_weight_ptr": "*fp32"}
                pointers.update(grad_h_ptr=pointer(dtype), grad_weight_ptr="*fp32")
            else:
                pointers = {"h_ptr": pointer(dtype), "act_ptr": pointer(dtype)}
            for activation in Activation:
                meta = activation_meta(inter, activation, backward)
                label = f"{TRITON_DTYPES[dtype]} {activation.label} BR{meta['BLOCK_R']} BI{meta['BLOCK_I']}"
                divisible = ("I", "stride_h") if inter % 16 == 0 else ()
                yield kernel_case(kernel_name, fn, pointers, meta, label, divisible)


@register_kernel("gated_act_fwd")
def _gated_act_fwd_cases() -> Iterator[KernelCase]:
    yield from _activation_cases("gated_act_fwd", backward=False)


@register_kernel("gated_act_bwd")
def _gated_act_bwd_cases() -> Iterator[KernelCase]:
    yield from _activation_cases("gated_act_bwd", backward=True)


@register_kernel("combine")
def _combine_cases() -> Iterator[KernelCase]:
    from moe_kernels.kernels._experts import _combine_kernel

    for shape in EXPERT_SHAPES:
        for dtype in EXPERT_DTYPES:
            meta = combine_meta(shape.hidden, shape.k)
            pointers = {"rows_ptr": pointer(dtype), "position_ptr": "*i32", "out_ptr": pointer(dtype)}
            label = f"{TRITON_DTYPES[dtype]} k{meta['K']} BT{meta['BLOCK_T']} BH{meta['BLOCK_H']}"
            divisible = ("H",) if shape.hidden % 16 == 0 else ()
            yield kernel_case("combine", _combine_kernel, pointers, meta, label, divisible)


@register_kernel("moe_align")
def _moe_align_cases() -> Iterator[KernelCase]:
    from moe_kernels.kernels._experts import _moe_align_kernel

    outputs = {"order_ptr": "*i64", "tokens_ptr": "*i32", "experts_ptr": "*i32", "positions_ptr": "*i32"}
    outputs.update(row_weight_ptr="*fp32", counts_ptr="*i32", offsets_ptr="*i32", valid_ptr="*i32")
    for num_experts in sorted({shape.num_experts for shape in EXPERT_SHAPES}):
        for num_slots in (8, 64, 512, ALIGN_KERNEL_MAX_SLOTS):
            for ids_type in ("*i32", "*i64"):
                meta = dict(align_meta(num_slots, num_experts), K=8)
                pointers = {"ids_ptr": ids_type, "weights_ptr": "*fp32", **outputs}
                label = f"{ids_type[1:]} E{num_experts} BR{meta['BLOCK_R']} bins{meta['NUM_BINS']}"
                yield kernel_case("moe_align", _moe_align_kernel, pointers, meta, label)
