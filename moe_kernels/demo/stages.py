"""The demo's stages that check and time the ops: validation against the float64 references, and
the microbenchmarks of the fused ops against their baselines on this device."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
from pathlib import Path

from moe_kernels import validation
from moe_kernels.bench_index import load_benchmark
from moe_kernels.demo.context import DemoContext
from moe_kernels.demo.report import StageResult, markdown_table
from moe_kernels.progress import Progress

# Quick mode validates one small token count per (op, model) in float32; the full demo the
# device's whole ``validate`` table.
QUICK_VALIDATE = dict(dtypes=("float32",), tokens=(7,))
# The microbenchmarks the demo runs (each in its quick mode), by ``moe-kernels bench --op`` name.
QUICK_BENCHMARKS = ("softmax_topk", "fused_experts")
FULL_BENCHMARKS = (
    "softmax_topk",
    "knn_route",
    "probmoe",
    "fused_experts",
    "knn_retrieval",
    "knn_mix",
    "hf_moe_block",
    "hf_generate",
    "op_overhead",
)


def validation_stage(ctx: DemoContext) -> StageResult:
    stage = StageResult("validation", "Validation: every op against its float64 reference")
    options = QUICK_VALIDATE if ctx.quick else {}
    total = validation.number_of_rows(ctx.device, **options)
    with Progress(total, "validate") as bar:
        rows = validation.validate_rows(ctx.device, progress=bar.update, **options)
    failures = [row for row in rows if row["status"] != "ok"]
    ops = list(dict.fromkeys(row["op"] for row in rows))
    stage.numbers = {
        "rows": len(rows),
        "failed": len(failures),
        "max_error": {op: max(float(r["weight_err"]) for r in rows if r["op"] == op) for op in ops},
        "max_grad_error": {op: max(float(r["grad_err"]) for r in rows if r["op"] == op) for op in ops},
    }
    stage.notes.append(
        f"{len(rows) - len(failures)} of {len(rows)} (op, model, dtype, T) rows within the tolerance "
        "table of `moe_kernels.testing`; errors are the largest absolute error against float64"
    )
    stage.tables.append(markdown_table(rows, list(rows[0])))
    if failures:
        stage.status = "failed"
        stage.error = f"{len(failures)} rows out of tolerance"
    return stage


def microbenchmark_stage(ctx: DemoContext) -> StageResult:
    """Each benchmark's quick run (``moe-kernels bench --op NAME --quick``), its CSV and plot written
    under ``out/bench``; the report lists the moe_kernels rows with their speedups."""
    stage = StageResult("microbenchmarks", "Microbenchmarks of the fused ops against their baselines")
    bench_dir = ctx.out / "bench"
    shutil.rmtree(bench_dir, ignore_errors=True)
    names = QUICK_BENCHMARKS if ctx.quick else FULL_BENCHMARKS
    previous = os.environ.get("MOE_KERNELS_RESULTS_DIR")
    os.environ["MOE_KERNELS_RESULTS_DIR"] = str(bench_dir)
    log = io.StringIO()
    try:
        with Progress(len(names), "benchmarks") as bar:
            for name in names:
                module = load_benchmark(name)
                with contextlib.redirect_stdout(log):
                    status = module.main(["--quick", "--device", ctx.device.type])
                if status:
                    raise RuntimeError(f"benchmark {name} exited with {status}")
                bar.update(status={"op": name})
    finally:
        if previous is None:
            os.environ.pop("MOE_KERNELS_RESULTS_DIR", None)
        else:
            os.environ["MOE_KERNELS_RESULTS_DIR"] = previous
    (ctx.out / "bench.log").write_text(log.getvalue())
    rows = _speedup_rows(bench_dir)
    stage.timings = {"rows": rows}
    speedups = sorted({key for row in rows for key in row if key.startswith("speedup_vs_")})
    columns = [
        c
        for c in ("op", "model", "T", "dtype", "direction", "median_us", *speedups)
        if any(row.get(c) is not None for row in rows)
    ]
    if rows:
        stage.tables.append(markdown_table(rows, columns))
    stage.plots = [str(png.relative_to(ctx.out)) for png in sorted(bench_dir.rglob("*.png"))]
    stage.notes.append(
        f"quick runs of {', '.join(names)} on {ctx.device.type} with {ctx.thread_count} thread(s); "
        "the moe_kernels rows with their speedups over each baseline measured in the same run "
        "(full tables in `bench.log`, CSVs and plots under `bench/`)"
    )
    return stage


def _speedup_rows(bench_dir: Path) -> list[dict]:
    """The moe_kernels rows of every CSV written, with the columns the summary shows."""
    rows = []
    for path in sorted(bench_dir.rglob("*.csv")):
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                if row.get("provider") != "moe_kernels":
                    continue
                keep = {"op": row.get("op") or path.stem}
                for key in ("model", "T", "dtype", "direction"):
                    keep[key] = row.get(key) or None
                for key, value in row.items():
                    if key == "median_us" or key.startswith("speedup_vs_"):
                        keep[key] = float(value) if value not in (None, "") else None
                rows.append(keep)
    return rows
