"""Public grouped GEMM op (``torch._grouped_mm``'s convention)."""

from __future__ import annotations

import torch

from moe_kernels.functional import _checks as check
from moe_kernels.ops.grouped_mm import GROUPED_MM
from moe_kernels.utils import use_triton


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Grouped matrix multiply: consecutive row groups of ``a`` times one matrix of ``b`` each.

    Args:
        a: ``(M, K)`` float32 / float16 / bfloat16 (float64 with ``backend="torch"``), any strides.
        b: ``(G, K, N)`` of ``a``'s dtype and device, any strides (a transposed view costs no copy).
        offsets: ``(G,)`` int32 on ``a``'s device: the cumulative end row of each group,
            non-decreasing, with ``0 <= offsets[g] <= M``. Equal consecutive offsets are empty
            groups.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``, as for every op.

    Returns:
        ``(M, N)`` in ``a.dtype``: rows ``offsets[g-1]:offsets[g]`` (from 0 for ``g = 0``) are
        ``a[rows] @ b[g]``, accumulated in float32 (float64 for float64); rows at or past
        ``offsets[-1]`` are zero.

    Differentiable with respect to ``a`` and ``b`` (``grad_a = grad_out[rows] @ b[g]^T``, zero past
    ``offsets[-1]``; ``grad_b[g] = a[rows]^T @ grad_out[rows]``, zero for empty groups). Saved for
    backward: ``a``, ``b`` and ``offsets``.

    Offsets are validated for CPU tensors (free: no device sync), outside ``torch.compile``.
    On CUDA they are not read on the host (no sync; CUDA-graph safe): offsets that decrease, are
    negative or exceed ``M`` are undefined behaviour there (wrong values, never an access out of
    bounds with the Triton kernels).
    """
    _check_args(a, b, offsets)
    triton_path = use_triton(backend, a.device, "grouped_mm")
    check.not_float64_on_triton("grouped_mm", "a", a, triton_path)
    if a.device.type == "cpu" and not torch.compiler.is_compiling():
        _check_offset_values(offsets, a.shape[0])
    return GROUPED_MM(a, b, offsets, triton_path)


def _check_args(a, b, offsets):
    op = "grouped_mm"
    check.tensor(op, "a", a)
    check.tensor(op, "b", b)
    check.tensor(op, "offsets", offsets)
    check.tensor(op, "a", a, dtypes=check.FLOAT_DTYPES, dims=2, shape="(M, K)")
    check.tensor(op, "b", b, dims=3, shape="(G, K, N)")
    if b.shape[1] != a.shape[1]:
        raise ValueError(f"{op}: b must have shape (G, K, N) with K = a.shape[1] = {a.shape[1]}, got {tuple(b.shape)}")
    if b.dtype != a.dtype:
        raise TypeError(f"{op}: b must have a's dtype {a.dtype}, got {b.dtype}")
    check.tensor(op, "b", b, device=a.device, device_of="a")
    check.tensor(op, "offsets", offsets, dtypes=(torch.int32,))
    check.shape_is(op, "offsets", offsets, (b.shape[0],), lambda: f"(G,) = ({b.shape[0]},)")
    check.tensor(op, "offsets", offsets, device=a.device, device_of="a")


def _check_offset_values(offsets, num_rows):
    """Offsets non-decreasing in ``[0, M]`` (CPU tensors only: reading them costs no sync)."""
    values = offsets.tolist()
    for g, end in enumerate(values):
        if not 0 <= end <= num_rows:
            raise ValueError(f"grouped_mm: offsets must lie in [0, M] = [0, {num_rows}], got offsets[{g}] = {end}")
        if g and end < values[g - 1]:
            raise ValueError(
                f"grouped_mm: offsets must be non-decreasing, got offsets[{g - 1}] = {values[g - 1]} > "
                f"offsets[{g}] = {end}"
            )
