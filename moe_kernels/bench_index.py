"""The benchmark suite's index: ``moe-kernels bench --op NAME`` -> the module of the source tree's
``benchmarks/`` folder that runs it, and :func:`load_benchmark` to import one (used by the CLI and
the demo's microbenchmark stage; the folder ships with a checkout, not with the wheel)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = {
    "softmax_topk": "bench_routing",
    "knn_mix": "bench_knn",
    "knn_route": "bench_knn_route",
    "probmoe": "bench_probmoe",
    "fused_experts": "bench_experts",
    "knn_retrieval": "bench_retrieval",
    "hf_moe_block": "bench_hf",
    "hf_generate": "bench_hf_generate",
    "op_overhead": "bench_overhead",
    "expert_parallel": "bench_expert_parallel",
    "dynamics": "bench_dynamics",
    "cor": "bench_cor",
    "replay": "bench_replay",
    # The CPU goals of every op in one table, at 1 thread and at all threads (not part of "all":
    # it re-times what the per-op benchmarks time, against CPU baselines, for minutes).
    "cpu": "bench_cpu",
    # The CPU decode goals at real layer sizes (float32 and bfloat16, minutes; not part of "all").
    "cpu_decode": "bench_cpu_decode",
}
# What ``--op all`` runs.
ALL = tuple(name for name in BENCHMARKS if name not in ("cpu", "cpu_decode"))
REPO_ROOT = Path(__file__).resolve().parent.parent


def benchmarks_available() -> bool:
    """Whether this installation sits in a source checkout with its ``benchmarks/`` folder."""
    return (REPO_ROOT / "benchmarks" / "common.py").is_file()


def load_benchmark(name: str) -> ModuleType:
    """The benchmark module of op ``name`` (a key of :data:`BENCHMARKS`), imported from the
    checkout's ``benchmarks/`` folder; ``RuntimeError`` outside a checkout."""
    if not benchmarks_available():
        raise RuntimeError("the benchmarks/ folder ships with the source tree; run from a checkout")
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    return importlib.import_module(f"benchmarks.{BENCHMARKS[name]}")
