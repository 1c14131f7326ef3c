"""Tile configurations of the grouped GEMM kernels: the heuristic, the per-GPU tuned tables
(with the Triton version each was tuned with) and the pinned configuration tests use.

:func:`grouped_mm_meta` is what the launchers call: the heuristic's tiles, replaced by a tuned
table's entry for this GPU model, (kernel, dtype, N, K) and row count where one covers them, and by
a pinned configuration (:func:`pinned_config`) over both.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from pathlib import Path

import torch

from moe_kernels.utils import next_power_of_2

# Constexprs (and launch options) a pinned configuration may set, per kernel.
_FORWARD_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "BLOCK_G", "num_warps", "num_stages")
_WEIGHT_GRAD_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K_OUT", "num_warps", "num_stages")

# When set (tests: :func:`pinned_config`), these values replace the heuristic's in every launch.
_PINNED_CONFIG: dict | None = None

# Tuned configurations, one JSON file per GPU model (``benchmarks/tune_grouped_mm.py`` writes
# them with :func:`write_tuned_table`)::
#
#     {"device": "<GPU name>", "tables": {"<kernel>|<dtype>|N|K": {"triton": "<version>",
#                                                                   "entries": [[max_rows, {meta}], ...]}}}
#
# with the entries in increasing ``max_rows``; a launch with M rows takes the first entry with
# ``M <= max_rows``. Rows past the largest tuned ``max_rows``, and shapes without a table, use the
# heuristic: a tile tuned for 32k rows says nothing about 1M rows. Each table records the Triton
# version it was tuned with (a compiler upgrade can change the best tile).
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


def tuned_path(device_name: str) -> Path:
    """The tuned-configuration file of a GPU model."""
    return TUNED_CONFIG_DIR / f"{device_slug(device_name)}.json"


@functools.cache
def tuned_table(device_name: str | None) -> dict:
    """The tuned tables of a GPU model, ``{key: {"triton": version, "entries": [...]}}`` ({} when
    none were tuned for it)."""
    if device_name is None:
        return {}
    path = tuned_path(device_name)
    return json.loads(path.read_text())["tables"] if path.is_file() else {}


def write_tuned_table(device_name: str, entries: dict[str, list], triton_version: str) -> Path:
    """Merge ``entries`` (``{key: [[max_rows, meta], ...]}``, tuned now with ``triton_version``)
    into the GPU model's file, replacing those keys' tables; returns the file's path."""
    path = tuned_path(device_name)
    tables = json.loads(path.read_text())["tables"] if path.is_file() else {}
    for key, rows in entries.items():
        tables[key] = {"triton": triton_version, "entries": sorted(rows, key=lambda entry: entry[0])}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"device": device_name, "tables": tables}, indent=1, sort_keys=True) + "\n")
    tuned_table.cache_clear()
    return path


@functools.cache
def _cuda_device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_name_of(device: torch.device) -> str | None:
    """GPU model name of a CUDA ``device`` (cached: no query per launch), None elsewhere."""
    if device.type != "cuda":
        return None
    return _cuda_device_name(device.index if device.index is not None else torch.cuda.current_device())


def _tuned_meta(device_name, kernel, dtype, rows, n_cols, k_dim) -> dict:
    """The tuned configuration covering ``rows``, or {} (the heuristic) past the tuned range."""
    table = tuned_table(device_name).get(tuned_key(kernel, dtype, n_cols, k_dim))
    if not table:
        return {}
    return next((meta for max_rows, meta in table["entries"] if rows <= max_rows), {})


@contextlib.contextmanager
def pinned_config(
    *,
    BLOCK_M=None,
    BLOCK_N=None,
    BLOCK_K=None,
    BLOCK_K_OUT=None,
    GROUP_M=None,
    BLOCK_G=None,
    num_warps=None,
    num_stages=None,
):
    """Within the block, every launch uses the given values (those not None) over the heuristic
    configuration: ``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K`` (forward), ``BLOCK_K_OUT`` (weight
    gradient's output tile along K; defaults to the pinned ``BLOCK_K``), ``GROUP_M``, ``BLOCK_G``
    (group ends scanned per step), ``num_warps``, ``num_stages``. Block sizes are powers of two, at
    least 16 for the ``tl.dot`` dims (``BLOCK_G`` and ``GROUP_M`` at least 1). Nests (inner keys win).
    """
    global _PINNED_CONFIG
    given = dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_K_OUT=BLOCK_K_OUT, GROUP_M=GROUP_M)
    given.update(BLOCK_G=BLOCK_G, num_warps=num_warps, num_stages=num_stages)
    meta = {key: value for key, value in given.items() if value is not None}
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
    ``weight_grad``, of the weight-gradient kernel), shared with the AOT cases.

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
