"""The ``moe-kernels`` command line: ``demo``, ``info``, ``validate`` and ``bench``."""

from __future__ import annotations

import argparse
import platform
import sys

import torch

import moe_kernels
from moe_kernels import _compat, bench_index, validation
from moe_kernels._table import format_table
from moe_kernels.utils import use_triton


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _backend_label(device: torch.device, backend: str = "auto") -> str:
    try:
        triton_path = use_triton(backend, device, "softmax_topk")
    except RuntimeError as error:
        return f"unavailable ({error})"
    if not triton_path:
        return "PyTorch: the fast CPU path" if device.type == "cpu" else "PyTorch reference"
    return "triton interpreter" if device.type == "cpu" else "triton"


def cmd_info(args) -> int:
    device = _default_device()
    rows = [
        ("moe_kernels", moe_kernels.__version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("triton", _compat.triton_version() or "not installed"),
        ("device", _device_name(device)),
        ("TRITON_INTERPRET", "1" if _compat.interpreter_enabled() else "unset"),
        ("ops' backend", f"{_backend_label(device)} for {device.type} tensors"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    if args.kernels:
        from moe_kernels import aot

        print()
        print(aot.format_table(aot.compile_all()))
    return 0


def cmd_validate(args) -> int:
    device = torch.device(args.device) if args.device else _default_device()
    print(
        f"validate on {_device_name(device)}; the ops run: {_backend_label(device, args.backend)} "
        "(k is the neighbour count n for knn_mix; fused_experts runs each model's (E, k) at H=128, "
        "I=64; weight_err is the op's main output: weights, mixed logits, marginals, expert output; "
        "16-bit fused_experts off the Triton path passes within twice plain PyTorch's error in its dtype)"
    )
    rows = validation.validate_rows(device, args.dtype, args.tokens, args.backend)
    print(format_table(rows, list(rows[0])))
    failures = sum(row["status"] != "ok" for row in rows)
    print(f"{len(rows) - failures} passed, {failures} failed")
    return 1 if failures else 0


def cmd_bench(args, extra: list[str]) -> int:
    if not bench_index.benchmarks_available():
        print(
            "moe-kernels bench: the benchmarks/ folder ships with the source tree; run from a checkout", file=sys.stderr
        )
        return 2
    names = bench_index.ALL if args.op == "all" else (args.op,)
    chosen = [bench_index.load_benchmark(name) for name in names]
    return max(bench.main(extra) for bench in chosen)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe-kernels", description=moe_kernels.__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    from moe_kernels import demo

    demo.add_arguments(commands.add_parser("demo", help="run every part of the package and write one report"))
    info = commands.add_parser("info", help="versions, device, and which backend each op uses")
    info.add_argument(
        "--kernels", action="store_true", help="compile every kernel for sm_90/sm_80 and print its resources"
    )
    validate = commands.add_parser("validate", help="check every op against its float64 reference on this device")
    validate.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    validate.add_argument("--dtype", action="append", choices=("float32", "float16", "bfloat16"))
    validate.add_argument("--tokens", type=int, nargs="+")
    validate.add_argument("--backend", default="auto", choices=("auto", "triton", "torch"))
    bench = commands.add_parser("bench", help="run the benchmark suite (other arguments pass to each op's benchmark)")
    bench.add_argument("--op", choices=("all", *bench_index.BENCHMARKS), default="all")
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":
        return cmd_bench(args, extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "demo":
        return demo.run_demo(args.out, quick=args.quick, seed=args.seed, device=args.device, stages=args.stages)
    return cmd_info(args) if args.command == "info" else cmd_validate(args)


if __name__ == "__main__":
    sys.exit(main())
