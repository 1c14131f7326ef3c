"""kNN-MoE logit mixing benchmark: :func:`moe_kernels.knn_mix` against the PyTorch reference in
eager mode and under ``torch.compile``, over the routing registry's expert counts.

Run from the repository root::

    python -m benchmarks.bench_knn --quick
    python -m benchmarks.bench_knn --dtype bfloat16 --neighbors 8 32 --tokens 1 64 4096
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

import moe_kernels
from benchmarks.command import add_dtype_flag, bench_parser, main_for
from benchmarks.common import resolve_device
from benchmarks.points import bandwidth_columns, bandwidth_rows, dtype_name
from moe_kernels import reference
from moe_kernels.config import KnnMixing
from moe_kernels.shapes import ROUTING_SHAPES, ROUTING_TOKENS

OP_NAME = "knn_mix"
MIXING = KnnMixing(weighting="similarity", temperature=0.1, min_confidence=0.0)
NEIGHBORS = (8, 32)
QUICK_CPU = dict(experts=(64, 256), tokens=(1, 64, 1024), neighbors=(8,))
CUDA_GRAPH_MAX_TOKENS = 512
TABLE_COLUMNS = bandwidth_columns("E", "n", "T", "dtype")


def mix_bytes(num_tokens: int, num_experts: int, num_neighbors: int, dtype: torch.dtype) -> int:
    """Bytes the op must move: router and neighbour logits and float32 sims read, float32 mixed
    logits and confidences written."""
    reads = num_tokens * num_experts * (num_neighbors + 1) * dtype.itemsize + num_tokens * num_neighbors * 4
    return reads + num_tokens * (num_experts + 1) * 4


def _providers(device: torch.device, quick_cpu: bool) -> dict:
    options = dict(weighting=MIXING.weighting, temperature=MIXING.temperature, min_confidence=MIXING.min_confidence)
    providers = {
        "moe_kernels": functools.partial(moe_kernels.knn_mix, **options),
        "torch_eager": functools.partial(reference.knn_mix, mixing=MIXING),
    }
    if not quick_cpu:  # inductor's C++ build takes minutes on a small CPU
        torch._dynamo.reset()
        providers["torch_compile"] = torch.compile(functools.partial(reference.knn_mix, mixing=MIXING))
    return providers


def run(
    *,
    quick: bool = False,
    dtypes: Sequence[str] | None = None,
    device=None,
    tokens: Sequence[int] | None = None,
    neighbors: Sequence[int] | None = None,
) -> list[dict]:
    """Rows of every (E, n, dtype, T) point, one per provider."""
    device = resolve_device(device)
    quick_cpu = quick and device.type == "cpu"
    experts = QUICK_CPU["experts"] if quick_cpu else sorted({s.num_experts for s in ROUTING_SHAPES})
    tokens = tokens or (QUICK_CPU["tokens"] if quick_cpu else ROUTING_TOKENS)
    neighbors = neighbors or (QUICK_CPU["neighbors"] if quick_cpu else NEIGHBORS)
    dtypes = dtypes or (("float32",) if quick_cpu else ("bfloat16",))
    providers = _providers(device, quick_cpu)
    rows = []
    for num_experts in experts:
        for num_neighbors in neighbors:
            for dtype in map(lambda name: getattr(torch, name), dtypes):
                for num_tokens in tokens:
                    rows += _bench_point(num_experts, num_neighbors, dtype, num_tokens, device, providers)
    return rows


def _bench_point(num_experts, num_neighbors, dtype, num_tokens, device, providers) -> list[dict]:
    generator = torch.Generator(device=device).manual_seed(num_tokens)
    router = torch.randn(num_tokens, num_experts, generator=generator, device=device).to(dtype)
    values = torch.randn(num_tokens, num_neighbors, num_experts, generator=generator, device=device).to(dtype)
    sims = torch.rand(num_tokens, num_neighbors, generator=generator, device=device)
    case = {"op": OP_NAME, "E": num_experts, "n": num_neighbors, "T": num_tokens, "dtype": dtype_name(dtype)}
    case.update(model=f"E={num_experts} n={num_neighbors}")
    calls = {name: functools.partial(provider, router, values, sims) for name, provider in providers.items()}
    moved = mix_bytes(num_tokens, num_experts, num_neighbors, dtype)
    use_graph = device.type == "cuda" and num_tokens <= CUDA_GRAPH_MAX_TOKENS
    return bandwidth_rows(case, calls, device, moved, cuda_graph=use_graph)


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser("bench_knn", __doc__, "CPU: E in (64, 256), n=8, T in (1, 64, 1024), float32")
    add_dtype_flag(parser)
    parser.add_argument("--tokens", type=int, nargs="+")
    parser.add_argument("--neighbors", type=int, nargs="+")
    return main_for(OP_NAME, parser, argv, run, TABLE_COLUMNS)


if __name__ == "__main__":
    raise SystemExit(main())
