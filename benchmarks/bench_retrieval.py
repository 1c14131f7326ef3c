"""kNN-MoE retrieval benchmark: the routing memory's exact torch search against faiss (flat,
IVF, IVF-PQ with the paper's d/8-byte codes, the same re-ranking 4n and 16n candidates exactly,
HNSW): queries per second, build time and recall@n of each approximate index against exact search.

    python -m benchmarks.bench_retrieval --quick
    python -m benchmarks.bench_retrieval --entries 10000 100000 1000000 --dims 512 2048
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from benchmarks.command import bench_parser, main_for
from benchmarks.common import resolve_device
from moe_kernels.knn import RoutingMemory, faiss_available

OP_NAME = "knn_retrieval"
# Row name -> (RoutingMemory index, index_options). "torch" runs first: the exact ground truth.
PRESETS = {
    "torch": ("torch", {}),
    "flat": ("flat", {}),
    "ivf": ("ivf", {}),
    "ivfpq": ("ivfpq", {}),
    "ivfpq_refine4": ("ivfpq", dict(refine=4)),
    "ivfpq_refine16": ("ivfpq", dict(refine=16)),
    "hnsw": ("hnsw", {}),
}
QUICK = dict(entries=(2000,), dims=(64,), queries=256)
TABLE_COLUMNS = ("N", "d", "index", "n", "build_s", "queries_per_s", "recall", "device")


def recall_at(ids: torch.Tensor, exact_ids: torch.Tensor) -> float:
    """Mean fraction of each query's exact ``n`` neighbours that ``ids`` found."""
    hits = (ids[:, :, None] == exact_ids[:, None, :]).any(dim=1).float()
    return hits.mean().item()


def _clustered(num: int, dim: int, generator: torch.Generator, centers: torch.Tensor) -> torch.Tensor:
    """Points around random centres: hidden states cluster, and uniform noise would make every
    index look equally bad."""
    picks = torch.randint(0, centers.shape[0], (num,), generator=generator)
    return centers[picks] + 0.3 * torch.randn(num, dim, generator=generator)


def run(
    *,
    quick: bool = False,
    entries: Sequence[int] | None = None,
    dims: Sequence[int] | None = None,
    num_neighbors: int = 8,
    num_queries: int | None = None,
    device=None,
    presets: Sequence[str] | None = None,
) -> list[dict]:
    """Rows of every (N, d, preset); "torch" (the exact ground truth of the recall) always runs."""
    device = resolve_device(device)
    entries = entries or (QUICK["entries"] if quick else (10_000, 100_000))
    dims = dims or (QUICK["dims"] if quick else (512, 2048))
    num_queries = num_queries or (QUICK["queries"] if quick else 4096)
    presets = ["torch", *(p for p in (presets or PRESETS) if p != "torch")] if faiss_available() else ["torch"]
    rows = []
    for dim in dims:
        for num in entries:
            generator = torch.Generator().manual_seed(num + dim)
            centers = torch.randn(64, dim, generator=generator)
            keys = _clustered(num, dim, generator, centers)
            queries = _clustered(num_queries, dim, generator, centers).to(device)
            values = torch.zeros(num, 1)
            exact_ids = None
            for preset in presets:
                index, options = PRESETS[preset]
                start = time.perf_counter()
                memory = RoutingMemory(keys, values, index=index, index_options=options)
                build_s = time.perf_counter() - start
                memory.search(queries[:8], num_neighbors)  # warm up
                start = time.perf_counter()
                ids, _ = memory.search(queries, num_neighbors)
                seconds = time.perf_counter() - start
                if exact_ids is None:
                    exact_ids = ids
                rows.append(
                    {
                        "op": OP_NAME,
                        "N": num,
                        "d": dim,
                        "index": preset,
                        "n": num_neighbors,
                        "build_s": build_s,
                        "queries_per_s": num_queries / seconds,
                        "recall": recall_at(ids, exact_ids),
                        "device": str(device),
                        "provider": preset,
                        "T": num_queries,
                        "median_us": seconds * 1e6,
                        "panel": f"N={num} d={dim}",
                    }
                )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser("bench_retrieval", __doc__, "N=2000, d=64, 256 queries")
    parser.add_argument("--entries", type=int, nargs="+")
    parser.add_argument("--dims", type=int, nargs="+")
    parser.add_argument("--neighbors", type=int, default=8, dest="num_neighbors", metavar="NEIGHBORS")
    parser.add_argument(
        "--indexes", nargs="+", choices=tuple(PRESETS), dest="presets", help="a subset of the index presets"
    )
    device_flag = {"help": "where the queries live (cpu or cuda)"}
    return main_for(OP_NAME, parser, argv, run, TABLE_COLUMNS, device_flag=device_flag)


if __name__ == "__main__":
    raise SystemExit(main())
