"""Launchers and ``torch.library`` registration of the grouped GEMM op.

========================  ======================================================================
``grouped_mm``            ``a (M, K)``, ``b (G, K, N)``, ``offsets (G,)`` int32 -> ``(M, N)`` in
                          ``a.dtype`` (``torch._grouped_mm``'s convention)
``grouped_mm_backward``   ``grad_out (M, N)``, ``a``, ``b``, ``offsets`` -> ``grad_a (M, K)``,
                          ``grad_b (G, K, N)``
========================  ======================================================================

The forward kernel also computes ``grad_a = grad_out @ b[g]^T`` (``b.transpose(1, 2)`` is passed
as a strided view, no copy); ``grad_b`` has its own kernel. Both kernels take a row gather of ``a``
and a per-row scale (``a_rows`` / ``row_scale`` of the launchers) for the fused experts op.

As for every op, ``use_triton`` picks the Triton kernels or the PyTorch reference
(:func:`moe_kernels.reference.experts.grouped_mm` / ``grouped_mm_backward``), and eager calls use
:class:`GroupedMMFunction` (same forward and backward) to skip the dispatcher.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from pathlib import Path

import torch

from moe_kernels.reference import experts as reference
from moe_kernels.utils import cdiv, new_output, next_power_of_2, unit_stride_last

# Constexprs (and launch options) a pinned configuration may set, per kernel.
_FORWARD_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "BLOCK_G", "num_warps", "num_stages")
_WEIGHT_GRAD_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K_OUT", "num_warps", "num_stages")

# When set (tests: :func:`pinned_config`), these values replace the heuristic's in every launch.
_PINNED_CONFIG: dict | None = None

# Tuned configurations, one JSON file per GPU model (``benchmarks/tune_grouped_mm.py`` writes
# them): ``{"<kernel>|<dtype>|N|K": [[max_rows, {meta}], ...]}`` with ``kernel`` ``forward`` or
# ``weight_grad`` and the entries in increasing ``max_rows``; a launch with M rows takes the first
# entry with ``M <= max_rows`` (the last one beyond). Shapes without an entry use the heuristic.
TUNED_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "grouped_mm"


def device_slug(name: str) -> str:
    """File-name form of a GPU model name (``"NVIDIA H100 80GB HBM3"`` -> ``nvidia-h100-80gb-hbm3``)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# The kernels a tuned configuration is for: the forward, the forward with the gated activation in
# its epilogue (``N`` the activation's width), the weight gradient.
TUNED_KERNELS = ("forward", "gated", "weight_grad")


def tuned_key(kernel: str, dtype: torch.dtype, n_cols: int, k_dim: int) -> str:
    """The key of a tuned configuration: ``kernel`` one of :data:`TUNED_KERNELS`."""
    if kernel not in TUNED_KERNELS:
        raise ValueError(f"tuned_key: kernel must be one of {TUNED_KERNELS}, got {kernel!r}")
    return f"{kernel}|{str(dtype).removeprefix('torch.')}|{n_cols}|{k_dim}"


@functools.lru_cache(maxsize=None)
def tuned_table(device_name: str | None) -> dict:
    """The tuned configurations of a GPU model ({} when none were tuned for it)."""
    if device_name is None:
        return {}
    path = TUNED_CONFIG_DIR / f"{device_slug(device_name)}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


@functools.lru_cache(maxsize=None)
def _cuda_device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_name_of(device: torch.device) -> str | None:
    """GPU model name of a CUDA ``device`` (cached: no query per launch), None elsewhere."""
    if device.type != "cuda":
        return None
    return _cuda_device_name(device.index if device.index is not None else torch.cuda.current_device())


def _tuned_meta(device_name, kernel, dtype, rows, n_cols, k_dim) -> dict:
    entries = tuned_table(device_name).get(tuned_key(kernel, dtype, n_cols, k_dim))
    if not entries:
        return {}
    return next((meta for max_rows, meta in entries if rows <= max_rows), entries[-1][1])


@contextlib.contextmanager
def pinned_config(**meta):
    """Within the block, every launch uses ``meta`` over the heuristic configuration.

    Keys: ``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K`` (forward), ``BLOCK_K_OUT`` (weight gradient's
    output tile along K; defaults to the pinned ``BLOCK_K``), ``GROUP_M``, ``BLOCK_G`` (group ends
    scanned per step), ``num_warps``, ``num_stages``. Block sizes are powers of two, at least 16
    for the ``tl.dot`` dims (``BLOCK_G`` and ``GROUP_M`` at least 1). Nests (inner keys win).
    """
    global _PINNED_CONFIG
    allowed = set(_FORWARD_KEYS) | set(_WEIGHT_GRAD_KEYS)
    unknown = sorted(set(meta) - allowed)
    if unknown:
        raise ValueError(f"pinned_config: unknown keys {unknown}; expected some of {sorted(allowed)}")
    for key, value in meta.items():
        if key in ("num_warps", "num_stages", "GROUP_M"):
            continue
        low = 1 if key == "BLOCK_G" else 16
        if not isinstance(value, int) or value < low or value & (value - 1):
            raise ValueError(f"pinned_config: {key} must be a power of two >= {low}, got {value!r}")
    previous = _PINNED_CONFIG
    _PINNED_CONFIG = {**(previous or {}), **meta}
    try:
        yield
    finally:
        _PINNED_CONFIG = previous


def _clamp_block(size: int, largest: int) -> int:
    """A power-of-two tile width in ``[16, largest]`` covering ``size`` when it is small."""
    return max(16, min(largest, next_power_of_2(size)))


def grouped_mm_meta(
    M: int,
    N: int,
    K: int,
    dtype: torch.dtype,
    *,
    weight_grad: bool = False,
    gated: bool = False,
    device_name: str | None = None,
) -> dict:
    """Constexprs, ``num_warps`` and ``num_stages`` of the forward kernel (or, with
    ``weight_grad``, of the weight-gradient kernel), shared with the AOT compile registry.

    ``M`` is the number of (sorted) rows, ``K`` / ``N`` the dims of each ``b[g]``. 16-bit inputs
    use 64-deep K steps (tensor cores; ``BLOCK_M >= 64`` and 4 or 8 warps let sm_90 use wgmma),
    128-row tiles once there are many rows; float32 computes exactly (``ieee``, CUDA cores) on
    smaller tiles. Small N / K shrink the tiles down to 16. ``gated`` (the up projection with the
    activation in its epilogue, ``N`` the activation's width) keeps two accumulators, so its
    column tile is half as wide: the same ``2 * BLOCK_N`` columns of ``h`` per program. A tuned
    configuration of ``device_name`` for this (kernel, dtype, N, K) (:data:`TUNED_CONFIG_DIR`)
    replaces the heuristic's values; a pinned one (:func:`pinned_config`) replaces both.
    """
    wide = dtype != torch.float32
    precision = "tf32" if wide else "ieee"  # ignored for 16-bit inputs
    if weight_grad:
        block_k_out = _clamp_block(K, 128 if wide else 64)
        block_n = _clamp_block(N, 128 if wide else 64)
        meta = dict(
            BLOCK_M=64 if wide else 32,
            BLOCK_N=block_n,
            BLOCK_K_OUT=block_k_out,
            INPUT_PRECISION=precision,
            num_warps=8 if block_k_out * block_n >= 128 * 128 else 4,
            num_stages=3,
        )
        keys = _WEIGHT_GRAD_KEYS
    else:
        block_m = 128 if wide and M >= 4096 else 64
        block_n = _clamp_block(N, (128 if wide else 64) // (2 if gated else 1))
        meta = dict(
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            # Gated: two dots per K step and a heavier epilogue (GPT-OSS's, with h stored, spills
            # on sm_80 at 64-deep steps), so its steps are 32 deep.
            BLOCK_K=_clamp_block(K, 64 if wide and not gated else 32),
            GROUP_M=8,
            BLOCK_G=128,
            INPUT_PRECISION=precision,
            num_warps=8 if block_m * block_n * (2 if gated else 1) >= 128 * 128 else 4,
            num_stages=3,
        )
        keys = _FORWARD_KEYS
    kernel = "weight_grad" if weight_grad else "gated" if gated else "forward"
    meta.update({key: value for key, value in _tuned_meta(device_name, kernel, dtype, M, N, K).items() if key in keys})
    if _PINNED_CONFIG:
        pinned = dict(_PINNED_CONFIG)
        if weight_grad and "BLOCK_K_OUT" not in pinned and "BLOCK_K" in pinned:
            pinned["BLOCK_K_OUT"] = pinned["BLOCK_K"]
        meta.update({key: value for key, value in pinned.items() if key in keys})
    return meta


def aot_signatures(dtype: str) -> tuple[dict[str, str], dict[str, str]]:
    """Runtime-argument signatures of the forward and weight-gradient kernels for the AOT
    compile registry, ``dtype`` a Triton pointer type (``"bf16"``, ``"fp16"``, ``"fp32"``)."""
    ptr = "*" + dtype
    scalars = ("M_out", "N", "K", "G", "stride_am", "stride_ak", "stride_bg", "stride_bk", "stride_bn",
               "stride_cm", "stride_cn")
    forward = {
        "a_ptr": ptr, "b_ptr": ptr, "c_ptr": ptr, "group_end_ptr": "*i32", "a_rows_ptr": "*i32",
        "row_scale_ptr": "*fp32", "h_ptr": ptr, "bias_ptr": ptr, **{name: "i32" for name in scalars},
        "limit": "fp32", "alpha": "fp32",
    }
    scalars = ("M", "N", "K", "stride_am", "stride_ak", "stride_dm", "stride_dn", "stride_bg", "stride_bk",
               "stride_bn")
    weight_grad = {
        "a_ptr": ptr, "dc_ptr": ptr, "db_ptr": ptr, "group_end_ptr": "*i32", "a_rows_ptr": "*i32",
        "row_scale_ptr": "*fp32", **{name: "i32" for name in scalars},
    }
    return forward, weight_grad


def _check_index(name: str, tensor: torch.Tensor | None, dtype: torch.dtype, min_len: int, device):
    if tensor is None:
        return None
    if tensor.dtype != dtype or tensor.dim() != 1 or tensor.numel() < min_len or tensor.device != device:
        raise ValueError(
            f"grouped_mm launcher: {name} must be a 1-D {dtype} tensor of at least {min_len} elements on "
            f"{device}, got {tensor.dtype} shape {tuple(tensor.shape)} on {tensor.device}"
        )
    return tensor.contiguous()


def _check_offsets(offsets: torch.Tensor, num_groups: int, device) -> torch.Tensor:
    if offsets.dtype != torch.int32 or tuple(offsets.shape) != (num_groups,) or offsets.device != device:
        raise ValueError(
            f"grouped_mm launcher: offsets must be a ({num_groups},) int32 tensor on {device}, got "
            f"{offsets.dtype} shape {tuple(offsets.shape)} on {offsets.device}"
        )
    return offsets.contiguous()


def _unit_stride_inner(b: torch.Tensor) -> torch.Tensor:
    """``b (G, K, N)`` with a unit stride along K or N (a transposed view is kept as it is); a copy
    only when it has neither, so that the kernel's loads stay coalesced."""
    if b.stride(2) == 1 or b.stride(1) == 1 or b.shape[2] == 1 or b.shape[1] == 1:
        return b
    return b.contiguous()


def launch_grouped_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    offsets: torch.Tensor,
    *,
    a_rows: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    out_rows: int | None = None,
) -> torch.Tensor:
    """Run the forward kernel; returns a fresh contiguous ``(M_out, N)`` tensor in ``a.dtype``.

    ``C[r] = row_scale[r] * a[a_rows[r]] @ b[g]`` for ``r`` in group ``g`` (``a_rows`` and
    ``row_scale`` optional: identity and 1), zero for ``r >= offsets[-1]``. ``M_out`` is
    ``out_rows``, else ``len(a_rows)``, else ``a.shape[0]``. Any strides: ``a`` is copied unless
    its rows are unit-stride, ``b`` unless it is unit-stride along K or N (``b.transpose(1, 2)``
    of a contiguous tensor is used in place).
    """
    out, _ = _launch_forward(a, b, offsets, a_rows, row_scale, out_rows)
    return out


def launch_grouped_gated_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    offsets: torch.Tensor,
    activation: str,
    *,
    a_rows: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_rows: int | None = None,
    store_h: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The forward kernel with the gated activation in its epilogue: ``(act (M_out, I),
    h (M_out, 2I) or None)`` in ``a.dtype``, where ``b (G, K, 2I)`` holds the gate and up columns
    (``[gate | up]``, interleaved for ``"gpt_oss"``), ``h[r] = a[a_rows[r]] @ b[g] + bias[g]``
    (``bias (G, 2I)`` optional) and ``act = act(gate, up)`` of ``h`` in float32 (rows past
    ``offsets[-1]``: zero). ``h`` is stored only with ``store_h`` (what the backward reads)."""
    from moe_kernels.reference.experts import ACTIVATIONS

    if activation not in ACTIVATIONS:
        raise ValueError(f"grouped_mm launcher: activation must be one of {ACTIVATIONS}, got {activation!r}")
    width = b.shape[2]
    if width % 2:
        raise ValueError(f"grouped_mm launcher: a gated b needs an even number of columns, got {width}")
    if bias is not None and (tuple(bias.shape) != (b.shape[0], width) or bias.device != b.device):
        raise ValueError(
            f"grouped_mm launcher: bias must be ({b.shape[0]}, {width}) on {b.device}, got {tuple(bias.shape)} on "
            f"{bias.device}"
        )
    gated = dict(activation=ACTIVATIONS.index(activation), bias=bias, store_h=store_h)
    return _launch_forward(a, b, offsets, a_rows, None, out_rows, gated=gated)


def _launch_forward(a, b, offsets, a_rows, row_scale, out_rows, *, gated: dict | None = None):
    """Both forward launchers: ``(C, h)``, ``h`` None unless a gated launch stores it."""
    from moe_kernels.kernels._grouped_mm import _grouped_mm_kernel
    from moe_kernels.reference.experts import GPT_OSS_ALPHA, GPT_OSS_LIMIT

    num_groups, k_dim, b_cols = b.shape
    if a.dim() != 2 or a.shape[1] != k_dim or a.dtype != b.dtype or a.device != b.device:
        raise ValueError(
            f"grouped_mm launcher: a must be (M, {k_dim}) {b.dtype} on {b.device}, got {a.dtype} shape "
            f"{tuple(a.shape)} on {a.device}"
        )
    n_cols = b_cols // 2 if gated else b_cols
    device = a.device
    a = unit_stride_last(a)
    b = _unit_stride_inner(b)
    if out_rows is None:
        out_rows = a_rows.shape[0] if a_rows is not None else a.shape[0]
    if a_rows is None and out_rows > a.shape[0]:
        raise ValueError(f"grouped_mm launcher: out_rows={out_rows} > a.shape[0]={a.shape[0]} without a_rows")
    a_rows = _check_index("a_rows", a_rows, torch.int32, out_rows, device)
    row_scale = _check_index("row_scale", row_scale, torch.float32, out_rows, device)
    offsets = _check_offsets(offsets, num_groups, device)
    out = new_output((out_rows, n_cols), a.dtype, device)
    store_h = bool(gated and gated["store_h"])
    h = new_output((out_rows, b_cols), a.dtype, device) if store_h else None
    bias = gated["bias"].contiguous() if gated and gated["bias"] is not None else None
    if out_rows == 0 or n_cols == 0:
        return out, h
    if num_groups == 0 or a.shape[0] == 0 or (k_dim == 0 and not gated):
        # No product: zeros. (Gated with K = 0 still runs: its epilogue adds the bias.)
        return out.zero_(), (h.zero_() if h is not None else None)
    meta = grouped_mm_meta(out_rows, n_cols, k_dim, a.dtype, gated=gated is not None, device_name=device_name_of(device))
    grid = ((cdiv(out_rows, meta["BLOCK_M"]) + num_groups) * cdiv(n_cols, meta["BLOCK_N"]),)
    _grouped_mm_kernel[grid](
        a,
        b,
        out,
        offsets,
        a_rows if a_rows is not None else offsets,  # never read without GATHER_A
        row_scale if row_scale is not None else out,  # never read without SCALE_ROWS
        h if h is not None else out,  # never written without STORE_H
        bias if bias is not None else out,  # never read without HAS_BIAS
        out_rows,
        n_cols,
        k_dim,
        num_groups,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        b.stride(2),
        out.stride(0),
        out.stride(1),
        GPT_OSS_LIMIT,
        GPT_OSS_ALPHA,
        GATHER_A=a_rows is not None,
        SCALE_ROWS=row_scale is not None,
        GATED=gated is not None,
        ACTIVATION=gated["activation"] if gated else 0,
        HAS_BIAS=bias is not None,
        STORE_H=store_h,
        **meta,
    )
    return out, h


def launch_grouped_mm_weight_grad(
    a: torch.Tensor,
    grad_out: torch.Tensor,
    offsets: torch.Tensor,
    num_groups: int,
    *,
    a_rows: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the weight-gradient kernel; returns a fresh contiguous ``(G, K, N)`` tensor in
    ``a.dtype``: ``grad_b[g] = sum_r a[a_rows[r]]^T (row_scale[r] * grad_out[r])`` over the rows
    ``r`` of group ``g`` (zero for empty groups). ``grad_out (M, N)``; any strides (``a`` and
    ``grad_out`` are copied unless their rows are unit-stride). The scaled
    rows are rounded to ``grad_out``'s dtype before the product (as an unfused ``grad_out *
    row_scale`` in that dtype would be)."""
    from moe_kernels.kernels._grouped_mm import _grouped_mm_weight_grad_kernel

    num_rows, n_cols = grad_out.shape
    k_dim = a.shape[1]
    device = a.device
    a = unit_stride_last(a)
    grad_out = unit_stride_last(grad_out)
    if grad_out.dtype != a.dtype or grad_out.device != device:
        raise ValueError(
            f"grouped_mm launcher: grad_out must be {a.dtype} on {device}, got {grad_out.dtype} on {grad_out.device}"
        )
    if a_rows is None and a.shape[0] < num_rows:
        raise ValueError(f"grouped_mm launcher: a has {a.shape[0]} rows < grad_out's {num_rows} without a_rows")
    a_rows = _check_index("a_rows", a_rows, torch.int32, num_rows, device)
    row_scale = _check_index("row_scale", row_scale, torch.float32, num_rows, device)
    offsets = _check_offsets(offsets, num_groups, device)
    grad_b = new_output((num_groups, k_dim, n_cols), a.dtype, device)
    if grad_b.numel() == 0:
        return grad_b
    if num_rows == 0 or a.shape[0] == 0:  # no rows to reduce over: zeros
        return grad_b.zero_()
    meta = grouped_mm_meta(num_rows, n_cols, k_dim, a.dtype, weight_grad=True, device_name=device_name_of(device))
    grid = (cdiv(n_cols, meta["BLOCK_N"]), cdiv(k_dim, meta["BLOCK_K_OUT"]), num_groups)
    _grouped_mm_weight_grad_kernel[grid](
        a,
        grad_out,
        grad_b,
        offsets,
        a_rows if a_rows is not None else offsets,
        row_scale if row_scale is not None else grad_b,
        num_rows,
        n_cols,
        k_dim,
        a.stride(0),
        a.stride(1),
        grad_out.stride(0),
        grad_out.stride(1),
        grad_b.stride(0),
        grad_b.stride(1),
        grad_b.stride(2),
        GATHER_A=a_rows is not None,
        SCALE_ROWS=row_scale is not None,
        **meta,
    )
    return grad_b


def grouped_mm_forward(a, b, offsets, use_triton):
    """The forward of both entry points: the kernel, or the reference without autograd."""
    if use_triton:
        return launch_grouped_mm(a, b, offsets)
    with torch.no_grad():
        return reference.grouped_mm(a, b, offsets).contiguous()


def grouped_mm_backward(grad_out, a, b, offsets, use_triton):
    """The backward of both entry points: ``grad_a`` by the forward kernel on ``b^T`` and
    ``grad_b`` by the weight-gradient kernel, or the reference's explicit formula."""
    grad_out = grad_out.to(a.dtype)
    if use_triton:
        grad_a = launch_grouped_mm(grad_out, b.transpose(1, 2), offsets)
        grad_b = launch_grouped_mm_weight_grad(a, grad_out, offsets, b.shape[0])
        return grad_a, grad_b.to(b.dtype)
    with torch.no_grad():
        grad_a, grad_b = reference.grouped_mm_backward(grad_out, a, b, offsets)
    return grad_a.contiguous(), grad_b.contiguous()


@torch.library.custom_op("moe_kernels::grouped_mm", mutates_args=())
def grouped_mm_op(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, use_triton: bool) -> torch.Tensor:
    return grouped_mm_forward(a, b, offsets, use_triton)


@grouped_mm_op.register_fake
def _grouped_mm_fake(a, b, offsets, use_triton):
    return a.new_empty((a.shape[0], b.shape[2]))


@torch.library.custom_op("moe_kernels::grouped_mm_backward", mutates_args=())
def grouped_mm_backward_op(
    grad_out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, use_triton: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return grouped_mm_backward(grad_out, a, b, offsets, use_triton)


@grouped_mm_backward_op.register_fake
def _grouped_mm_backward_fake(grad_out, a, b, offsets, use_triton):
    return a.new_empty(a.shape), b.new_empty(b.shape)


def _save_for_backward(ctx, a, b, offsets, use_triton):
    ctx.save_for_backward(a, b, offsets)
    ctx.use_triton = use_triton


def _grads(ctx, grad_out, backward):
    a, b, offsets = ctx.saved_tensors
    grad_a, grad_b = backward(grad_out, a, b, offsets, ctx.use_triton)
    return grad_a, grad_b, None, None


def _setup_context(ctx, inputs, output):
    _save_for_backward(ctx, *inputs)


def _backward(ctx, grad_out):
    return _grads(ctx, grad_out, grouped_mm_backward_op)


grouped_mm_op.register_autograd(_backward, setup_context=_setup_context)


class GroupedMMFunction(torch.autograd.Function):
    """Eager-mode entry point with the same forward and backward as ``moe_kernels::grouped_mm``,
    without the dispatcher's per-call cost (see ``SoftmaxTopkFunction``)."""

    @staticmethod
    def forward(ctx, a, b, offsets, use_triton):
        out = grouped_mm_forward(a, b, offsets, use_triton)
        _save_for_backward(ctx, a, b, offsets, use_triton)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return _grads(ctx, grad_out, grouped_mm_backward)
