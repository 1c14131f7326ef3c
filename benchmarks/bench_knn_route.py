"""Fused kNN-MoE route benchmark: :func:`moe_kernels.knn_route` (gather from the memory +
confidence + mix + top-k routing in one kernel) against ``softmax_topk`` alone (the cost floor of
any router) and against the torch chain it replaces (gather, the reference mix, the reference
routing) in eager mode and under ``torch.compile``.

    python -m benchmarks.bench_knn_route --quick
    python -m benchmarks.bench_knn_route --neighbors 8 32 --entries 10000 100000
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

import moe_kernels
from benchmarks.command import bench_parser, main_for
from benchmarks.common import resolve_device
from benchmarks.points import bandwidth_columns, bandwidth_rows, dtype_name
from moe_kernels import reference
from moe_kernels.config import RoutingConfig
from moe_kernels.shapes import ROUTING_SHAPES, ROUTING_TOKENS
from moe_kernels.testing import make_bias

OP_NAME = "knn_route"
QUICK_CPU = dict(shapes=ROUTING_SHAPES[:2], tokens=(1, 64), neighbors=(8,), entries=(10_000,))
CUDA_GRAPH_MAX_TOKENS = 512
Counts = Sequence[int] | None  # sizes to run, or None for the defaults
TABLE_COLUMNS = bandwidth_columns("model", "n", "N", "T", extra=("extra_us_vs_softmax_topk",))


def route_bytes(num_tokens: int, num_experts: int, num_neighbors: int, k: int, dtype: torch.dtype) -> int:
    """Bytes the fused route must move: router logits, neighbour ids (int64) and sims (float32),
    the gathered float32 memory rows, and float32 weights + int32 ids + float32 confidence."""
    reads = num_tokens * (num_experts * dtype.itemsize + num_neighbors * (8 + 4) + num_neighbors * num_experts * 4)
    return reads + num_tokens * (k * 8 + 4)


def torch_chain(router, ids, sims, memory, k, *, routing: RoutingConfig, bias: torch.Tensor | None):
    """What the fused op replaces: gather, mix, route (the references)."""
    mixed, conf = reference.knn_mix(router, memory[ids], sims)
    weights, chosen = reference.softmax_topk(mixed, k, routing=routing, bias=bias)
    return weights, chosen, conf


def run(
    *, quick: bool = False, device=None, tokens: Counts = None, neighbors: Counts = None, entries: Counts = None
) -> list[dict]:
    """Rows of every (shape, n, N, T), one per provider; ``tokens`` (T), ``neighbors`` (n) and
    ``entries`` (N) default to the registry's (quick: :data:`QUICK_CPU`'s) counts."""
    device = resolve_device(device)
    quick_cpu = quick and device.type == "cpu"
    shapes = QUICK_CPU["shapes"] if quick_cpu else ROUTING_SHAPES
    tokens = tokens or (QUICK_CPU["tokens"] if quick_cpu else ROUTING_TOKENS)
    neighbors = neighbors or (QUICK_CPU["neighbors"] if quick_cpu else (8, 32))
    entries = entries or (QUICK_CPU["entries"] if quick_cpu else (10_000, 100_000))
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    compiled = None if quick_cpu else torch.compile(torch_chain)
    rows = []
    for shape in shapes:
        bias = make_bias(shape.num_experts, device=device) if shape.has_bias else None
        routing = dict(routing=shape.routing, bias=bias)
        for num_entries in entries:
            generator = torch.Generator(device=device).manual_seed(num_entries)
            memory = torch.randn(num_entries, shape.num_experts, generator=generator, device=device)
            for num_neighbors in neighbors:
                for num_tokens in tokens:
                    rows += _bench_point(
                        shape, routing, memory, num_neighbors, num_tokens, dtype, device, compiled, generator
                    )
    return rows


def _bench_point(shape, routing, memory, num_neighbors, num_tokens, dtype, device, compiled, generator):
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
    case = {"op": OP_NAME, "model": shape.model, "E": shape.num_experts, "k": k, "n": num_neighbors}
    case.update(N=memory.shape[0], T=num_tokens, dtype=dtype_name(dtype))
    rows = bandwidth_rows(case, providers, device, moved, cuda_graph=use_graph)
    floor = {row["provider"]: row["median_us"] for row in rows}["softmax_topk"]
    for row in rows:
        # The small-T goal: at most 1 us more than softmax_topk.
        row["extra_us_vs_softmax_topk"] = row["median_us"] - floor if row["provider"] == "moe_kernels" else None
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser("bench_knn_route", __doc__, "CPU: two shapes, n=8, N=1e4, T in (1, 64)")
    parser.add_argument("--tokens", type=int, nargs="+")
    parser.add_argument("--neighbors", type=int, nargs="+")
    parser.add_argument("--entries", type=int, nargs="+")
    return main_for(OP_NAME, parser, argv, run, TABLE_COLUMNS)


if __name__ == "__main__":
    raise SystemExit(main())
