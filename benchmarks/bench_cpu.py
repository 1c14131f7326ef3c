"""The CPU goals (each op on the CPU against the PyTorch it replaces), each row a ratio measured in
this run, at 1 thread and at all threads.

Rows (``moe-kernels bench --op cpu``):

- ``op boundary``: the eager per-call cost of every op's boundary (checks, backend choice,
  autograd), its forward stubbed out (``bench_overhead``): at most 10 us, 25 us with autograd;
- ``softmax_topk``: every registry shape, T in {1, 64, 1024, 16384}, against the fastest
  plain-PyTorch chain giving the same result: at least 1.0x;
- ``knn_mix`` / ``knn_route``: against the plain gather + mix (+ route) chain: at least 1.0x;
- ``exact_k``: forward at least 1.0x, forward + backward at least 5x ProbMoE's autograd DP;
- ``fused_experts``: forward and forward + backward, H = 512, I = 256, at least 1.2x transformers'
  eager experts loop and 1.0x its ``grouped_mm`` experts;
- ``hf_model``: the six families, tiny (hidden 32) and mid-size (hidden 512): greedy generation
  and one training step, at least 1.1x HF eager, same tokens, same loss.

Timing: providers are timed interleaved, round by round (a load change hits them alike); each
round's sample is checked for stalls (threads waiting for a CPU: ``benchmarks.common.stalled``)
and re-measured; a row gives the median of the per-round ratios and their min-max (``spread``)
and the stalled samples. On a loaded 2-core host the all-threads rows stall often: read them
with their ``stalled`` count.

    python -m benchmarks.bench_cpu --quick
    python -m benchmarks.bench_cpu --threads-list 1 2 --sections softmax_topk exact_k
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence

import torch

from benchmarks import cpu_points
from benchmarks.command import cpu_goals_main
from benchmarks.common import cpu_samples
from benchmarks.cpu_points import OURS, Point

OP_NAME = "cpu"
SECTIONS = ("boundary", "softmax_topk", "knn", "exact_k", "fused_experts", "hf_model")
TABLE_COLUMNS = (
    "threads",
    "goal",
    "case",
    "ours_us",
    "baseline",
    "baseline_us",
    "ratio",
    "spread",
    "target",
    "met",
    "stalled",
)
ROUNDS = 5
POINT_TARGET_S = 0.6  # timed seconds per provider and point (over all rounds)
SLOW_POINT_S = 60.0  # a point whose providers take longer than this per round gets 2 rounds
QUICK = dict(
    routing_shapes=("Mixtral-8x7B", "OLMoE-1B-7B", "DeepSeek-V3"),
    routing_tokens=(1, 1024),
    knn_tokens=(1, 1024),
    probmoe_shapes=((64, 8),),
    probmoe_forward=(1, 1024),
    probmoe_training=(1024,),
    expert_shapes=(("OLMoE-like", 64, 8),),
    expert_tokens=(1, 256),
    hf_families=("mixtral", "olmoe"),
)


def compare(calls: dict, rounds: int = ROUNDS, target_s: float = POINT_TARGET_S) -> dict:
    """Interleaved timing: provider -> ``{"rounds": us per call in each round, "us": their
    median, "stalled": stalled samples (dropped or kept)}``."""
    per_call = {}
    for name, call in calls.items():
        call()  # warm-up: first-call costs, allocator, caches
        start = time.perf_counter()
        call()
        per_call[name] = max(time.perf_counter() - start, 1e-7)
    if sum(per_call.values()) > SLOW_POINT_S / ROUNDS:
        rounds = min(rounds, 2)
    repeats = {name: max(1, math.ceil(target_s / rounds / t)) if t < target_s else 1 for name, t in per_call.items()}
    times = {name: [] for name in calls}
    stalls = dict.fromkeys(calls, 0)
    for _ in range(rounds):
        for name, call in calls.items():
            samples, dropped, kept = cpu_samples(call, 1, repeats[name], expected_s=per_call[name])
            times[name].append(samples[0] * 1e3)
            stalls[name] += dropped + kept
    return {name: {"rounds": t, "us": statistics.median(t), "stalled": stalls[name]} for name, t in times.items()}


def goal_rows(point: Point, threads: int, rounds: int = ROUNDS) -> list[dict]:
    """Time ``point`` and return its goal rows (one per target)."""
    measured = compare(point.calls, rounds)
    ours = measured[OURS]
    rows = []
    for baselines, target in point.targets.items():
        names = baselines if isinstance(baselines, tuple) else (baselines,)
        # Per round, the fastest of the baselines (the chains that give the op's result).
        fastest = [min(measured[n]["rounds"][r] for n in names) for r in range(len(ours["rounds"]))]
        ratios = [b / o for b, o in zip(fastest, ours["rounds"])]
        best = min(names, key=lambda n: measured[n]["us"])
        ratio = statistics.median(ratios)
        rows.append(
            {
                "op": OP_NAME,
                "threads": threads,
                "goal": point.goal,
                "case": point.case,
                "T": point.tokens,
                "ours_us": ours["us"],
                "baseline": best,
                "baseline_us": measured[best]["us"],
                "ratio": ratio,
                "spread": f"{min(ratios):.2f}-{max(ratios):.2f}",
                "target": f">= {target}x",
                "met": ratio >= target,
                "stalled": ours["stalled"] + sum(measured[n]["stalled"] for n in names),
            }
        )
    return rows


def boundary_rows(threads: int) -> list[dict]:
    """The op boundary's per-call cost, stubbed forward (``bench_overhead``): 10 us, 25 us with
    autograd."""
    from benchmarks import bench_overhead

    rows = []
    for row in bench_overhead.run(device="cpu"):
        target = {"public": 10.0, "public_autograd": 25.0}.get(row["provider"])
        if target is None:
            continue
        rows.append(
            {
                "op": OP_NAME,
                "threads": threads,
                "goal": "op boundary" + (" (autograd)" if row["provider"] == "public_autograd" else ""),
                "case": row["op_name"],
                "T": row["T"],
                "ours_us": row["boundary_us"],
                "target": f"<= {target:g} us",
                "met": row["boundary_us"] <= target,
            }
        )
    return rows


def hf_model_rows(threads: int, families: Sequence[str] | None, widths: Sequence[int]) -> list[dict]:
    """Generation and one training step of each family, tiny and mid-size, patched against HF."""
    from benchmarks import bench_hf_generate

    rows = []
    for width in widths:
        measured = bench_hf_generate.run(
            device="cpu",
            families=families,
            width=width,
            batches=(2,),
            new_tokens=16,
            train=True,
            baselines=("hf_eager", "hf_grouped_mm"),
            repeats=ROUNDS,
        )
        by_key = {(r["family"], r["task"], r["provider"]): r for r in measured}
        for (family, task, provider), row in by_key.items():
            if provider != OURS:
                continue
            for baseline, target in (("hf_eager", 1.1), ("hf_grouped_mm", None)):
                base_row = by_key[(family, task, baseline)]
                ratio = base_row["median_us"] / row["median_us"]
                same = row.get("same_tokens") if task == "generate" else row.get("loss_diff")
                rows.append(
                    {
                        "op": OP_NAME,
                        "threads": threads,
                        "goal": f"hf_model {task}",
                        "case": f"{family} hidden={row['hidden']} "
                        + (f"same_tokens={same:.2f}" if task == "generate" else f"loss_diff={same:.1e}"),
                        "T": row["T"],
                        "ours_us": row["median_us"],
                        "baseline": baseline,
                        "baseline_us": base_row["median_us"],
                        "ratio": ratio,
                        "spread": row["spread"] if baseline == "hf_eager" else None,
                        "target": f">= {target}x" if target else "(reported)",
                        "met": ratio >= target if target else None,
                    }
                )
    return rows


def run(
    *, quick: bool = False, threads_list: Sequence[int] | None = None, sections: Sequence[str] = SECTIONS
) -> list[dict]:
    """Every goal row of ``sections``, at each thread count of ``threads_list`` (default: 1 and
    all of torch's)."""
    all_threads = torch.get_num_threads()
    threads_list = threads_list or sorted({1, all_threads})
    rows = []
    for threads in threads_list:
        torch.set_num_threads(threads)
        print(f"-- {threads} thread(s)")
        for section in sections:
            start = time.perf_counter()
            section_rows = _section(section, quick, threads)
            rows += section_rows
            print(f"   {section}: {len(section_rows)} rows in {time.perf_counter() - start:.0f} s", flush=True)
    torch.set_num_threads(all_threads)
    _summary(rows)
    return rows


def _section(section: str, quick: bool, threads: int) -> list[dict]:
    if section == "boundary":
        return boundary_rows(threads)
    if section == "hf_model":
        return hf_model_rows(threads, QUICK["hf_families"] if quick else None, (1,) if quick else (1, 16))
    points = _points(section, quick)
    return [row for point in points for row in goal_rows(point, threads)]


def _points(section: str, quick: bool):
    from moe_kernels.shapes import ROUTING_SHAPES

    if section == "softmax_topk":
        shapes = [s for s in ROUTING_SHAPES if not quick or s.model in QUICK["routing_shapes"]]
        return cpu_points.routing_points(shapes, QUICK["routing_tokens"] if quick else cpu_points.ROUTING_TOKENS)
    if section == "knn":
        return cpu_points.knn_points(QUICK["knn_tokens"] if quick else cpu_points.KNN_TOKENS)
    if section == "exact_k":
        if quick:
            return cpu_points.probmoe_points(
                QUICK["probmoe_shapes"], QUICK["probmoe_forward"], QUICK["probmoe_training"]
            )
        return cpu_points.probmoe_points()
    if section == "fused_experts":
        if quick:
            return cpu_points.expert_points(QUICK["expert_shapes"], QUICK["expert_tokens"])
        return cpu_points.expert_points()
    raise ValueError(f"bench_cpu: unknown section {section!r}; the sections are {SECTIONS}")


def _summary(rows: list[dict]) -> None:
    judged = [row for row in rows if row.get("met") is not None]
    missed = [row for row in judged if not row["met"]]
    print(f"\n{len(judged) - len(missed)} of {len(judged)} goal rows met")
    for row in missed:
        ratio = f"{row['ratio']:.2f}x" if row.get("ratio") is not None else f"{row['ours_us']:.1f} us"
        print(f"  not met ({row['threads']} thr): {row['goal']} {row['case']}: {ratio}, target {row['target']}")


def _run_options(args, _device: torch.device) -> dict:
    """``run``'s keywords: a single ``--threads N`` is the same as ``--threads-list N``."""
    threads_list = args.threads_list or ([args.threads] if args.threads else None)
    return {"quick": args.quick, "threads_list": threads_list, "sections": args.sections}


def main(argv: Sequence[str] | None = None) -> int:
    quick_help = "a few points per section (a few minutes)"
    module = "bench_cpu"
    return cpu_goals_main(OP_NAME, module, __doc__, quick_help, SECTIONS, run, TABLE_COLUMNS, _run_options, argv)


if __name__ == "__main__":
    raise SystemExit(main())
