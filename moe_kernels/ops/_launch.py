"""What every launcher shares: the row tiling of the token-parallel kernels, their grid, and the
arguments they take by keyword (strides by name, unit-stride rows)."""

from __future__ import annotations

import torch

from moe_kernels._compat import interpreter_enabled
from moe_kernels.utils import cdiv, is_batch_invariant

# Largest tile of (tokens x experts) elements one program holds: 4 per thread at 8 warps.
# Registers grow about 8 per element held per thread (sm_90, Triton 3.9: 48-64 at 4, 80-128 at 8,
# ~166 at 16, with ptxas spilling at some of the larger points), and fewer registers let more
# programs share an SM (``moe-kernels info --kernels``).
MAX_TILE = 1024

# Small batches are spread over at least this many programs (about one per SM of an H100) so a
# decode step is not serialised on a few SMs. The interpreter runs programs one after another at
# a large fixed cost each, so there the fewest programs win.
MIN_PROGRAMS = 1 if interpreter_enabled() else 128


def row_tiling(width: int, num_tokens: int = 0, min_programs: int = 0) -> tuple[int, int]:
    """``(rows per program, num_warps)`` for rows ``width`` columns wide held in one tile.

    Several rows per program amortise index math at large T; with ``min_programs``, small
    batches are split finer so that they spread over at least that many programs. ``num_tokens``
    0: the tiling whatever the batch (see :func:`tiling_rows`).
    """
    block_t = max(1, min(64, MAX_TILE // width))
    while block_t > 1 and num_tokens and cdiv(num_tokens, block_t) < min_programs:
        block_t //= 2
    return block_t, max(1, min(8, block_t * width // 128))


def tiling_rows(num_rows: int) -> int:
    """The row count a launcher sizes its tiles by: ``num_rows``, or 0 in batch-invariant mode
    (:func:`moe_kernels.set_batch_invariant`), where every batch gets the one configuration a
    0-row problem gets, so that a row's reduction order cannot depend on the batch."""
    return 0 if is_batch_invariant() else num_rows


def token_grid(meta: dict, num_tokens: int) -> tuple[int]:
    """The 1-D grid of a kernel that takes ``meta["BLOCK_T"]`` tokens per program."""
    return (cdiv(num_tokens, meta["BLOCK_T"]),)


def strides(tensor: torch.Tensor, *names: str) -> dict[str, int]:
    """``{names[i]: tensor.stride(i)}``: the leading strides of ``tensor`` as the keyword arguments
    of the kernel that names them (a unit stride a kernel assumes is not passed)."""
    return dict(zip(names, tensor.stride()))


def unit_stride_last(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` with a unit-stride last dim (a copy only when it is not): leading dims may keep
    any stride (a slice of a larger buffer costs nothing), but unit-stride rows are what let the
    compiler emit vector loads."""
    return tensor if tensor.stride(-1) == 1 or tensor.shape[-1] == 1 else tensor.contiguous()
