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

As for every op, ``use_triton`` picks the Triton kernels or the PyTorch path (``moe_kernels.cpu``
on the CPU, :func:`moe_kernels.reference.experts.grouped_mm` / ``grouped_mm_backward`` elsewhere);
the op is built by
:func:`moe_kernels.ops._boundary.define_op`. Tile sizes come from
:func:`moe_kernels.ops.tuned_configs.grouped_mm_meta` (heuristic, tuned tables, pinned). AOT cases:
``aot/cases/experts.py``.
"""

from __future__ import annotations

import torch

from moe_kernels.config import GPT_OSS_ALPHA, GPT_OSS_LIMIT, Activation
from moe_kernels.cpu import experts as cpu_experts
from moe_kernels.ops._boundary import define_op
from moe_kernels.ops._launch import strides, tiling_rows, unit_stride_last
from moe_kernels.ops.tuned_configs import device_name_of, grouped_mm_meta
from moe_kernels.reference import experts as reference
from moe_kernels.utils import cdiv, new_output


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


def _check_rows(a_rows, row_scale, offsets, num_rows: int, num_groups: int, device) -> tuple:
    """Both kernels' row gather, row scale and group ends, checked and contiguous."""
    a_rows = _check_index("a_rows", a_rows, torch.int32, num_rows, device)
    row_scale = _check_index("row_scale", row_scale, torch.float32, num_rows, device)
    return a_rows, row_scale, _check_offsets(offsets, num_groups, device)


def _unit_stride_inner(b: torch.Tensor) -> torch.Tensor:
    """``b (G, K, N)`` with a unit stride along K or N (a transposed view is kept as it is); a copy
    only when it has neither, so that the kernel's loads stay coalesced."""
    if b.stride(2) == 1 or b.stride(1) == 1 or b.shape[2] == 1 or b.shape[1] == 1:
        return b
    return b.contiguous()


def launch_grouped_mm(a, b, offsets, *, a_rows=None, row_scale=None, out_rows=None):
    """Run the forward kernel; returns a fresh contiguous ``(M_out, N)`` tensor in ``a.dtype``.

    ``C[r] = row_scale[r] * a[a_rows[r]] @ b[g]`` for ``r`` in group ``g`` (``a_rows`` and
    ``row_scale`` optional: identity and 1), zero for ``r >= offsets[-1]``. ``M_out`` is
    ``out_rows``, else ``len(a_rows)``, else ``a.shape[0]``. Any strides: ``a`` is copied unless
    its rows are unit-stride, ``b`` unless it is unit-stride along K or N (``b.transpose(1, 2)``
    of a contiguous tensor is used in place).
    """
    out, _ = _launch_forward(a, b, offsets, a_rows, row_scale, out_rows)
    return out


def launch_grouped_gated_mm(a, b, offsets, activation, *, a_rows=None, bias=None, out_rows=None, store_h=True):
    """The forward kernel with the gated activation in its epilogue: ``(act (M_out, I),
    h (M_out, 2I) or None)`` in ``a.dtype``, where ``b (G, K, 2I)`` holds the gate and up columns
    (``[gate | up]``, interleaved for ``"gpt_oss"``), ``h[r] = a[a_rows[r]] @ b[g] + bias[g]``
    (``bias (G, 2I)`` optional) and ``act = act(gate, up)`` of ``h`` in float32 (rows past
    ``offsets[-1]``: zero). ``h`` is stored only with ``store_h`` (what the backward reads)."""
    code = Activation.parse(activation)
    width = b.shape[2]
    if width % 2:
        raise ValueError(f"grouped_mm launcher: a gated b needs an even number of columns, got {width}")
    if bias is not None and (tuple(bias.shape) != (b.shape[0], width) or bias.device != b.device):
        raise ValueError(
            f"grouped_mm launcher: bias must be ({b.shape[0]}, {width}) on {b.device}, got {tuple(bias.shape)} on "
            f"{bias.device}"
        )
    gated = dict(activation=code, bias=bias, store_h=store_h)
    return _launch_forward(a, b, offsets, a_rows, None, out_rows, gated=gated)


def _launch_forward(a, b, offsets, a_rows, row_scale, out_rows, *, gated: dict | None = None):
    """Both forward launchers: ``(C, h)``, ``h`` None unless a gated launch stores it."""
    from moe_kernels.kernels._grouped_mm import _grouped_mm_kernel

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
    a_rows, row_scale, offsets = _check_rows(a_rows, row_scale, offsets, out_rows, num_groups, device)
    out = new_output((out_rows, n_cols), a.dtype, device)
    store_h = bool(gated and gated["store_h"])
    h = new_output((out_rows, b_cols), a.dtype, device) if store_h else None
    bias = gated["bias"].contiguous() if gated and gated["bias"] is not None else None
    if out_rows == 0 or n_cols == 0:
        return out, h
    if num_groups == 0 or a.shape[0] == 0 or (k_dim == 0 and not gated):
        # No product: zeros. (Gated with K = 0 still runs: its epilogue adds the bias.)
        return out.zero_(), (h.zero_() if h is not None else None)
    meta = grouped_mm_meta(
        tiling_rows(out_rows), n_cols, k_dim, a.dtype, gated=gated is not None, device_name=device_name_of(device)
    )
    grid = ((cdiv(out_rows, meta["BLOCK_M"]) + num_groups) * cdiv(n_cols, meta["BLOCK_N"]),)
    _grouped_mm_kernel[grid](
        a_ptr=a,
        b_ptr=b,
        c_ptr=out,
        group_end_ptr=offsets,
        a_rows_ptr=a_rows if a_rows is not None else offsets,  # never read without GATHER_A
        row_scale_ptr=row_scale if row_scale is not None else out,  # never read without SCALE_ROWS
        h_ptr=h if h is not None else out,  # never written without STORE_H
        bias_ptr=bias if bias is not None else out,  # never read without HAS_BIAS
        M_out=out_rows,
        N=n_cols,
        K=k_dim,
        G=num_groups,
        **strides(a, "stride_am", "stride_ak"),
        **strides(b, "stride_bg", "stride_bk", "stride_bn"),
        **strides(out, "stride_cm", "stride_cn"),
        limit=GPT_OSS_LIMIT,
        alpha=GPT_OSS_ALPHA,
        GATHER_A=a_rows is not None,
        SCALE_ROWS=row_scale is not None,
        GATED=gated is not None,
        ACTIVATION=int(gated["activation"] if gated else Activation.SILU),  # read only when GATED
        HAS_BIAS=bias is not None,
        STORE_H=store_h,
        **meta,
    )
    return out, h


def launch_grouped_mm_weight_grad(a, grad_out, offsets, num_groups, *, a_rows=None, row_scale=None):
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
    a_rows, row_scale, offsets = _check_rows(a_rows, row_scale, offsets, num_rows, num_groups, device)
    grad_b = new_output((num_groups, k_dim, n_cols), a.dtype, device)
    if grad_b.numel() == 0:
        return grad_b
    if num_rows == 0 or a.shape[0] == 0:  # no rows to reduce over: zeros
        return grad_b.zero_()
    meta = grouped_mm_meta(num_rows, n_cols, k_dim, a.dtype, weight_grad=True, device_name=device_name_of(device))
    grid = (cdiv(n_cols, meta["BLOCK_N"]), cdiv(k_dim, meta["BLOCK_K_OUT"]), num_groups)
    _grouped_mm_weight_grad_kernel[grid](
        a_ptr=a,
        dc_ptr=grad_out,
        db_ptr=grad_b,
        group_end_ptr=offsets,
        a_rows_ptr=a_rows if a_rows is not None else offsets,  # never read without GATHER_A
        row_scale_ptr=row_scale if row_scale is not None else grad_b,  # never read without SCALE_ROWS
        M=num_rows,
        N=n_cols,
        K=k_dim,
        **strides(a, "stride_am", "stride_ak"),
        **strides(grad_out, "stride_dm", "stride_dn"),
        **strides(grad_b, "stride_bg", "stride_bk", "stride_bn"),
        GATHER_A=a_rows is not None,
        SCALE_ROWS=row_scale is not None,
        **meta,
    )
    return grad_b


def grouped_mm_forward(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, use_triton: bool) -> torch.Tensor:
    """The kernel, or the reference without autograd."""
    if use_triton:
        return launch_grouped_mm(a, b, offsets)
    path = cpu_experts if a.is_cpu else reference  # the fast CPU path, same semantics
    with torch.no_grad():
        return path.grouped_mm(a, b, offsets).contiguous()


def grouped_mm_backward(
    grad_out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, use_triton: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``grad_a`` by the forward kernel on ``b^T`` and ``grad_b`` by the weight-gradient kernel, or
    the reference's explicit formula."""
    grad_out = grad_out.to(a.dtype)
    if use_triton:
        grad_a = launch_grouped_mm(grad_out, b.transpose(1, 2), offsets)
        grad_b = launch_grouped_mm_weight_grad(a, grad_out, offsets, b.shape[0])
        return grad_a, grad_b.to(b.dtype)
    path = cpu_experts if a.is_cpu else reference
    with torch.no_grad():
        grad_a, grad_b = path.grouped_mm_backward(grad_out, a, b, offsets)
    return grad_a.contiguous(), grad_b.contiguous()


def _fake(inputs):
    return inputs.a.new_empty((inputs.a.shape[0], inputs.b.shape[2]))


def _backward_fake(inputs):
    return inputs.a.new_empty(inputs.a.shape), inputs.b.new_empty(inputs.b.shape)


def _save(ctx, inputs, outputs):
    ctx.save_for_backward(inputs.a, inputs.b, inputs.offsets)
    ctx.use_triton = inputs.use_triton


def _grads(ctx, backward, grad_out):
    a, b, offsets = ctx.saved_tensors
    grad_a, grad_b = backward(grad_out, a, b, offsets, ctx.use_triton)
    return {"a": grad_a, "b": grad_b}


GROUPED_MM = define_op(grouped_mm_forward, _fake, grouped_mm_backward, _backward_fake, _save, _grads)
