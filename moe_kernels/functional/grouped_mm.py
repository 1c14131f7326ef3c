"""Public grouped GEMM op (``torch._grouped_mm``'s convention)."""

from __future__ import annotations

import torch

from moe_kernels.ops.grouped_mm import GroupedMMFunction, grouped_mm_op
from moe_kernels.utils import use_triton

GROUPED_MM_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


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
    if triton_path and a.dtype == torch.float64:
        raise TypeError(
            "grouped_mm: backend='triton' takes float32/float16/bfloat16 a, got torch.float64; "
            "use backend='torch' for float64"
        )
    if torch.compiler.is_compiling():
        return grouped_mm_op(a, b, offsets, triton_path)
    if a.device.type == "cpu":
        _check_offset_values(offsets, a.shape[0])
    return GroupedMMFunction.apply(a, b, offsets, triton_path)


def _check_args(a, b, offsets):
    for name, tensor in (("a", a), ("b", b), ("offsets", offsets)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"grouped_mm: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if a.dtype not in GROUPED_MM_DTYPES:
        raise TypeError(
            f"grouped_mm: a must be float32, float16 or bfloat16 (float64 for the torch backend), got {a.dtype}"
        )
    if a.dim() != 2:
        raise ValueError(f"grouped_mm: a must have shape (M, K), got {tuple(a.shape)}")
    if b.dim() != 3:
        raise ValueError(f"grouped_mm: b must have shape (G, K, N), got {tuple(b.shape)}")
    if b.shape[1] != a.shape[1]:
        raise ValueError(
            f"grouped_mm: b must have shape (G, K, N) with K = a.shape[1] = {a.shape[1]}, got {tuple(b.shape)}"
        )
    if b.dtype != a.dtype:
        raise TypeError(f"grouped_mm: b must have a's dtype {a.dtype}, got {b.dtype}")
    if b.device != a.device:
        raise ValueError(f"grouped_mm: b must be on a's device {a.device}, got {b.device}")
    if offsets.dtype != torch.int32:
        raise TypeError(f"grouped_mm: offsets must be int32, got {offsets.dtype}")
    if tuple(offsets.shape) != (b.shape[0],):
        raise ValueError(
            f"grouped_mm: offsets must have shape (G,) = ({b.shape[0]},), got {tuple(offsets.shape)}"
        )
    if offsets.device != a.device:
        raise ValueError(f"grouped_mm: offsets must be on a's device {a.device}, got {offsets.device}")


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
