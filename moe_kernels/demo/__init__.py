"""``moe-kernels demo``: one command that runs every part of the package on this device and writes
one report (``report.md``, ``results.json``, the PNGs) into ``--out``.

Each stage runs in turn; a stage that fails is reported as failed (with its error) and the others
still run; the exit code is 1 if any failed. ``--quick`` runs a small version of every stage (the
test suite runs it).
"""

from __future__ import annotations

import argparse
import random
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from moe_kernels.demo.report import StageResult, environment, write_outputs
from moe_kernels.demo.stages import microbenchmark_stage, validation_stage

Stage = Callable[[Path, torch.device, bool, int], StageResult]
STAGES: tuple[tuple[str, Stage], ...] = (
    ("validation", validation_stage),
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
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    env = environment(device, seed, quick)
    results = []
    for name, stage_fn in STAGES:
        if stages and name not in stages:
            continue
        _seed_everything(seed)
        start = time.perf_counter()
        try:
            result = stage_fn(out, device, quick, seed)
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
    return run_demo(args.out, quick=args.quick, seed=args.seed, device=args.device)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a small version of every stage (a few minutes on a CPU)")
    parser.add_argument("--out", default="demo_out", help="the report's folder (default: ./demo_out)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
