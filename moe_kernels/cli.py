"""The ``moe-kernels`` command line: ``demo``, ``info``, ``validate`` and ``bench``."""

from __future__ import annotations

import argparse
import importlib
import platform
import sys

import torch

import moe_kernels
from moe_kernels import _compat, bench_index, validation
from moe_kernels._table import format_table
from moe_kernels.progress import Progress
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


# The optional packages and what each brings (``info`` reports their versions).
OPTIONAL = {
    "numba": "the CPU routing's compiled pass, batch-invariant CPU experts",
    "faiss": "approximate kNN-MoE memories (else exact torch search)",
    "safetensors": "routing memory and routing record files",
    "transformers": "the Hugging Face integration",
    "matplotlib": "benchmark and demo plots",
}


def _version_of(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except ImportError:
        return "not installed"


def cmd_info(args) -> int:
    device = _default_device()
    rows = [
        ("moe_kernels", moe_kernels.__version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("triton", _compat.triton_version() or "not installed"),
        *((name, f"{_version_of(name)} ({use})") for name, use in OPTIONAL.items()),
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
    total = validation.number_of_rows(device, args.dtype, args.tokens)
    print(
        f"validate on {_device_name(device)}; the ops run: {_backend_label(device, args.backend)} "
        "(k is the neighbour count n for knn_mix; fused_experts runs each model's (E, k) at H=128, "
        "I=64; weight_err is the op's main output: weights, mixed logits, marginals, expert output; "
        "16-bit fused_experts off the Triton path passes within twice plain PyTorch's error in its dtype)"
    )
    with Progress(total, "validate") as bar:
        rows = validation.validate_rows(device, args.dtype, args.tokens, args.backend, progress=bar.update)
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


def _positive_int(text: str) -> int:
    """argparse ``type`` of a count: an int >= 1 (a one-line usage error otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {value}")
    return value


def _check_device(parser: argparse.ArgumentParser, device: str | None) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here (torch.cuda.is_available() is False)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe-kernels", description=moe_kernels.__doc__.splitlines()[0])
    versions = f"moe-kernels {moe_kernels.__version__} (torch {torch.__version__}, triton "
    parser.add_argument("--version", action="version", version=versions + f"{_compat.triton_version() or 'none'})")
    commands = parser.add_subparsers(dest="command", required=True)
    from moe_kernels import demo

    demo.add_arguments(commands.add_parser("demo", help="run every part of the package and write one report"))
    info = commands.add_parser("info", help="versions, device, and which backend each op uses")
    info.add_argument(
        "--kernels", action="store_true", help="compile every kernel for sm_90/sm_80 and print its resources"
    )
    validate = commands.add_parser("validate", help="check every op against its float64 reference on this device")
    validate.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    validate.add_argument("--dtype", action="append", choices=("float32", "float16", "bfloat16"))
    validate.add_argument("--tokens", type=_positive_int, nargs="+", help="token counts (each >= 1)")
    validate.add_argument("--backend", default="auto", choices=("auto", "triton", "torch"))
    # --help is the chosen benchmark's: `bench --op knn_mix --help` lists knn_mix's own flags.
    bench = commands.add_parser(
        "bench", add_help=False, help="run the benchmark suite (other arguments pass to each op's benchmark)"
    )
    bench.add_argument("--op", choices=("all", *bench_index.BENCHMARKS), default="all")
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":
        if args.op == "all" and {"-h", "--help"} & set(extra):
            bench.print_help()
            print("\n`--op NAME --help` shows a benchmark's own options.")
            return 0
        return cmd_bench(args, extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _check_device(parser, args.device if args.command in ("demo", "validate") else None)
    if args.command == "demo":
        return demo.run_demo(args.out, quick=args.quick, seed=args.seed, device=args.device, stages=args.stages)
    return cmd_info(args) if args.command == "info" else cmd_validate(args)


if __name__ == "__main__":
    sys.exit(main())
