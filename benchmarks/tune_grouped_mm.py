"""Tune the grouped GEMM's tile configurations on this GPU and write them where the launchers
look (``moe_kernels/configs/grouped_mm/<gpu>.json``, with the Triton version): every GEMM of
``fused_experts`` over the experts registry, at a decode-sized and a prefill-sized row count, timed
with ``triton.testing.do_bench`` for each candidate (tiles x warps x stages), keeping the fastest.
The file is updated after every GEMM, so an interrupted run keeps what it finished.

    python -m benchmarks.tune_grouped_mm [--rows 512 32768] [--model Qwen3-30B-A3B]
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence

import torch

from benchmarks.common import time_fn
from moe_kernels._compat import triton_version
from moe_kernels.ops import grouped_mm as gmm
from moe_kernels.ops import tuned_configs
from moe_kernels.ops.tuned_configs import pinned_config
from moe_kernels.shapes import EXPERT_SHAPES

FORWARD_CANDIDATES = [
    dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=s)
    for m, n, k, w, s in itertools.product((64, 128), (64, 128, 256), (32, 64), (4, 8), (3, 4))
]
WEIGHT_GRAD_CANDIDATES = [
    dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K_OUT=k, num_warps=w, num_stages=s)
    for m, n, k, w, s in itertools.product((32, 64), (64, 128), (64, 128), (4, 8), (3, 4))
]


def _gemms(shape):
    """(kernel, N, K) of each GEMM of fused_experts (forward: the gated up projection, down;
    backward: the two input gradients and the two weight gradients)."""
    h, i = shape.hidden, shape.intermediate
    return [
        ("gated", i, h),
        ("forward", h, i),
        ("forward", i, h),
        ("forward", h, 2 * i),
        ("weight_grad", i, h),
        ("weight_grad", 2 * i, h),
    ]


def _time(kernel, n_cols, k_dim, rows, groups, meta, device) -> float:
    generator = torch.Generator(device=device).manual_seed(0)
    counts = torch.full((groups,), rows // groups, dtype=torch.int32, device=device)
    offsets = counts.cumsum(0, dtype=torch.int32)
    a = torch.randn(rows, k_dim, generator=generator, device=device).to(torch.bfloat16)
    if kernel == "weight_grad":
        dc = torch.randn(rows, n_cols, generator=generator, device=device).to(torch.bfloat16)
        call = lambda: gmm.launch_grouped_mm_weight_grad(a, dc, offsets, groups)  # noqa: E731
    elif kernel == "gated":
        b = torch.randn(groups, k_dim, 2 * n_cols, generator=generator, device=device).to(torch.bfloat16)
        call = lambda: gmm.launch_grouped_gated_mm(a, b, offsets, "silu", store_h=False)  # noqa: E731
    else:
        b = torch.randn(groups, k_dim, n_cols, generator=generator, device=device).to(torch.bfloat16)
        call = lambda: gmm.launch_grouped_mm(a, b, offsets)  # noqa: E731
    with pinned_config(**meta):
        try:
            call()
        except Exception:  # a candidate that does not compile (shared memory) is skipped
            return float("inf")
        return time_fn(call, device=device)["median_us"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tune_grouped_mm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[512, 32768])
    parser.add_argument("--model", action="append", dest="models")
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    name = tuned_configs.device_name_of(device)
    table: dict[str, list] = {}
    for shape in EXPERT_SHAPES:
        if args.models and shape.model not in args.models:
            continue
        for rows in sorted(args.rows):
            for kernel, n_cols, k_dim in _gemms(shape):
                candidates = WEIGHT_GRAD_CANDIDATES if kernel == "weight_grad" else FORWARD_CANDIDATES
                timings = [
                    (_time(kernel, n_cols, k_dim, rows, shape.num_experts, meta, device), meta) for meta in candidates
                ]
                best_us, best = min(timings, key=lambda item: item[0])
                key = tuned_configs.tuned_key(kernel, torch.bfloat16, n_cols, k_dim)
                entries = [entry for entry in table.get(key, []) if entry[0] != rows]
                table[key] = sorted(entries + [[rows, best]], key=lambda entry: entry[0])
                # Written after every GEMM, so that a session cut short keeps what it tuned.
                path = tuned_configs.write_tuned_table(name, {key: table[key]}, triton_version())
                print(f"{shape.model} rows={rows} {key}: {best} {best_us:.1f} us -> {path}")
    print(f"tuned {len(table)} shapes for {name}, Triton {triton_version()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
