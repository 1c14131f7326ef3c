"""The rows of one benchmark point: each provider timed in turn on the same inputs, with the
measured-bandwidth fields of a memory-bound op and the speedups of the moe_kernels row over the
baselines."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import torch

from benchmarks.common import measured_bandwidth_gbs, time_fn, warm_up

# (column, provider): the moe_kernels row's speedup over that provider, in every op's benchmark.
SPEEDUP_BASELINES = (("speedup_vs_eager", "torch_eager"), ("speedup_vs_compile", "torch_compile"))
SPEEDUP_COLUMNS = tuple(column for column, _ in SPEEDUP_BASELINES)


def add_speedups(rows: list[dict], baselines: Sequence[tuple[str, str]] = SPEEDUP_BASELINES) -> None:
    """Set each ``(column, provider)`` of ``baselines`` (default: ``speedup_vs_eager`` /
    ``speedup_vs_compile``) to that provider's median / the moe_kernels median on the moe_kernels
    row of one benchmark point; None elsewhere or when the baseline was not measured."""
    median = {row["provider"]: row["median_us"] for row in rows}
    for row in rows:
        for column, baseline in baselines:
            measured = row["provider"] == "moe_kernels" and baseline in median
            row[column] = median[baseline] / row["median_us"] if measured else None


def bandwidth_columns(*case: str, extra: Sequence[str] = ()) -> tuple[str, ...]:
    """The table columns of a bandwidth-bound op's benchmark: ``case``, the provider, its timing,
    GB/s and % of the measured bandwidth (the rows of :func:`bandwidth_rows`), the speedups,
    ``extra``, the timer."""
    return (*case, "provider", "median_us", "p20_us", "p80_us", "gb_per_s", "pct_bw", *SPEEDUP_COLUMNS, *extra, "timer")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: the rows' ``dtype`` field."""
    return str(dtype).removeprefix("torch.")


def time_calls(
    calls: dict[str, Callable[[], object]],
    device: torch.device,
    *,
    cuda_graph: bool = False,
    uncapturable: Collection[str] = (),
    warm: bool = True,
) -> dict[str, dict]:
    """name -> :func:`time_fn` timing of each of ``calls``, one after the other, each warmed up just
    before (unless ``warm`` is False: the caller ran them already); from a CUDA graph when
    ``cuda_graph``, but for the providers named in ``uncapturable`` (host syncs cannot be
    captured)."""
    timings = {}
    for name, call in calls.items():
        if warm:
            warm_up(call, device)
        timings[name] = time_fn(call, device=device, cuda_graph=cuda_graph and name not in uncapturable)
    return timings


def bandwidth_rows(
    case: dict, calls: dict[str, Callable[[], object]], device: torch.device, moved: int, **timing_options
) -> list[dict]:
    """The rows of one point of a bandwidth-bound op: per provider of ``calls`` (timed by
    :func:`time_calls` with ``timing_options``), ``case`` (the op and the point's fields),
    ``provider``, the timing, ``bytes`` (``moved``: what the op must read and write), ``gb_per_s``,
    ``pct_bw`` and ``measured_bw_gbs`` (:func:`measured_bandwidth_gbs`), and the speedups of
    :func:`add_speedups`."""
    peak_gbs = measured_bandwidth_gbs(device)
    rows = []
    for name, timing in time_calls(calls, device, **timing_options).items():
        gb_per_s = moved / timing["median_us"] / 1e3
        bandwidth = {"bytes": moved, "gb_per_s": gb_per_s, "pct_bw": 100 * gb_per_s / peak_gbs}
        rows.append({**case, "provider": name, **timing, **bandwidth, "measured_bw_gbs": peak_gbs})
    add_speedups(rows)
    return rows
