"""``moe-kernels demo``: one command that runs every part of the package on this device, on text
that ships with Python, and writes one report (``report.md``, ``results.json``, the PNGs) into
``--out``.

Stages, in order (each a function of the shared :class:`DemoContext`):

1. validation: every op against its float64 references on this device;
2. experiments: the claims' pre-registered protocol (:mod:`moe_kernels.demo.protocol`) run once
   per seed, seeds in parallel processes (:mod:`moe_kernels.demo.seed_run`);
3. language model: the seeds' small character-level MoE LMs, pretrained on standard-library
   source code with rare English prose;
4. distribution shift (source code -> English prose): zero-shot, kNN-MoE, router and full
   fine-tuning, ProbMoE exact-k and dynamic-k, top-1, Counterfactual Routing against placebos;
5. load dynamics: the bifurcation model, the trained routers' load, the collapse threshold per seed;
6. microbenchmarks of the fused ops against their baselines;

then the claims table: each paper's claim, its criterion, the estimate across seeds with its
one-sided 95% interval, and a verdict (supported, not supported, inconclusive, not testable),
with every seed's numbers under it.

A stage that fails is reported as failed (with its error) and the others still run (those that
need its results report that); the exit code is 1 if any failed. ``--quick`` runs a small version
of every stage (the test suite runs it). For a given seed the numbers are the same run to run
(timings aside): the CPU stages and every seed's process run on one thread, where torch's
kernels are deterministic.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from moe_kernels.demo.context import DemoContext
from moe_kernels.demo.dynamics_stage import dynamics_stage
from moe_kernels.demo.experiments import experiments_stage
from moe_kernels.demo.lm_stage import language_model_stage
from moe_kernels.demo.report import StageResult, environment, write_outputs
from moe_kernels.demo.shift import shift_stage
from moe_kernels.demo.stages import microbenchmark_stage, validation_stage

Stage = Callable[[DemoContext], StageResult]
STAGES: tuple[tuple[str, Stage], ...] = (
    ("validation", validation_stage),
    ("experiments", experiments_stage),
    ("language_model", language_model_stage),
    ("distribution_shift", shift_stage),
    ("load_dynamics", dynamics_stage),
    ("microbenchmarks", microbenchmark_stage),
)


def run_demo(
    out: str | Path,
    *,
    quick: bool = False,
    seed: int = 0,
    device: str | None = None,
    stages: Sequence[str] | None = None,
) -> int:
    """Run the demo's stages (``stages``: a subset by name) and write the report into ``out``;
    returns the exit code (0 when every stage passed)."""
    unknown = sorted(set(stages or ()) - {name for name, _ in STAGES})
    if unknown:
        raise ValueError(f"run_demo: unknown stages {unknown}; the stages are {[name for name, _ in STAGES]}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ctx = DemoContext(out=out, device=device, quick=quick, seed=seed)
    results = []
    with ctx.threads():
        env = environment(device, seed, quick)
        for name, stage_fn in STAGES:
            if stages and name not in stages:
                continue
            _seed_everything(seed)
            start = time.perf_counter()
            try:
                result = stage_fn(ctx)
            except Exception as error:  # a failed stage is reported; the others still run
                result = StageResult(name, name, status="failed", error=f"{type(error).__name__}: {error}")
                result.notes.append("traceback:\n\n```\n" + traceback.format_exc() + "```")
            result.seconds = time.perf_counter() - start
            results.append(result)
            print(f"demo: {result.title}: {result.status} ({result.seconds:.1f} s)")
    json_path, md_path = write_outputs(out, env, results)
    print(f"demo: wrote {md_path} and {json_path}")
    return 0 if all(result.status == "ok" for result in results) else 1


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe-kernels demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_demo(args.out, quick=args.quick, seed=args.seed, device=args.device, stages=args.stages)


def writable_folder(text: str) -> str:
    """argparse ``type`` of an output folder: made if missing, and a file can be written in it (a
    one-line usage error otherwise, before any stage runs)."""
    try:
        Path(text).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=text):
            pass
    except OSError as error:
        raise argparse.ArgumentTypeError(f"cannot write in {text!r} ({error.strerror or error})") from None
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a small version of every stage (a few minutes on a CPU)")
    parser.add_argument(
        "--out", default="demo_out", type=writable_folder, help="the report's folder (default: ./demo_out)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    names = [name for name, _ in STAGES]
    parser.add_argument(
        "--stages", nargs="+", choices=names, metavar="STAGE", help=f"run only these stages, in order: {names}"
    )
