"""Shared benchmark harness: the environment record, timers, a measured bandwidth roofline, and the
result files every op's benchmark writes.

A benchmark produces *rows*, flat dicts with one measurement each, and hands them to
:func:`write_results`, which appends them in long format, beside the environment that produced
them, to ``<results root>/<device slug>/<op>.csv`` and draws time-vs-tokens plots. The results
root is ``benchmarks/results`` unless the ``MOE_KERNELS_RESULTS_DIR`` environment variable (or
``write_results``'s ``results_dir``) names another.
"""

from __future__ import annotations

import csv
import functools
import math
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from moe_kernels.demo.report import software_versions, utc_now

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR_ENV = "MOE_KERNELS_RESULTS_DIR"
DEFAULT_RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

# Quantiles asked of triton.testing (median first, as the rows list them).
QUANTILES = (0.5, 0.2, 0.8)
# CPU wall-clock timer: time spent per measurement, and the fewest timed calls.
CPU_TARGET_S = 0.2
CPU_MIN_REPS = 5
CPU_WARMUP_CALLS = 3
# A CPU sample is *stalled* when the process's threads spent more than STALL_SHARE of its wall
# time (and more than STALL_MIN_US) runnable but off the CPU: another process held the cores,
# e.g. an OpenMP thread waited a whole scheduler quantum (~4-8 ms) for a descheduled partner, so
# the sample measures the scheduler, not the op. Linux reports that wait per thread
# (/proc/self/task/*/schedstat); elsewhere the process's CPU time against its wall time stands in
# (it misses a thread spinning while its partner waits). Stalled samples are dropped and
# re-measured, up to STALL_BUDGET times the target time; the count is reported. A sample spans at
# least SAMPLE_MIN_S (back-to-back calls), so that reading the counters costs little.
STALL_SHARE = 0.25
STALL_MIN_US = 300.0
STALL_BUDGET = 4.0
SAMPLE_MIN_S = 0.5e-3
# Bandwidth probe sizes: far larger than any cache, so the copy streams from memory.
CUDA_COPY_BYTES = 1 << 30
CPU_COPY_BYTES = 64 << 20


def device_label(env: dict) -> str:
    """The device of a run in words: the GPU's name, or ``"<cpu model> (CPU, N threads)"``."""
    if env["device_slug"].startswith("cpu-"):
        return f"{env['device_name']} (CPU, {env['torch_threads']} threads)"
    return env["device_name"]


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device to benchmark on: ``device`` if given, else CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def slugify(text: str) -> str:
    """Lower-case ``text`` with every run of characters other than ``[a-z0-9]`` turned into one
    ``-``: a name safe for a folder on any filesystem."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def environment(device: str | torch.device | None = None) -> dict:
    """What produced a run: a dict of ``device_name``, ``device_slug`` (the results folder),
    ``torch``, ``triton`` ("none" when not installed), ``python`` and ``moe_kernels`` versions,
    ``git_commit`` (short hash, "-dirty" when the tree has changes, "unknown" without git),
    ``date_utc`` (ISO 8601, seconds) and ``torch_threads`` (CPU timings depend on it, and on
    whatever else shares those cores)."""
    device = resolve_device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        slug = slugify(name)
    else:
        name = _cpu_model()
        slug = "cpu-" + slugify(name)
    return {
        "device_name": name,
        "device_slug": slug,
        **software_versions(),
        "git_commit": _git_commit(),
        "date_utc": utc_now(),
        "torch_threads": torch.get_num_threads(),
    }


def _cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _git_commit() -> str:
    """Short HEAD hash of the repository, "-dirty" when files outside the results differ from it
    or are new; "unknown" when git is missing or this is no checkout."""
    try:
        head = _git("rev-parse", "--short", "HEAD")
        # --no-optional-locks: plain `git status` may rewrite the index, racing anyone else's git
        # command in this checkout. Results are excluded so that the files an earlier run wrote do
        # not mark the tree dirty; any other new or changed file does.
        changes = _git("--no-optional-locks", "status", "--porcelain", "--", ".", ":(exclude)benchmarks/results")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if changes else "")


def _git(*args: str) -> str:
    """stdout of ``git *args`` run in the repository root, stripped; raises on failure."""
    result = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=30)
    return result.stdout.strip()


def time_fn(fn: Callable[[], object], *, device: torch.device, cuda_graph: bool = False) -> dict:
    """Time ``fn()`` on ``device``; returns ``median_us``, ``p20_us``, ``p80_us`` and ``timer``.

    ``timer`` names the method: ``"cudagraph"`` (``triton.testing.do_bench_cudagraph``: calls
    replayed from one CUDA graph, so launch overhead is excluded), ``"do_bench"``
    (``triton.testing.do_bench``: one launch per call, L2 flushed in between),
    ``"do_bench:graph-failed"`` (a graph was asked for but ``fn`` could not be captured, e.g. it
    synchronises), or ``"wall"`` (CPU: ``time.perf_counter`` around each call).
    """
    if device.type == "cuda":
        return _time_cuda(fn, cuda_graph)
    return _time_wall(fn)


def warm_up(fn: Callable[[], object], device: torch.device) -> object:
    """Call ``fn`` once outside any timing (it compiles, autotunes and fills caches) and wait for
    it: graph timing runs on a side stream. Returns its output."""
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out


def _time_cuda(fn: Callable[[], object], cuda_graph: bool) -> dict:
    """:func:`time_fn` on CUDA (``quantiles=`` gives a list on triton 3.x, 3.6 to 3.9 included)."""
    import triton.testing

    timer = "do_bench"
    if cuda_graph:
        try:
            return _timing(triton.testing.do_bench_cudagraph(fn, quantiles=list(QUANTILES)), "cudagraph")
        except Exception as exc:  # capture errors surface as RuntimeError or torch's CUDA errors
            print(f"  note: CUDA graph capture failed ({type(exc).__name__}: {exc}); timing with do_bench")
            timer = "do_bench:graph-failed"
    return _timing(triton.testing.do_bench(fn, quantiles=list(QUANTILES)), timer)


def _time_wall(fn: Callable[[], object]) -> dict:
    """:func:`time_fn` on the CPU: a few warm-up calls (which also estimate the per-call time),
    then samples of back-to-back calls (each at least ``SAMPLE_MIN_S``) filling about
    ``CPU_TARGET_S``, at least ``CPU_MIN_REPS``, stalled ones (see :func:`stalled`) dropped and
    re-measured. Adds ``stalled`` (samples dropped), ``stalled_kept`` (stalled samples kept
    because the host never freed up) and ``spread_pct`` ((p80 - p20) / median) to the row
    fields."""
    per_call = math.inf
    for _ in range(CPU_WARMUP_CALLS):
        start = time.perf_counter()
        fn()
        per_call = min(per_call, time.perf_counter() - start)
    calls = max(1, math.ceil(SAMPLE_MIN_S / max(per_call, 1e-7)))
    reps = max(CPU_MIN_REPS, math.ceil(CPU_TARGET_S / max(per_call * calls, 1e-7)))
    samples_ms, dropped, kept = cpu_samples(fn, reps, calls, expected_s=per_call)
    deciles = statistics.quantiles(samples_ms, n=10, method="inclusive") if len(samples_ms) > 1 else samples_ms * 9
    timing = _timing([statistics.median(samples_ms), deciles[1], deciles[7]], "wall")
    timing["stalled"] = dropped
    timing["stalled_kept"] = kept
    timing["spread_pct"] = 100 * (timing["p80_us"] - timing["p20_us"]) / timing["median_us"]
    return timing


def run_queue_wait_s() -> float | None:
    """Seconds this process's threads have spent runnable but waiting for a CPU (the sum of the
    second field of every ``/proc/self/task/*/schedstat``), or None where it is not reported."""
    total = 0
    try:
        for task in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{task}/schedstat") as f:
                    total += int(f.read().split()[1])
            except FileNotFoundError:  # a thread that just ended
                continue
    except (OSError, IndexError, ValueError):
        return None
    return total * 1e-9


def stalled(wall_s: float, cpu_s: float, waited_s: float | None = None) -> bool:
    """Whether a sample of ``wall_s`` seconds was stalled: its threads waited for a CPU
    (``waited_s``, from :func:`run_queue_wait_s`) for more than ``STALL_SHARE`` of it and more
    than ``STALL_MIN_US``; without that counter, the process used less CPU (``cpu_s``, all its
    threads) than its wall time by as much (a running op keeps at least one core busy)."""
    idle = waited_s if waited_s is not None else wall_s - cpu_s
    return idle > STALL_SHARE * wall_s and idle * 1e6 > STALL_MIN_US


def cpu_samples(
    fn: Callable[[], object], reps: int, calls: int = 1, expected_s: float | None = None
) -> tuple[list[float], int, int]:
    """``(samples, dropped, kept)``: ``reps`` unstalled samples of ``calls`` back-to-back calls
    of ``fn`` each, in milliseconds per call, and how many stalled samples were dropped. When
    stalls persist past ``STALL_BUDGET`` times the expected time (``expected_s`` per call, else
    the first sample's), ``kept`` stalled samples complete the ``reps`` (the host was busy the
    whole time: the row then times the scheduler as much as the op, and says so)."""
    clean, stalls = [], []
    budget = None if expected_s is None else STALL_BUDGET * reps * calls * expected_s
    while len(clean) < reps:
        waited = run_queue_wait_s()
        cpu_start = time.process_time()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        wall = time.perf_counter() - start
        cpu = time.process_time() - cpu_start
        if waited is not None:
            waited = run_queue_wait_s() - waited
        (stalls if stalled(wall, cpu, waited) else clean).append(wall / calls * 1e3)
        if budget is None:
            budget = STALL_BUDGET * reps * wall
        budget -= wall
        if budget < 0 and len(clean) + len(stalls) >= reps:
            kept = stalls[: reps - len(clean)]
            return clean + kept, len(stalls) - len(kept), len(kept)
    return clean, len(stalls), 0


def _timing(ms: Sequence[float], timer: str) -> dict:
    """Row fields from ``[median, p20, p80]`` in milliseconds."""
    median, p20, p80 = (float(v) * 1e3 for v in ms)
    return {"median_us": median, "p20_us": p20, "p80_us": p80, "timer": timer}


@functools.cache
def measured_bandwidth_gbs(device: torch.device) -> float:
    """Memory bandwidth of ``device`` in GB/s (1e9 bytes), counting bytes read plus written by a
    device-to-device copy of 1 GiB (CUDA) or 64 MiB (CPU); measured once per process and device.

    This is the roofline the benchmarks' "% of bandwidth" refers to: what a copy reaches on this
    very machine, rather than a datasheet number no kernel attains.
    """
    nbytes = CUDA_COPY_BYTES if device.type == "cuda" else CPU_COPY_BYTES
    median_us = _copy_time_us(nbytes, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the copy's buffers are freed on return; give the memory back
    return 2 * nbytes / median_us / 1e3


@functools.cache
def measured_gemm_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Dense matmul rate of ``device`` in TFLOP/s for ``dtype`` inputs: one square
    ``torch.matmul`` (8192 on CUDA, 1024 on CPU), measured once per process. The roofline the
    grouped GEMM benchmarks' "% of dense GEMM" refers to."""
    size = 8192 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    median_us = time_fn(lambda: torch.matmul(a, b), device=device)["median_us"]
    return 2 * size**3 / median_us / 1e6


def _copy_time_us(nbytes: int, device: torch.device) -> float:
    """Median time of one device-to-device copy of ``nbytes``."""
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return time_fn(lambda: dst.copy_(src), device=device)["median_us"]


def results_root(results_dir: str | os.PathLike | None = None) -> Path:
    """Where results go: ``results_dir``, else ``$MOE_KERNELS_RESULTS_DIR``, else
    ``benchmarks/results`` in this repository."""
    return Path(results_dir or os.environ.get(RESULTS_DIR_ENV) or DEFAULT_RESULTS_DIR)


def write_results(
    op_name: str, rows: Sequence[dict], env: dict, results_dir: str | os.PathLike | None = None
) -> tuple[Path, Path | None]:
    """Append ``rows`` (each prefixed with every ``env`` field) to
    ``<results root>/<env["device_slug"]>/<op_name>.csv`` and plot them to ``<op_name>.png`` there.

    Plots take the rows with ``provider``, ``T`` and ``median_us``, one panel per ``model`` (or
    ``panel``, for benchmarks not over models; and per ``dtype`` when a run has several). Returns
    ``(csv_path, png_path)``; ``png_path`` is None when matplotlib is not installed or no row can
    be plotted.
    """
    out_dir = results_root(results_dir) / env["device_slug"]
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"{op_name}.csv"
    _append_csv(csv_path, [{**env, **row} for row in rows])
    title = f"{op_name} on {device_label(env)}  ({env['git_commit']}, {env['date_utc']})"
    png_path = _plot(out_dir / f"{op_name}.png", rows, title)
    return csv_path, png_path


def _columns(records: Iterable[dict]) -> list[str]:
    """Every key of ``records``, in order of first appearance."""
    return list(dict.fromkeys(key for record in records for key in record))


def _append_csv(path: Path, records: Sequence[dict]) -> None:
    """Append ``records`` to the CSV at ``path``, creating it with a header when new. When the
    records bring a column the header lacks (a field added since earlier runs), the file is
    rewritten with the widened header so every row stays readable by name."""
    old_columns, old_rows = [], []
    if path.exists():
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            old_rows = list(reader)
            old_columns = list(reader.fieldnames or [])
    columns = old_columns + [c for c in _columns(records) if c not in old_columns]
    rewrite = columns != old_columns
    with path.open("w" if rewrite else "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        if rewrite:
            writer.writeheader()
            writer.writerows(old_rows)
        writer.writerows({key: _csv_value(value) for key, value in record.items()} for record in records)


def _csv_value(value):
    """Floats to 6 significant digits (timer noise is far larger); None to an empty cell."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


PLOT_FIELDS = ("provider", "T", "median_us")


def _panel_label(row: dict, several_dtypes: bool) -> str:
    label = str(row.get("model") or row.get("panel") or row.get("op", ""))
    return f"{label} {row['dtype']}" if several_dtypes else label


def _plot(path: Path, rows: Sequence[dict], title: str) -> Path | None:
    """Median time vs tokens, log-log, one line per provider and one panel per model (or
    ``panel``; and dtype, when the rows hold several); returns ``path``, or None without
    matplotlib or without a plottable row."""
    rows = [row for row in rows if all(row.get(field) is not None for field in PLOT_FIELDS)]
    if not rows:
        return None
    try:
        from matplotlib.figure import Figure  # a bare Figure renders with Agg, no pyplot state
    except ImportError:
        print("matplotlib is not installed: no plot written (pip install matplotlib)")
        return None
    several_dtypes = len({row.get("dtype") for row in rows}) > 1
    panels: dict[str, list[dict]] = {}
    for row in rows:
        panels.setdefault(_panel_label(row, several_dtypes), []).append(row)
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.4 * nrows + 0.8))
    axes = list(fig.subplots(nrows, ncols, squeeze=False).flat)
    # One colour per provider in every panel, and one legend entry each (panels may show different
    # providers: the legend of the first alone would name the others' lines wrongly).
    colors = {provider: f"C{i % 10}" for i, provider in enumerate(dict.fromkeys(row["provider"] for row in rows))}
    legend = {}
    for ax, (label, panel_rows) in zip(axes, panels.items()):
        for provider in dict.fromkeys(row["provider"] for row in panel_rows):
            points = sorted((row["T"], row["median_us"]) for row in panel_rows if row["provider"] == provider)
            (line,) = ax.plot(*zip(*points), marker="o", markersize=3, label=provider, color=colors[provider])
            legend.setdefault(provider, line)
        ax.set(xscale="log", yscale="log", title=label, xlabel="tokens T", ylabel="median time (us)")
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[len(panels) :]:  # the grid's unused panels
        ax.set_axis_off()
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=len(legend))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    return path
