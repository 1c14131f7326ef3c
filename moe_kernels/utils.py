"""Small helpers shared by every layer: backend selection, output allocation (poisoned on a test's
request), the compute dtype, slot keying, integer math, the batch-invariant mode's switch. The
launchers' tiling and argument helpers are in ``moe_kernels/ops/_launch.py``."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch

from moe_kernels._compat import interpreter_enabled, triton_importable

BACKENDS = ("auto", "triton", "torch")

# Poisoning is switched on by ``moe_kernels.testing.poisoned_outputs()``: every output buffer a
# launcher allocates is then filled with a value no kernel writes, so a test can prove that every
# element was written. Off, it costs one Python bool test per allocation.
_poison_outputs = False
_warned_fallback: set[str] = set()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype an op computes in for inputs of ``dtype``: float64 stays float64 (the PyTorch
    path's gradcheck); every other float dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def slot_experts(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``(T*k,)`` int64 on ids' device: the expert of each slot ``t * k + j`` of ``ids (T, k)``,
    ``E`` for an empty (-1) or out-of-range slot, so that a stable sort of it (``torch.argsort(key,
    stable=True)``) groups the slots by expert in token order, the empty ones last. Every path that
    groups slots by expert (the alignment and the counts, the CPU experts, expert parallelism)
    keys them so; no host sync."""
    # Two ops: -1 and every id past E clamp to -1 and E, and -1 wraps to E.
    return ids.reshape(-1).long().clamp(-1, num_experts).remainder(num_experts + 1)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def poison_value(dtype: torch.dtype) -> float | int:
    """The fill value of a poisoned buffer: NaN for floats, a large sentinel for integers."""
    if dtype.is_floating_point:
        return float("nan")
    return torch.iinfo(dtype).max - 12345


def new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate an op output (``torch.empty``), poisoned when a test asked for it."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if _poison_outputs:
        out.fill_(poison_value(dtype))
    return out


def check_backend(owner: str, backend, device: torch.device | None = None) -> None:
    """``backend`` is one of :data:`BACKENDS` (``ValueError`` naming ``owner`` otherwise); with a
    ``device``, one the ops can run there: ``"triton"`` needs triton, and on the CPU the
    interpreter (``TRITON_INTERPRET=1``), so that a module refuses when built, not at its first
    forward."""
    if backend not in BACKENDS:
        raise ValueError(f"{owner}: backend must be one of {BACKENDS}, got {backend!r}")
    if device is None or backend != "triton":
        return
    if not triton_importable():
        raise ValueError(f"{owner}: backend='triton' needs the triton package (pip install triton)")
    if device.type == "cpu" and not interpreter_enabled():
        raise ValueError(
            f"{owner}: backend='triton' on a CPU model needs TRITON_INTERPRET=1 set before Python starts; "
            "use backend='auto' (the CPU path) or move the model to CUDA"
        )


def use_triton(backend: str, device: torch.device, op_name: str) -> bool:
    """Resolve ``backend`` ("auto" | "triton" | "torch") for tensors on ``device``.

    "auto": CUDA tensors run the Triton kernels (falling back to the PyTorch reference, with a
    one-time warning, when Triton is not installed); every other device runs the PyTorch path
    (``moe_kernels.cpu`` on CPU).
    "triton" on CPU runs the kernels through the Triton interpreter, which needs
    ``TRITON_INTERPRET=1`` in the environment before Python starts.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op_name}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "auto":
        if device.type != "cuda":
            return False
        if triton_importable():
            return True
        if op_name not in _warned_fallback:
            _warned_fallback.add(op_name)
            warnings.warn(
                f"{op_name}: triton is not installed; CUDA tensors run the PyTorch reference",
                stacklevel=3,
            )
        return False
    if not triton_importable():
        raise RuntimeError(f"{op_name}: backend='triton' needs the triton package (pip install triton)")
    if device.type == "cuda":
        return True
    if device.type == "cpu":
        if interpreter_enabled():
            return True
        raise RuntimeError(
            f"{op_name}: backend='triton' got CPU tensors; Triton runs on the CPU only through its "
            "interpreter: set TRITON_INTERPRET=1 in the environment before starting Python, or use "
            "backend='torch'"
        )
    raise RuntimeError(f"{op_name}: backend='triton' supports cuda and cpu tensors, got {device.type}")


# ---------------------------------------------------------------------------------------------
# Batch-invariant mode (the public switches are moe_kernels.batch_invariant / set_batch_invariant)

_BATCH_INVARIANT = False


def is_batch_invariant() -> bool:
    """Whether the ops run in batch-invariant mode (:func:`batch_invariant`)."""
    return _BATCH_INVARIANT


def set_batch_invariant(enabled: bool) -> bool:
    """Switch batch-invariant mode on or off for the process (all threads); returns the previous
    setting. In it, ``softmax_topk``, ``knn_mix``, ``knn_route``, ``probmoe_route`` in eval mode
    and ``fused_experts`` give every row a bitwise-identical result whatever the batch size and
    the row's position in it: the Triton kernels take one tile configuration whatever the token
    count (no split of small batches, no tuned per-size table), and the CPU ``fused_experts``
    computes each routed row by one compiled pass with a fixed reduction order (see the README
    for what it costs)."""
    global _BATCH_INVARIANT
    if not isinstance(enabled, bool):
        raise TypeError(f"set_batch_invariant: enabled must be a bool, got {type(enabled).__name__}")
    previous, _BATCH_INVARIANT = _BATCH_INVARIANT, enabled
    return previous


@contextlib.contextmanager
def batch_invariant(enabled: bool = True) -> Iterator[None]:
    """``with batch_invariant():`` runs its block in batch-invariant mode
    (:func:`set_batch_invariant`) and restores the previous mode after it."""
    previous = set_batch_invariant(enabled)
    try:
        yield
    finally:
        set_batch_invariant(previous)
