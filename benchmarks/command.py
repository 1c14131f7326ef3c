"""The command line every benchmark shares: ``python -m benchmarks.bench_<op>`` (and
``moe-kernels bench --op NAME``) takes ``--quick``, ``--device``, ``--no-write`` and ``--threads``
beside its own flags, runs, prints the environment line and the table, and appends the rows to the
op's result files (:func:`benchmarks.common.write_results`).

A benchmark's ``main`` is::

    parser = bench_parser("bench_knn", __doc__, "what --quick runs")
    parser.add_argument("--tokens", type=int, nargs="+")  # dest = a keyword of run
    return main_for(OP_NAME, parser, argv, run, TABLE_COLUMNS)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import torch

from benchmarks.common import device_label, environment, resolve_device, write_results
from moe_kernels._table import format_table

DEVICE_HELP = "cpu or cuda (default: cuda when available)"
DTYPE_CHOICES = ("float32", "float16", "bfloat16")
# Flags every benchmark's command line has: :func:`main_for` handles them, ``run`` never sees them.
SHARED_FLAGS = ("device", "no_write", "threads")


def bench_parser(module: str, doc: str, quick_help: str) -> argparse.ArgumentParser:
    """The parser of ``python -m benchmarks.<module>``, described by the first paragraph of ``doc``,
    with ``--quick`` (help: ``quick_help``); :func:`main_for` adds the shared flags last."""
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{module}", description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    return parser


def add_dtype_flag(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    """``--dtype NAME``, repeatable, into ``args.dtypes`` (None when not given)."""
    parser.add_argument("--dtype", action="append", choices=DTYPE_CHOICES, dest="dtypes", help=help)


def run_options(args: argparse.Namespace, device: torch.device) -> dict:
    """``run``'s keywords from the parsed flags: ``device``, and every flag but the shared ones under
    its ``dest`` (a benchmark names its flags' dests after ``run``'s keywords), the unset ones (None)
    left to ``run``'s defaults."""
    flags = {name: value for name, value in vars(args).items() if name not in SHARED_FLAGS and value is not None}
    return {**flags, "device": device}


def main_for(
    op_name: str,
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    run: Callable[..., list[dict]],
    columns: Sequence[str],
    *,
    device_flag: dict | None = None,
    options: Callable[[argparse.Namespace, torch.device], dict] = run_options,
) -> int:
    """The body of every benchmark's ``main``: add ``--device`` (``device_flag``: its
    ``add_argument`` keywords; default: cpu or cuda) and ``--no-write`` to ``parser``, parse
    ``argv`` (with ``--threads``, applied), then :func:`run_and_report` the rows of
    ``run(**options(args, device))`` (``options`` runs first: it may reject flags with
    ``parser.error``). Returns the exit status."""
    parser.add_argument("--device", **(device_flag or {"help": DEVICE_HELP}))
    parser.add_argument("--no-write", action="store_true", help="print the table only; write no CSV or plot")
    args = parse_args(parser, argv)  # with --threads
    device = resolve_device(args.device)
    kwargs = options(args, device)
    return run_and_report(op_name, device, lambda: run(**kwargs), columns, write=not args.no_write)


def cpu_goals_main(
    op_name: str,
    module: str,
    doc: str,
    quick_help: str,
    sections: Sequence[str],
    run: Callable[..., list[dict]],
    columns: Sequence[str],
    options: Callable[[argparse.Namespace, torch.device], dict],
    argv: Sequence[str] | None,
) -> int:
    """The ``main`` of a CPU goals benchmark (``bench_cpu``, ``bench_cpu_decode``): ``--quick``,
    ``--threads-list``, ``--sections`` (of ``sections``, default all) and :func:`main_for` with
    the device fixed to the CPU."""
    parser = bench_parser(module, doc, quick_help)
    parser.add_argument("--threads-list", type=int, nargs="+", help="thread counts to run (default: 1 and all)")
    parser.add_argument("--sections", nargs="+", choices=sections, default=list(sections))
    device_flag = {"default": "cpu", "choices": ("cpu",), "help": "the CPU goals run on the CPU"}
    return main_for(op_name, parser, argv, run, columns, device_flag=device_flag, options=options)


def add_threads_argument(parser) -> None:
    """``--threads N``: the CPU threads torch may use (default: torch's, all cores)."""
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: all cores); reported with the results",
    )


def parse_args(parser, argv: Sequence[str] | None = None):
    """``parser.parse_args(argv)`` with ``--threads`` added and applied (``torch.set_num_threads``):
    every benchmark's command line takes it."""
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    return args


def set_threads(threads: int | None) -> int:
    """Use ``threads`` CPU threads (None: leave torch's setting); returns the count in use."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def print_table(rows: Sequence[dict], columns: Sequence[str]) -> None:
    """Print ``rows`` to stdout as an aligned text table of ``columns`` (missing values as "-")."""
    print(format_table(rows, columns))


def run_and_report(
    op_name: str,
    device: torch.device,
    run_rows: Callable[[], list[dict]],
    columns: Sequence[str],
    *,
    write: bool = True,
) -> int:
    """The body of every benchmark's ``main``: print the environment line, run the benchmark,
    print its table and (with ``write``) append the rows to the op's result files. Returns 0."""
    env = environment(device)
    print(
        f"{op_name} on {device_label(env)}: torch {env['torch']}, triton {env['triton']}, "
        f"moe_kernels {env['moe_kernels']} ({env['git_commit']})"
    )
    start = time.perf_counter()
    rows = run_rows()
    print()
    # CPU rows carry their spread and the stalled samples dropped: print them with the rest.
    extra = [c for c in ("spread_pct", "stalled", "stalled_kept") if c not in columns and any(c in row for row in rows)]
    print_table(rows, [*columns, *extra])
    print(f"\n{len(rows)} measurements in {time.perf_counter() - start:.1f} s")
    if write:
        csv_path, png_path = write_results(op_name, rows, env)
        print(f"results: {csv_path}" + (f"\nplot:    {png_path}" if png_path else ""))
    return 0
