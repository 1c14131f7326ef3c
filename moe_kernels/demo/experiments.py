"""The demo's experiments stage: every seed's run of the pre-registered protocol
(:mod:`moe_kernels.demo.seed_run`), each in its own one-thread process, the later stages report
and judge what they measured.

Processes: up to :data:`PER_CORE` per core run at once, so 5 seeds on 2 cores all run together
and finish in about 2.5 seed-times (run 2 at a time they would take 3: the last one alone).

Each process writes its result (JSON, checksummed, atomic) and its log under ``out/seeds``; seed
``base``'s pretrained LM is saved there too (the load-dynamics stage reads its routers). A seed
that fails or runs past :data:`SEED_TIMEOUT` fails the stage, naming the seed and the end of its
log; the others are stopped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from moe_kernels.demo.context import DemoContext
from moe_kernels.demo.protocol import PROTOCOLS, settings
from moe_kernels.demo.report import StageResult, markdown_table
from moe_kernels.demo.seed_run import RESULT_KIND, RESULT_VERSION
from moe_kernels.files import read_json
from moe_kernels.progress import Progress

SEED_TIMEOUT = 1800.0  # seconds one seed's process may run
PER_CORE = 3
POLL = 0.2


def available_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _command(ctx: DemoContext, seed: int, folder: Path) -> list[str]:
    # -c rather than -m: the package imports seed_run, and runpy warns when running a module
    # that is already imported.
    entry = "from moe_kernels.demo.seed_run import main; raise SystemExit(main())"
    command = [sys.executable, "-c", entry, "--mode", ctx.mode, "--seed", str(seed)]
    command += ["--out", str(folder / f"seed_{seed}.json"), "--device", ctx.device.type]
    if seed == ctx.seed:
        command += ["--model", str(folder / f"model_seed_{seed}.safetensors")]
    return command


def _stop(running: dict) -> None:
    """Kill the seeds still running (another seed failed, or the demo was interrupted)."""
    for process, log, _ in running.values():
        process.kill()
        process.wait()
        log.close()


def run_seeds(ctx: DemoContext, seeds: list[int], workers: int) -> tuple[list[dict], dict]:
    """Run ``seeds`` in at most ``workers`` processes at once; returns their results (in seed
    order) and each one's wall seconds."""
    folder = ctx.out / "seeds"
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    waiting, running, seconds = list(seeds), {}, {}
    with Progress(len(seeds), f"seeds ({workers} at a time)") as bar:
        try:
            while waiting or running:
                while waiting and len(running) < workers:
                    seed = waiting.pop(0)
                    log = (folder / f"seed_{seed}.log").open("w")
                    process = subprocess.Popen(
                        _command(ctx, seed, folder), stdout=log, stderr=subprocess.STDOUT, env=env
                    )
                    running[seed] = (process, log, time.perf_counter())
                for seed, (process, log, start) in list(running.items()):
                    status = process.poll()
                    elapsed = time.perf_counter() - start
                    if status is None and elapsed < SEED_TIMEOUT:
                        continue
                    del running[seed]
                    if status is None:
                        process.kill()
                        process.wait()
                    log.close()
                    if status != 0:
                        tail = (folder / f"seed_{seed}.log").read_text()[-2000:]
                        why = f"exited with {status}" if status is not None else f"ran past {SEED_TIMEOUT:g} s"
                        raise RuntimeError(f"seed {seed} {why}; the end of its log:\n{tail}")
                    seconds[seed] = elapsed
                    bar.update(status={"seed": seed, "s": elapsed})
                time.sleep(POLL)
        finally:
            _stop(running)
    runs = [
        read_json(folder / f"seed_{seed}.json", kind=RESULT_KIND, version=RESULT_VERSION, op="demo experiments")
        for seed in seeds
    ]
    return runs, seconds


def experiments_stage(ctx: DemoContext) -> StageResult:
    stage = StageResult("experiments", "Pre-registered experiments: every seed's run of the claims' protocol")
    protocol = PROTOCOLS[ctx.mode]
    seeds = [ctx.seed + i for i in range(protocol.seeds)]
    workers = max(1, min(len(seeds), PER_CORE * available_cores()))
    start = time.perf_counter()
    runs, seconds = run_seeds(ctx, seeds, workers)
    wall = time.perf_counter() - start
    ctx.results["runs"] = runs
    ctx.results["protocol"] = protocol
    ctx.results["model_path"] = ctx.out / "seeds" / f"model_seed_{ctx.seed}.safetensors"
    stage.numbers = {
        "seeds": seeds,
        "settings": {group: {n: s.to_dict() for n, s in items.items()} for group, items in settings(protocol).items()},
    }
    rows = [{"seed": run["seed"], **run["timings"], "wall": seconds[run["seed"]]} for run in runs]
    stage.timings = {"workers": workers, "wall": wall, "per_seed": rows}
    stage.tables.append(markdown_table(rows, list(rows[0])))
    stage.notes += [
        f"{len(seeds)} seeds ({seeds[0]}..{seeds[-1]}), {workers} process(es) at a time on {available_cores()} "
        "core(s), one thread each, "
        f"{wall:.0f} s in all; per seed: its pretraining, every fine-tuning arm, kNN-MoE, Counterfactual Routing "
        f"with {protocol.placebos} placebos and the digits thresholds (seconds per part below)",
        "every setting of the protocol, with its source (paper / ours) and reason, is in results.json under "
        "stages.experiments.numbers.settings and under each claim",
    ]
    return stage
