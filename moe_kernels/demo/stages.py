"""The demo's stages that check and time the ops: validation against the float64 references, and
the microbenchmarks of the fused ops against their baselines on this device."""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import sys
from pathlib import Path

import torch

from moe_kernels import validation
from moe_kernels.demo.report import StageResult, markdown_table
from moe_kernels.progress import Progress

# Quick mode validates one small token count per (op, model) in float32; the full demo the
# device's whole ``validate`` table.
QUICK_VALIDATE = dict(dtypes=("float32",), tokens=(7,))
# The microbenchmarks the demo runs, in quick mode, by ``moe-kernels bench --op`` name.
QUICK_BENCHMARKS = ("softmax_topk", "knn_route", "probmoe", "fused_experts", "knn_retrieval")
FULL_BENCHMARKS = QUICK_BENCHMARKS + ("knn_mix", "hf_moe_block", "hf_generate", "op_overhead")


def validation_stage(out: Path, device: torch.device, quick: bool, seed: int) -> StageResult:
    stage = StageResult("validation", "Validation: every op against its float64 reference")
    options = QUICK_VALIDATE if quick else {}
    total = validation.number_of_rows(device, **options)
    with Progress(total, "validate") as bar:
        rows = validation.validate_rows(device, progress=bar.update, **options)
    failures = [row for row in rows if row["status"] != "ok"]
    stage.numbers = {
        "rows": len(rows),
        "failed": len(failures),
        "max_error": {
            op: max(float(r["weight_err"]) for r in rows if r["op"] == op)
            for op in dict.fromkeys(row["op"] for row in rows)
        },
        "max_grad_error": {
            op: max(float(r["grad_err"]) for r in rows if r["op"] == op)
            for op in dict.fromkeys(row["op"] for row in rows)
        },
    }
    stage.notes.append(
        f"{len(rows) - len(failures)} of {len(rows)} (op, model, dtype, T) rows within the tolerance "
        "table of `moe_kernels.testing`"
    )
    stage.tables.append(markdown_table(rows, list(rows[0])))
    if failures:
        stage.status = "failed"
        stage.error = f"{len(failures)} rows out of tolerance"
    return stage


def microbenchmark_stage(out: Path, device: torch.device, quick: bool, seed: int) -> StageResult:
    """Each benchmark's quick run (``moe-kernels bench --op NAME --quick``), its CSV and plot written
    under ``out/bench``; the report lists the speedups it measured."""
    stage = StageResult("microbenchmarks", "Microbenchmarks of the fused ops against their baselines")
    repo_root = Path(__file__).resolve().parents[2]
    if not (repo_root / "benchmarks" / "common.py").is_file():
        stage.status, stage.error = "failed", "the benchmarks/ folder ships with the source tree; run from a checkout"
        return stage
    from moe_kernels.cli import BENCHMARKS

    sys.path.insert(0, str(repo_root))
    bench_dir = out / "bench"
    names = QUICK_BENCHMARKS if quick else FULL_BENCHMARKS
    previous = os.environ.get("MOE_KERNELS_RESULTS_DIR")
    os.environ["MOE_KERNELS_RESULTS_DIR"] = str(bench_dir)
    log = io.StringIO()
    try:
        with Progress(len(names), "benchmarks") as bar:
            for name in names:
                module = importlib.import_module(f"benchmarks.{BENCHMARKS[name]}")
                with contextlib.redirect_stdout(log):
                    status = module.main(["--quick", "--device", device.type])
                if status:
                    raise RuntimeError(f"benchmark {name} exited with {status}")
                bar.update(op=name)
    finally:
        if previous is None:
            os.environ.pop("MOE_KERNELS_RESULTS_DIR", None)
        else:
            os.environ["MOE_KERNELS_RESULTS_DIR"] = previous
    (out / "bench.log").write_text(log.getvalue())
    stage.timings = {"benchmarks": list(names)}
    for png in sorted(bench_dir.rglob("*.png")):
        stage.plots.append(str(png.relative_to(out)))
    stage.notes.append(
        f"quick runs of {', '.join(names)} on {device.type}; tables in `bench.log`, CSVs and plots under `bench/`"
    )
    return stage
