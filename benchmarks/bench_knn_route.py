"""Fused kNN-MoE route benchmark: :func:`moe_kernels.knn_route` (gather from the memory +
confidence + mix + top-k routing in one kernel) against ``softmax_topk`` alone (the cost floor of
any router) and against the torch chain it replaces (gather, the reference mix, the reference
routing) in eager mode and under ``torch.compile``.

    python -m benchmarks.bench_knn_route --quick
    python -m benchmarks.bench_knn_route --neighbors 8 32 --entries 10000 100000
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Sequence

import torch

import moe_kernels
from benchmarks.common import (
    add_speedups,
    measured_bandwidth_gbs,
    parse_args,
    resolve_device,
    run_and_report,
    time_fn,
    warm_up,
)
from moe_kernels import reference
from moe_kernels.shapes import ROUTING_SHAPES, ROUTING_TOKENS
from moe_kernels.testing import make_bias

OP_NAME = "knn_route"
QUICK_CPU = dict(shapes=ROUTING_SHAPES[:2], tokens=(1, 64), neighbors=(8,), entries=(10_000,))
CUDA_GRAPH_MAX_TOKENS = 512
TABLE_COLUMNS = (
    "model",
    "n",
    "N",
    "T",
    "provider",
    "median_us",
    "gb_per_s",
    "pct_bw",
    "speedup_vs_eager",
    "speedup_vs_compile",
    "extra_us_vs_softmax_topk",
    "timer",
)


def route_bytes(num_tokens: int, num_experts: int, num_neighbors: int, k: int, dtype: torch.dtype) -> int:
    """Bytes the fused route must move: router logits, neighbour ids (int64) and sims (float32),
    the gathered float32 memory rows, and float32 weights + int32 ids + float32 confidence."""
    reads = num_tokens * (num_experts * dtype.itemsize + num_neighbors * (8 + 4) + num_neighbors * num_experts * 4)
    return reads + num_tokens * (k * 8 + 4)


def torch_chain(router, ids, sims, memory, k, **routing):
    """What the fused op replaces: gather, mix, route (the references)."""
    mixed, conf = reference.knn_mix(router, memory[ids], sims)
    weights, chosen = reference.softmax_topk(mixed, k, **routing)
    return weights, chosen, conf


def run(
    *,
    quick: bool = False,
    device=None,
    tokens: Sequence[int] | None = None,
    neighbors: Sequence[int] | None = None,
    entries: Sequence[int] | None = None,
) -> list[dict]:
    """Rows of every (shape, n, N, T), one per provider."""
    device = resolve_device(device)
    quick_cpu = quick and device.type == "cpu"
    shapes = QUICK_CPU["shapes"] if quick_cpu else ROUTING_SHAPES
    tokens = tokens or (QUICK_CPU["tokens"] if quick_cpu else ROUTING_TOKENS)
    neighbors = neighbors or (QUICK_CPU["neighbors"] if quick_cpu else (8, 32))
    entries = entries or (QUICK_CPU["entries"] if quick_cpu else (10_000, 100_000))
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    peak_gbs = measured_bandwidth_gbs(device)
    compiled = None if quick_cpu else torch.compile(torch_chain)
    rows = []
    for shape in shapes:
        bias = make_bias(shape.num_experts, device=device) if shape.has_bias else None
        routing = dict(shape.options, bias=bias)
        for num_entries in entries:
            generator = torch.Generator(device=device).manual_seed(num_entries)
            memory = torch.randn(num_entries, shape.num_experts, generator=generator, device=device)
            for num_neighbors in neighbors:
                for num_tokens in tokens:
                    rows += _bench_point(
                        shape, routing, memory, num_neighbors, num_tokens, dtype, device, compiled, peak_gbs, generator
                    )
    return rows


def _bench_point(shape, routing, memory, num_neighbors, num_tokens, dtype, device, compiled, peak_gbs, generator):
    router = torch.randn(num_tokens, shape.num_experts, generator=generator, device=device).to(dtype)
    ids = torch.randint(0, memory.shape[0], (num_tokens, num_neighbors), generator=generator, device=device)
    sims = torch.rand(num_tokens, num_neighbors, generator=generator, device=device)
    k = shape.k
    providers = {
        "moe_kernels": functools.partial(moe_kernels.knn_route, router, ids, sims, memory, k, **routing),
        "softmax_topk": functools.partial(moe_kernels.softmax_topk, router, k, **routing),
        "torch_eager": functools.partial(torch_chain, router, ids, sims, memory, k, **routing),
    }
    if compiled is not None:
        providers["torch_compile"] = functools.partial(compiled, router, ids, sims, memory, k, **routing)
    moved = route_bytes(num_tokens, shape.num_experts, num_neighbors, k, dtype)
    use_graph = device.type == "cuda" and num_tokens <= CUDA_GRAPH_MAX_TOKENS
    rows = []
    for name, call in providers.items():
        warm_up(call, device)
        timing = time_fn(call, device=device, cuda_graph=use_graph)
        gb_per_s = moved / timing["median_us"] / 1e3
        rows.append(
            {
                "op": OP_NAME,
                "model": shape.model,
                "E": shape.num_experts,
                "k": k,
                "n": num_neighbors,
                "N": memory.shape[0],
                "T": num_tokens,
                "dtype": str(dtype).removeprefix("torch."),
                "provider": name,
                **timing,
                "bytes": moved,
                "gb_per_s": gb_per_s,
                "pct_bw": 100 * gb_per_s / peak_gbs,
            }
        )
    add_speedups(rows)
    floor = {row["provider"]: row["median_us"] for row in rows}["softmax_topk"]
    for row in rows:
        # The small-T goal: at most 1 us more than softmax_topk.
        row["extra_us_vs_softmax_topk"] = row["median_us"] - floor if row["provider"] == "moe_kernels" else None
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_knn_route", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU: two shapes, n=8, N=1e4, T in (1, 64)")
    parser.add_argument("--tokens", type=int, nargs="+")
    parser.add_argument("--neighbors", type=int, nargs="+")
    parser.add_argument("--entries", type=int, nargs="+")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parse_args(parser, argv)  # with --threads
    device = resolve_device(args.device)
    return run_and_report(
        OP_NAME,
        device,
        lambda: run(
            quick=args.quick, device=device, tokens=args.tokens, neighbors=args.neighbors, entries=args.entries
        ),
        TABLE_COLUMNS,
        write=not args.no_write,
    )


if __name__ == "__main__":
    raise SystemExit(main())
