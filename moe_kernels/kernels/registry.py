"""Every ``@triton.jit`` kernel of the package with the configurations its launchers can choose.

The ahead-of-time compile check (:mod:`moe_kernels.aot`, ``tests/test_aot_compile.py``) compiles
each :class:`KernelCase` for real GPU targets (no GPU needed) and reports registers, spills and
shared memory. A new kernel is registered with a case generator::

    @register_kernel("my_kernel")
    def _my_kernel_cases():
        from moe_kernels.kernels._mine import _my_kernel
        for ... in ...:  # every configuration the launcher can pick over moe_kernels.shapes
            meta = my_meta(...)  # the launcher's own pure meta function, never re-derived
            num_warps = meta.pop("num_warps")
            yield KernelCase("my_kernel", _my_kernel, signature, meta, num_warps)

The test fails if a ``*_kernel`` defined in a ``moe_kernels.kernels._*`` module is not registered.

A case's ``signature`` holds the runtime arguments only (name -> Triton type: ``"*fp32"``,
``"*bf16"``, ``"i32"``, ``"fp32"``, ...): types as the launcher passes them, runtime values not
specialised (one case covers every size, stride and scale); ``constexprs`` holds the
``tl.constexpr`` arguments by name, taken from the launcher's meta function, with ``num_warps``
split out.

Generating cases imports the kernels, so it needs Triton; ``moe_kernels`` never imports this
module (the package stays importable without Triton).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch

from moe_kernels.shapes import ROUTING_SHAPES, ROUTING_TOKENS

# Triton pointer element type of each logits dtype the Triton path accepts.
TRITON_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
}


@dataclass(frozen=True, eq=False)
class KernelCase:
    """One compilation of one kernel: ``fn`` specialised on ``signature`` and ``constexprs``.

    Identity (for deduplication) is :meth:`key`; ``label`` is only a short description of the
    configuration for reports, derived from the configuration itself (not from the model shape
    that chose it, since one case usually serves several shapes and token counts).
    """

    kernel_name: str
    fn: Any  # triton.runtime.jit.JITFunction
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    label: str = ""
    # Integer arguments that are multiples of 16 for this configuration, which the JIT
    # specialises on (pointers always are): they decide whether loads can be vectorised.
    divisible: tuple[str, ...] = ()

    def key(self) -> tuple:
        """Identity of the compiled binary: two cases with equal keys compile identically."""
        return (
            fn_path(self.fn),
            tuple(sorted(self.signature.items())),
            tuple(sorted((k, repr(v)) for k, v in self.constexprs.items())),
            self.num_warps,
            tuple(sorted(self.divisible)),
        )


CaseGenerator = Callable[[], Iterable[KernelCase]]

# kernel name -> generator of its cases. Extended by :func:`register_kernel`.
KERNELS: dict[str, CaseGenerator] = {}


def register_kernel(name: str) -> Callable[[CaseGenerator], CaseGenerator]:
    """Decorator registering ``gen`` as the case generator of kernel ``name``."""

    def deco(gen: CaseGenerator) -> CaseGenerator:
        if name in KERNELS:
            raise ValueError(f"kernel {name!r} is already registered")
        KERNELS[name] = gen
        return gen

    return deco


def fn_path(fn: Any) -> str:
    """``"module:name"`` of a JIT function (picklable, importable again in a worker process)."""
    inner = getattr(fn, "fn", fn)
    return f"{inner.__module__}:{inner.__qualname__}"


def cases(name: str) -> list[KernelCase]:
    """The distinct cases of one registered kernel, in generation order."""
    return _dedupe(KERNELS[name]())


def all_cases() -> list[KernelCase]:
    """The distinct cases of every registered kernel (identical compilations listed once)."""
    out: list[KernelCase] = []
    for name in KERNELS:
        out.extend(cases(name))
    return _dedupe(out)


def _dedupe(items: Iterable[KernelCase]) -> list[KernelCase]:
    seen: dict[tuple, KernelCase] = {}
    for case in items:
        seen.setdefault(case.key(), case)
    return list(seen.values())


# --------------------------------------------------------------------------------------------
# Gate + top-k routing (moe_kernels/kernels/_routing.py, launchers in moe_kernels/ops/routing.py)
# --------------------------------------------------------------------------------------------


def _routing_label(dtype: str, meta: dict, num_warps: int) -> str:
    width = meta["BLOCK_E"] if "BLOCK_E" in meta else meta["G_PAD"] * meta["GS_PAD"]
    parts = [
        dtype,
        f"W{width}",
        f"K{meta['K']}",
        f"BT{meta['BLOCK_T']}",
        "softmax" if meta["SOFTMAX"] else "sigmoid",
    ]
    if meta["RENORMALIZE"]:
        parts.append("renorm")
    if meta.get("HAS_BIAS"):
        parts.append("bias")
    if meta.get("GROUPED"):
        score = "top2" if meta["GROUP_TOP2"] else "max"
        parts.append(f"G{meta['G_PAD']}x{meta['GS_PAD']}/{meta['TOPK_GROUPS']}{score}")
    return " ".join(parts)


def _row_stride_divisibility(num_experts: int) -> tuple[str, ...]:
    """For contiguous (T, E) logits the row stride is E: a multiple of 16 for most models."""
    return ("E", "stride_lt") if num_experts % 16 == 0 else ()


def _routing_configs() -> Iterator[tuple[Any, int, torch.dtype, bool]]:
    """(shape, num_tokens, logits dtype, renormalize) over the benchmark registry."""
    for shape in ROUTING_SHAPES:
        for num_tokens in ROUTING_TOKENS:
            for dtype in TRITON_DTYPES:
                for renormalize in (False, True):
                    yield shape, num_tokens, dtype, renormalize


@register_kernel("softmax_topk_fwd")
def _softmax_topk_fwd_cases() -> Iterator[KernelCase]:
    from moe_kernels.kernels._routing import _softmax_topk_fwd_kernel
    from moe_kernels.ops.routing import forward_meta

    for shape, num_tokens, dtype, renormalize in _routing_configs():
        opts = shape.options
        num_groups = opts.get("num_groups") or 0
        meta = forward_meta(
            num_tokens,
            shape.num_experts,
            shape.k,
            renormalize=renormalize,
            score_func=opts.get("score_func", "softmax"),
            has_bias=shape.has_bias,
            num_groups=num_groups,
            topk_groups=opts.get("topk_groups") or 0,
            group_score=opts.get("group_score", "top2_sum"),
        )
        num_warps = meta.pop("num_warps")
        logits = "*" + TRITON_DTYPES[dtype]
        signature = {
            "logits_ptr": logits,
            # Without a bias the launcher passes the logits as the (never read) bias pointer.
            "bias_ptr": "*fp32" if shape.has_bias else logits,
            "weights_ptr": "*fp32",
            "ids_ptr": "*i32",
            "T": "i32",
            "E": "i32",
            "group_size": "i32",
            "stride_lt": "i32",
            "scale": "fp32",
        }
        yield KernelCase(
            "softmax_topk_fwd",
            _softmax_topk_fwd_kernel,
            signature,
            meta,
            num_warps,
            label=_routing_label(TRITON_DTYPES[dtype], meta, num_warps),
            divisible=_row_stride_divisibility(shape.num_experts),
        )


@register_kernel("softmax_topk_bwd")
def _softmax_topk_bwd_cases() -> Iterator[KernelCase]:
    from moe_kernels.kernels._routing import _softmax_topk_bwd_kernel
    from moe_kernels.ops.routing import backward_meta

    for shape, num_tokens, dtype, renormalize in _routing_configs():
        meta = backward_meta(
            num_tokens,
            shape.num_experts,
            shape.k,
            renormalize=renormalize,
            score_func=shape.options.get("score_func", "softmax"),
        )
        num_warps = meta.pop("num_warps")
        logits = "*" + TRITON_DTYPES[dtype]
        signature = {
            "grad_weights_ptr": "*fp32",
            "logits_ptr": logits,
            "ids_ptr": "*i32",
            "grad_logits_ptr": logits,
            "T": "i32",
            "E": "i32",
            "stride_gt": "i32",
            "stride_gk": "i32",
            "stride_lt": "i32",
            "scale": "fp32",
        }
        yield KernelCase(
            "softmax_topk_bwd",
            _softmax_topk_bwd_kernel,
            signature,
            meta,
            num_warps,
            label=_routing_label(TRITON_DTYPES[dtype], meta, num_warps),
            divisible=_row_stride_divisibility(shape.num_experts),
        )


# --------------------------------------------------------------------------------------------
# kNN-MoE logit mixing (moe_kernels/kernels/_knn.py, launchers in moe_kernels/ops/knn.py)
# --------------------------------------------------------------------------------------------

# Neighbours per token the benchmarks use (kNN-MoE's default 8, and a wide 32).
KNN_NEIGHBORS = (8, 32)


def _knn_configs() -> Iterator[tuple[int, int, torch.dtype, str]]:
    """(E, n, logits dtype, weighting) over the routing shapes' expert counts."""
    for num_experts in sorted({shape.num_experts for shape in ROUTING_SHAPES}):
        for num_neighbors in KNN_NEIGHBORS:
            for dtype in TRITON_DTYPES:
                for weighting in ("similarity", "softmax"):
                    yield num_experts, num_neighbors, dtype, weighting


def _knn_label(dtype: str, meta: dict, num_warps: int) -> str:
    weighting = "sim" if meta["SIMILARITY"] else "softmax"
    return f"{dtype} W{meta['BLOCK_E']} n{meta['N']} BT{meta['BLOCK_T']} {weighting}"


@register_kernel("knn_mix_fwd")
def _knn_mix_fwd_cases() -> Iterator[KernelCase]:
    from moe_kernels.kernels._knn import _knn_mix_fwd_kernel
    from moe_kernels.ops.knn import knn_meta

    for num_experts, num_neighbors, dtype, weighting in _knn_configs():
        meta = knn_meta(num_experts, num_neighbors, weighting=weighting)
        num_warps = meta.pop("num_warps")
        logits = "*" + TRITON_DTYPES[dtype]
        signature = {
            "router_ptr": logits, "neighbors_ptr": logits, "sims_ptr": "*fp32", "mixed_ptr": "*fp32",
            "conf_ptr": "*fp32", "T": "i32", "E": "i32", "stride_rt": "i32", "stride_nt": "i32",
            "stride_nn": "i32", "stride_st": "i32", "stride_sn": "i32", "inv_temperature": "fp32",
            "min_confidence": "fp32",
        }
        yield KernelCase(
            "knn_mix_fwd", _knn_mix_fwd_kernel, signature, meta, num_warps,
            label=_knn_label(TRITON_DTYPES[dtype], meta, num_warps),
            divisible=("E", "stride_rt", "stride_nn") if num_experts % 16 == 0 else (),
        )


@register_kernel("knn_mix_bwd")
def _knn_mix_bwd_cases() -> Iterator[KernelCase]:
    from moe_kernels.kernels._knn import _knn_mix_bwd_kernel
    from moe_kernels.ops.knn import knn_meta

    for num_experts, num_neighbors, dtype, weighting in _knn_configs():
        meta = knn_meta(num_experts, num_neighbors, weighting=weighting)
        num_warps = meta.pop("num_warps")
        logits = "*" + TRITON_DTYPES[dtype]
        signature = {
            "grad_mixed_ptr": "*fp32", "sims_ptr": "*fp32", "grad_router_ptr": logits,
            "grad_neighbors_ptr": logits, "T": "i32", "E": "i32", "stride_gt": "i32", "stride_st": "i32",
            "stride_sn": "i32", "inv_temperature": "fp32", "min_confidence": "fp32",
        }
        yield KernelCase(
            "knn_mix_bwd", _knn_mix_bwd_kernel, signature, meta, num_warps,
            label=_knn_label(TRITON_DTYPES[dtype], meta, num_warps),
            divisible=("E", "stride_gt") if num_experts % 16 == 0 else (),
        )


# --------------------------------------------------------------------------------------------
# ProbMoE exact-k / dynamic-k (moe_kernels/kernels/_probmoe.py, launchers in moe_kernels/ops/probmoe.py)
# --------------------------------------------------------------------------------------------


def _probmoe_configs() -> Iterator[tuple[int, int, int, torch.dtype, bool]]:
    """(T, E, k, logits dtype, sample) over the benchmark's (E, k), the routing registry's, and
    the largest k the issue names (32, at E = 512). The dtype only changes the logits' load and T
    only the tile height, so each (E, k) compiles at a small and a large T, with bf16 and
    float32 at the large one."""
    from moe_kernels.shapes import PROBMOE_SHAPES, PROBMOE_TOKENS

    pairs = set(PROBMOE_SHAPES) | {(shape.num_experts, shape.k) for shape in ROUTING_SHAPES} | {(512, 32)}
    small, large = min(PROBMOE_TOKENS), max(PROBMOE_TOKENS)
    for num_experts, k in sorted(pairs):
        yield small, num_experts, k, torch.float32, True
        for sample in (False, True):
            yield large, num_experts, k, torch.bfloat16, sample
        yield large, num_experts, k, torch.float32, False


def _probmoe_label(dtype: str, meta: dict, num_warps: int) -> str:
    sample = " sample" if meta.get("SAMPLE") else ""
    return f"{dtype} K{meta['K_PAD']} BT{meta['BLOCK_T']} BE{meta['BLOCK_E']} w{num_warps}{sample}"


_PROBMOE_SCALARS = {
    "T": "i32", "E": "i32", "stride_lt": "i32", "k": "i32", "k_min": "i32", "chunk": "i32",
    "num_checkpoints": "i32",
}


@register_kernel("exact_k_fwd")
def _exact_k_fwd_cases() -> Iterator[KernelCase]:
    from moe_kernels.kernels._probmoe import _exact_k_fwd_kernel
    from moe_kernels.ops.probmoe import exact_k_meta

    for num_tokens, num_experts, k, dtype, sample in _probmoe_configs():
        meta = exact_k_meta(num_tokens, num_experts, k)
        num_warps = meta.pop("num_warps")
        meta["SAMPLE"] = sample
        signature = {
            "logits_ptr": "*" + TRITON_DTYPES[dtype], "seed_ptr": "*i64", "marginals_ptr": "*fp32",
            "log_z_ptr": "*fp32", "ids_ptr": "*i32", "scratch_ptr": "*fp32", **_PROBMOE_SCALARS,
        }
        yield KernelCase(
            "exact_k_fwd", _exact_k_fwd_kernel, signature, meta, num_warps,
            label=_probmoe_label(TRITON_DTYPES[dtype], meta, num_warps),
        )


@register_kernel("exact_k_bwd")
def _exact_k_bwd_cases() -> Iterator[KernelCase]:
    from moe_kernels.kernels._probmoe import _exact_k_bwd_kernel
    from moe_kernels.ops.probmoe import exact_k_meta

    for num_tokens, num_experts, k, dtype, sample in _probmoe_configs():
        if sample:  # the backward has no sampling variant
            continue
        meta = exact_k_meta(num_tokens, num_experts, k, backward=True)
        num_warps = meta.pop("num_warps")
        logits = "*" + TRITON_DTYPES[dtype]
        signature = {
            "logits_ptr": logits, "grad_m_ptr": "*fp32", "grad_log_z_ptr": "*fp32", "grad_ptr": logits,
            "scratch_ptr": "*fp32", **_PROBMOE_SCALARS,
        }
        yield KernelCase(
            "exact_k_bwd", _exact_k_bwd_kernel, signature, meta, num_warps,
            label=_probmoe_label(TRITON_DTYPES[dtype], meta, num_warps),
        )


# --------------------------------------------------------------------------------------------
# Fused experts around the grouped GEMMs (moe_kernels/kernels/_experts.py, ops/experts.py)
# --------------------------------------------------------------------------------------------

# The activation kernels only convert on load and store: bf16 stands for both 16-bit dtypes.
_EXPERT_DTYPES = (torch.bfloat16, torch.float32)


def _expert_activation_cases(kernel_name: str, backward: bool) -> Iterator[KernelCase]:
    from moe_kernels.kernels import _experts
    from moe_kernels.ops.experts import _elementwise_meta
    from moe_kernels.reference.experts import ACTIVATIONS
    from moe_kernels.shapes import EXPERT_SHAPES

    fn = _experts._gated_act_bwd_kernel if backward else _experts._gated_act_fwd_kernel
    for inter in sorted({shape.intermediate for shape in EXPERT_SHAPES}):
        for dtype in _EXPERT_DTYPES:
            for code, activation in enumerate(ACTIVATIONS):
                meta = _elementwise_meta(inter)
                if backward:
                    meta["BLOCK_R"] = max(1, meta["BLOCK_R"] // 2)
                num_warps = meta.pop("num_warps")
                meta["ACTIVATION"] = code
                ptr = "*" + TRITON_DTYPES[dtype]
                if backward:
                    signature = {"grad_act_ptr": ptr, "h_ptr": ptr, "row_weight_ptr": "*fp32", "grad_h_ptr": ptr,
                                 "grad_weight_ptr": "*fp32"}
                else:
                    signature = {"h_ptr": ptr, "act_ptr": ptr}
                signature.update({"R": "i32", "I": "i32", "stride_h": "i32", "limit": "fp32", "alpha": "fp32"})
                yield KernelCase(
                    kernel_name, fn, signature, meta, num_warps,
                    label=f"{TRITON_DTYPES[dtype]} {activation} BR{meta['BLOCK_R']} BI{meta['BLOCK_I']}",
                    divisible=("I", "stride_h") if inter % 16 == 0 else (),
                )


@register_kernel("gated_act_fwd")
def _gated_act_fwd_cases() -> Iterator[KernelCase]:
    yield from _expert_activation_cases("gated_act_fwd", backward=False)


@register_kernel("gated_act_bwd")
def _gated_act_bwd_cases() -> Iterator[KernelCase]:
    yield from _expert_activation_cases("gated_act_bwd", backward=True)


@register_kernel("combine")
def _combine_cases() -> Iterator[KernelCase]:
    from moe_kernels.kernels._experts import _combine_kernel
    from moe_kernels.ops.experts import combine_meta
    from moe_kernels.shapes import EXPERT_SHAPES

    for shape in EXPERT_SHAPES:
        for dtype in _EXPERT_DTYPES:
            meta = combine_meta(shape.hidden, shape.k)
            num_warps = meta.pop("num_warps")
            ptr = "*" + TRITON_DTYPES[dtype]
            signature = {"rows_ptr": ptr, "position_ptr": "*i32", "out_ptr": ptr, "T": "i32", "H": "i32"}
            yield KernelCase(
                "combine", _combine_kernel, signature, meta, num_warps,
                label=f"{TRITON_DTYPES[dtype]} k{meta['K']} BT{meta['BLOCK_T']} BH{meta['BLOCK_H']}",
                divisible=("H",) if shape.hidden % 16 == 0 else (),
            )


@register_kernel("moe_align")
def _moe_align_cases() -> Iterator[KernelCase]:
    from moe_kernels.kernels._experts import _moe_align_kernel
    from moe_kernels.ops.experts import ALIGN_KERNEL_MAX_SLOTS, align_meta
    from moe_kernels.shapes import EXPERT_SHAPES

    experts = sorted({shape.num_experts for shape in EXPERT_SHAPES})
    for num_experts in experts:
        for num_slots in (8, 64, 512, ALIGN_KERNEL_MAX_SLOTS):
            for ids_type in ("*i32", "*i64"):
                meta = align_meta(num_slots, num_experts)
                num_warps = meta.pop("num_warps")
                signature = {
                    "ids_ptr": ids_type, "weights_ptr": "*fp32", "order_ptr": "*i64", "tokens_ptr": "*i32",
                    "experts_ptr": "*i32", "positions_ptr": "*i32", "row_weight_ptr": "*fp32", "counts_ptr": "*i32",
                    "offsets_ptr": "*i32", "valid_ptr": "*i32", "R": "i32", "E": "i32",
                }
                yield KernelCase(
                    "moe_align", _moe_align_kernel, signature, dict(K=8, **meta), num_warps,
                    label=f"{ids_type[1:]} E{num_experts} BR{meta['BLOCK_R']} bins{meta['NUM_BINS']}",
                )


# --------------------------------------------------------------------------------------------
# Grouped GEMM (moe_kernels/kernels/_grouped_mm.py, launchers in moe_kernels/ops/grouped_mm.py)
# --------------------------------------------------------------------------------------------

# Row counts of the two tile regimes the heuristic distinguishes (decode-ish and prefill).
_GEMM_ROWS = (256, 32768)


# The forward kernel's epilogue constexprs: plain, or the gated activation (code, bias, h stored).
_PLAIN = dict(GATED=False, ACTIVATION=0, HAS_BIAS=False, STORE_H=False)


def _gemm_case(kernel_name, fn, signature, meta, unit_strides, gather, scale, dims, label, epilogue=None):
    """A case with the strides the JIT sees as 1 specialised to constexpr 1 (as it compiles
    them), the other strides and sizes marked divisible by 16 when they are. ``epilogue``: the
    forward kernel's epilogue constexprs (None for the weight-gradient kernel)."""
    meta = dict(meta)
    num_warps = meta.pop("num_warps")
    meta.update(GATHER_A=gather, SCALE_ROWS=scale, **(epilogue or {}), **{name: 1 for name in unit_strides})
    signature = {name: kind for name, kind in signature.items() if name not in unit_strides}
    divisible = tuple(name for name, value in dims.items() if name in signature and value % 16 == 0)
    return KernelCase(kernel_name, fn, signature, meta, num_warps, label=label, divisible=divisible)


def _expert_gemms():
    """(label, M rows, N, K, b's unit stride, gather, scale, epilogue) of every forward-kernel
    GEMM of fused_experts and grouped_mm, over the experts registry. The up projection runs
    gated (N the activation's width), without storing h (inference) and storing it (training),
    with GPT-OSS's activation and biases for its shape; the plain up GEMM is grouped_mm's own."""
    from moe_kernels.reference.experts import ACTIVATIONS
    from moe_kernels.shapes import EXPERT_SHAPES

    for shape in EXPERT_SHAPES:
        hidden, inter = shape.hidden, shape.intermediate
        gpt_oss = shape.activation == "gpt_oss"
        gated = dict(_PLAIN, GATED=True, ACTIVATION=ACTIVATIONS.index(shape.activation), HAS_BIAS=gpt_oss)
        for rows in _GEMM_ROWS:
            yield "up", rows, 2 * inter, hidden, "stride_bk", True, False, _PLAIN
            yield "up_act", rows, inter, hidden, "stride_bk", True, False, gated
            yield "up_act_h", rows, inter, hidden, "stride_bk", True, False, dict(gated, STORE_H=True)
            yield "down", rows, hidden, inter, "stride_bk", False, True, _PLAIN
            yield "d_act", rows, inter, hidden, "stride_bn", True, False, _PLAIN
            yield "d_rows", rows, hidden, 2 * inter, "stride_bn", False, False, _PLAIN


@register_kernel("grouped_mm")
def _grouped_mm_cases() -> Iterator[KernelCase]:
    from moe_kernels.kernels._grouped_mm import _grouped_mm_kernel
    from moe_kernels.ops.grouped_mm import aot_signatures, grouped_mm_meta

    for dtype in (torch.bfloat16, torch.float32):
        forward, _ = aot_signatures(TRITON_DTYPES[dtype])
        gemms = list(_expert_gemms()) if dtype == torch.bfloat16 else [
            ("up", 32768, 1536, 2048, "stride_bk", True, False, _PLAIN),
            ("up_act", 32768, 768, 2048, "stride_bk", True, False, dict(_PLAIN, GATED=True)),
        ]
        for name, rows, n_cols, k_dim, b_unit, gather, scale, epilogue in gemms:
            meta = grouped_mm_meta(rows, n_cols, k_dim, dtype, gated=epilogue["GATED"])
            label = (f"{TRITON_DTYPES[dtype]} {name} {meta['BLOCK_M']}x{meta['BLOCK_N']}x{meta['BLOCK_K']}"
                     f"{' gather' if gather else ''}{' scale' if scale else ''}"
                     f"{' act' + str(epilogue['ACTIVATION']) if epilogue['GATED'] else ''}"
                     f"{' bias' if epilogue['HAS_BIAS'] else ''}")
            b_cols = n_cols * (2 if epilogue["GATED"] else 1)
            dims = dict(N=n_cols, K=k_dim, stride_am=k_dim, stride_cm=n_cols, stride_bg=b_cols * k_dim,
                        stride_bk=b_cols, stride_bn=k_dim)
            yield _gemm_case("grouped_mm", _grouped_mm_kernel, forward, meta, ("stride_ak", "stride_cn", b_unit),
                             gather, scale, dims, label, epilogue)


@register_kernel("grouped_mm_weight_grad")
def _grouped_mm_weight_grad_cases() -> Iterator[KernelCase]:
    from moe_kernels.kernels._grouped_mm import _grouped_mm_weight_grad_kernel
    from moe_kernels.ops.grouped_mm import aot_signatures, grouped_mm_meta
    from moe_kernels.shapes import EXPERT_SHAPES

    _, weight_grad = aot_signatures("bf16")
    for shape in EXPERT_SHAPES:
        hidden, inter = shape.hidden, shape.intermediate
        # grad of down_proj (gathered grad_out, scaled) and of gate_up_proj (gathered hidden).
        for name, k_dim, n_cols, scale in (("d_down", hidden, inter, True), ("d_gate_up", hidden, 2 * inter, False)):
            meta = grouped_mm_meta(32768, n_cols, k_dim, torch.bfloat16, weight_grad=True)
            label = f"bf16 {name} {meta['BLOCK_K_OUT']}x{meta['BLOCK_N']} rows{meta['BLOCK_M']} gather{' scale' if scale else ''}"
            dims = dict(N=n_cols, K=k_dim, stride_am=k_dim, stride_dm=n_cols, stride_bg=n_cols * k_dim, stride_bk=n_cols)
            yield _gemm_case("grouped_mm_weight_grad", _grouped_mm_weight_grad_kernel, weight_grad, meta,
                             ("stride_ak", "stride_dn", "stride_bn"), True, scale, dims, label)


# --------------------------------------------------------------------------------------------
# Fused kNN-MoE route (moe_kernels/kernels/_knn_route.py, launchers in moe_kernels/ops/knn_route.py)
# --------------------------------------------------------------------------------------------

# The logits dtype only changes the loads: bf16 stands for both 16-bit dtypes. Neighbour ids come
# as int64 from RoutingMemory.search; int32 ids compile once per expert count (n = 8, bf16,
# similarity weighting) to cover their load.


def _knn_route_variants() -> Iterator[tuple[torch.dtype, int, str]]:
    """(dtype, n, weighting) compiled for every shape and tiling: bf16 with both n and both
    weightings; float32 (the same code but for the loads) once."""
    for num_neighbors in KNN_NEIGHBORS:
        for weighting in ("similarity", "softmax"):
            yield torch.bfloat16, num_neighbors, weighting
    yield torch.float32, KNN_NEIGHBORS[0], "similarity"


def _knn_route_id_types(dtype: torch.dtype, num_neighbors: int, weighting: str) -> tuple[str, ...]:
    if dtype == torch.bfloat16 and num_neighbors == KNN_NEIGHBORS[0] and weighting == "similarity":
        return ("i64", "i32")
    return ("i64",)


def _knn_route_divisible(num_experts: int, num_neighbors: int, row_strides: tuple[str, ...]) -> tuple[str, ...]:
    """Contiguous inputs: the logits' row strides are E, the ids' and sims' row strides n."""
    out = row_strides if num_experts % 16 == 0 else ()
    return out + (("stride_it", "stride_st") if num_neighbors % 16 == 0 else ())


_KNN_ROUTE_GATHER_SIGNATURE = {"stride_mn": "i32", "stride_it": "i32", "stride_in": "i32", "stride_st": "i32",
                               "stride_sn": "i32", "inv_temperature": "fp32", "min_confidence": "fp32"}


@register_kernel("knn_route_fwd")
def _knn_route_fwd_cases() -> Iterator[KernelCase]:
    """Over the routing registry (each model's own routing options, its token counts' tilings)
    and :func:`_knn_route_variants`."""
    from moe_kernels.kernels._knn_route import _knn_route_fwd_kernel
    from moe_kernels.ops.knn_route import knn_route_meta

    for shape in ROUTING_SHAPES:
        opts = shape.options
        for num_tokens in ROUTING_TOKENS:
            for dtype, num_neighbors, weighting in _knn_route_variants():
                meta = knn_route_meta(
                    num_tokens,
                    shape.num_experts,
                    shape.k,
                    num_neighbors,
                    renormalize=opts.get("renormalize", False),
                    score_func=opts.get("score_func", "softmax"),
                    has_bias=shape.has_bias,
                    num_groups=opts.get("num_groups") or 0,
                    topk_groups=opts.get("topk_groups") or 0,
                    group_score=opts.get("group_score", "top2_sum"),
                    weighting=weighting,
                )
                num_warps = meta.pop("num_warps")
                logits = "*" + TRITON_DTYPES[dtype]
                for id_type in _knn_route_id_types(dtype, num_neighbors, weighting):
                    signature = {
                        "router_ptr": logits, "memory_ptr": logits, "nbr_ids_ptr": "*" + id_type,
                        "sims_ptr": "*fp32",
                        # Without a bias the launcher passes the router logits as the bias pointer.
                        "bias_ptr": "*fp32" if shape.has_bias else logits,
                        "weights_ptr": "*fp32", "ids_ptr": "*i32", "conf_ptr": "*fp32", "valid_ptr": "*i32",
                        "T": "i32", "E": "i32", "M_rows": "i32", "group_size": "i32", "stride_rt": "i32",
                        **_KNN_ROUTE_GATHER_SIGNATURE, "scale": "fp32",
                    }
                    label = (f"{_routing_label(TRITON_DTYPES[dtype], meta, num_warps)} n{num_neighbors} "
                             f"{'sim' if meta['SIMILARITY'] else 'softmax'} ids-{id_type}")
                    yield KernelCase(
                        "knn_route_fwd", _knn_route_fwd_kernel, signature, meta, num_warps, label=label,
                        divisible=_knn_route_divisible(shape.num_experts, num_neighbors,
                                                       ("E", "stride_rt", "stride_mn")),
                    )


@register_kernel("knn_route_mixed")
def _knn_route_mixed_cases() -> Iterator[KernelCase]:
    from moe_kernels.kernels._knn_route import _knn_route_mixed_kernel
    from moe_kernels.ops.knn_route import knn_route_mixed_meta

    for num_experts in sorted({shape.num_experts for shape in ROUTING_SHAPES}):
        for dtype, num_neighbors, weighting in _knn_route_variants():
            meta = knn_route_mixed_meta(num_experts, num_neighbors, weighting=weighting)
            num_warps = meta.pop("num_warps")
            logits = "*" + TRITON_DTYPES[dtype]
            for id_type in _knn_route_id_types(dtype, num_neighbors, weighting):
                signature = {
                    "router_ptr": logits, "memory_ptr": logits, "nbr_ids_ptr": "*" + id_type,
                    "sims_ptr": "*fp32", "mixed_ptr": "*fp32", "conf_ptr": "*fp32", "share_ptr": "*fp32",
                    "T": "i32", "E": "i32", "M_rows": "i32", "stride_rt": "i32", **_KNN_ROUTE_GATHER_SIGNATURE,
                }
                yield KernelCase(
                    "knn_route_mixed", _knn_route_mixed_kernel, signature, meta, num_warps,
                    label=f"{_knn_label(TRITON_DTYPES[dtype], meta, num_warps)} ids-{id_type}",
                    divisible=_knn_route_divisible(num_experts, num_neighbors, ("E", "stride_rt", "stride_mn")),
                )
