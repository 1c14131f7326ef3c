"""The ``moe-kernels`` command line: ``info``, ``validate`` and ``bench``."""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
from pathlib import Path

import torch

import moe_kernels
from moe_kernels import _compat, reference, testing
from moe_kernels._table import format_table
from moe_kernels.shapes import ROUTING_SHAPES
from moe_kernels.utils import use_triton

VALIDATE_TOKENS = {"cuda": (1, 7, 256, 4099), "cpu": (1, 7, 256)}
VALIDATE_DTYPES = {"cuda": ("float32", "float16", "bfloat16"), "cpu": ("float32", "bfloat16")}


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
        return "torch reference"
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


def _validate_routing_case(shape, num_tokens, dtype, device, backend) -> dict:
    """One row of ``validate``: the op against the float64 reference, forward and backward."""
    bias = testing.make_bias(shape.num_experts, seed=1, device=device) if shape.has_bias else None
    group_keys = ("score_func", "num_groups", "topk_groups", "group_score")
    logits = testing.make_routing_logits(
        num_tokens,
        shape.num_experts,
        dtype,
        bias=None if bias is None else bias.cpu(),
        **{key: shape.options[key] for key in group_keys if key in shape.options},
    ).to(device)
    logits.requires_grad_(True)
    weights, ids = moe_kernels.softmax_topk(logits, shape.k, bias=bias, backend=backend, **shape.options)
    grad_out = torch.randn(weights.shape, device=device)
    weights.backward(grad_out)

    logits64 = logits.detach().double()
    bias64 = None if bias is None else bias.double()
    ref_weights, ref_ids = reference.softmax_topk(logits64, shape.k, bias=bias64, **shape.options)
    ref_grad = reference.softmax_topk_backward(
        grad_out.double(),
        logits64,
        ref_ids,
        renormalize=shape.options.get("renormalize", False),
        score_func=shape.options.get("score_func", "softmax"),
        scale=shape.options.get("scale", 1.0),
    )
    ids_match = torch.equal(ids.cpu(), ref_ids.cpu())
    weight_err = testing.max_errors(weights, ref_weights)[0]
    grad_err = testing.max_errors(logits.grad, ref_grad)[0]
    ok = ids_match and _within(weights, ref_weights, torch.float32) and _within(logits.grad, ref_grad, dtype)
    return dict(
        op="softmax_topk",
        model=shape.model,
        E=shape.num_experts,
        k=shape.k,
        T=num_tokens,
        dtype=str(dtype).removeprefix("torch."),
        ids="exact" if ids_match else "MISMATCH",
        weight_err=f"{weight_err:.1e}",
        grad_err=f"{grad_err:.1e}",
        status="ok" if ok else "FAIL",
    )


def _validate_knn_case(shape, num_tokens, dtype, device, backend, num_neighbors=8) -> dict:
    """One row of ``validate`` for ``knn_mix`` (softmax weighting, fallback threshold 0.3)."""
    generator = torch.Generator().manual_seed(num_tokens)
    router = torch.randn(num_tokens, shape.num_experts, generator=generator).to(dtype).to(device)
    neighbors = torch.randn(num_tokens, num_neighbors, shape.num_experts, generator=generator).to(dtype).to(device)
    sims = (torch.rand(num_tokens, num_neighbors, generator=generator) * 1.2 - 0.2).to(device)
    options = dict(weighting="softmax", temperature=0.1, min_confidence=0.3)
    router.requires_grad_(True)
    neighbors.requires_grad_(True)
    mixed, conf = moe_kernels.knn_mix(router, neighbors, sims, backend=backend, **options)
    grad_out = torch.randn(mixed.shape, device=device)
    mixed.backward(grad_out)

    router64 = router.detach().double().requires_grad_(True)
    neighbors64 = neighbors.detach().double().requires_grad_(True)
    ref_mixed, ref_conf = reference.knn_mix(router64, neighbors64, sims.double(), **options)
    ref_mixed.backward(grad_out.double())
    mixed_err = max(testing.max_errors(mixed, ref_mixed)[0], testing.max_errors(conf, ref_conf)[0])
    grad_err = max(testing.max_errors(router.grad, router64.grad)[0], testing.max_errors(neighbors.grad, neighbors64.grad)[0])
    ok = (
        _within(mixed, ref_mixed, torch.float32)
        and _within(conf, ref_conf, torch.float32)
        and _within(router.grad, router64.grad, dtype)
        and _within(neighbors.grad, neighbors64.grad, dtype)
    )
    return dict(
        op="knn_mix", model=shape.model, E=shape.num_experts, k=num_neighbors, T=num_tokens,
        dtype=str(dtype).removeprefix("torch."), ids="-", weight_err=f"{mixed_err:.1e}",
        grad_err=f"{grad_err:.1e}", status="ok" if ok else "FAIL",
    )


def _validate_exact_k_case(shape, num_tokens, dtype, device, backend) -> dict:
    """One row of ``validate`` for the ProbMoE marginals (exact-k at the model's k) and their
    gradient."""
    from moe_kernels.reference import probmoe as probmoe_ref

    generator = torch.Generator().manual_seed(num_tokens)
    logits = (3 * torch.randn(num_tokens, shape.num_experts, generator=generator)).to(dtype).to(device)
    logits.requires_grad_(True)
    marginals = moe_kernels.exact_k_marginals(logits, shape.k, backend=backend)
    grad_out = torch.randn(marginals.shape, device=device)
    marginals.backward(grad_out)
    logits64 = logits.detach().double().cpu()
    ref_marginals, _, _ = probmoe_ref.exact_k_forward(logits64, shape.k, shape.k)
    ref_grad = probmoe_ref.exact_k_backward(
        logits64, grad_out.double().cpu(), torch.zeros(num_tokens, dtype=torch.float64), shape.k, shape.k
    )
    ok = _within(marginals.cpu(), ref_marginals, torch.float32, "exact_k") and _within(
        logits.grad.cpu(), ref_grad, dtype, "exact_k"
    )
    return dict(
        op="exact_k", model=shape.model, E=shape.num_experts, k=shape.k, T=num_tokens,
        dtype=str(dtype).removeprefix("torch."), ids="-",
        weight_err=f"{testing.max_errors(marginals.cpu(), ref_marginals)[0]:.1e}",
        grad_err=f"{testing.max_errors(logits.grad.cpu(), ref_grad)[0]:.1e}", status="ok" if ok else "FAIL",
    )


def _validate_experts_case(shape, num_tokens, dtype, device, backend, hidden=128, inter=64) -> dict:
    """One row of ``validate`` for ``fused_experts`` at the model's routing (E, k) with small
    ``hidden`` / ``inter``: the output and the gradients of hidden and both projections."""
    generator = torch.Generator().manual_seed(num_tokens)
    logits = torch.randn(num_tokens, shape.num_experts, generator=generator).to(device)
    weights, ids = moe_kernels.softmax_topk(logits, shape.k, renormalize=True, backend="torch")
    params = [
        torch.randn(num_tokens, hidden, generator=generator),
        torch.randn(shape.num_experts, 2 * inter, hidden, generator=generator) * hidden**-0.5,
        torch.randn(shape.num_experts, hidden, inter, generator=generator) * inter**-0.5,
    ]
    inputs = [p.to(dtype).to(device).requires_grad_(True) for p in params]
    out = moe_kernels.fused_experts(*inputs, weights, ids, backend=backend)
    grad_out = torch.randn(out.shape, generator=generator).to(dtype).to(device)
    out.backward(grad_out)
    inputs64 = [p.detach().double().cpu().requires_grad_(True) for p in inputs]
    ref = reference.fused_experts(*inputs64, weights.double().cpu(), ids.cpu())
    ref.backward(grad_out.double().cpu())
    pairs = [(p.grad.cpu(), q.grad) for p, q in zip(inputs, inputs64)]
    ok = _within(out.cpu(), ref, dtype, "fused_experts") and all(_within(a, b, dtype, "fused_experts") for a, b in pairs)
    return dict(
        op="fused_experts", model=shape.model, E=shape.num_experts, k=shape.k, T=num_tokens,
        dtype=str(dtype).removeprefix("torch."), ids="-",
        weight_err=f"{testing.max_errors(out.cpu(), ref)[0]:.1e}",
        grad_err=f"{max(testing.max_errors(a, b)[0] for a, b in pairs):.1e}", status="ok" if ok else "FAIL",
    )


def _within(actual, expected, dtype, op=None) -> bool:
    atol, rtol = testing.tolerance(dtype, op)
    return torch.allclose(actual.double(), expected.double(), atol=atol, rtol=rtol)


def cmd_validate(args) -> int:
    device = torch.device(args.device) if args.device else _default_device()
    dtypes = args.dtype or VALIDATE_DTYPES[device.type]
    tokens = args.tokens or VALIDATE_TOKENS[device.type]
    print(f"validate on {_device_name(device)}; the ops run: {_backend_label(device, args.backend)} "
          "(k is the neighbour count n for knn_mix; fused_experts runs each model's (E, k) at H=128, "
          "I=64; weight_err is the op's main output: weights, mixed logits, marginals, expert output)")
    rows = [
        validate_case(shape, num_tokens, getattr(torch, dtype), device, args.backend)
        for validate_case in (_validate_routing_case, _validate_knn_case, _validate_exact_k_case, _validate_experts_case)
        for shape in ROUTING_SHAPES
        for dtype in dtypes
        for num_tokens in tokens
    ]
    print(format_table(rows, list(rows[0])))
    failures = sum(row["status"] != "ok" for row in rows)
    print(f"{len(rows) - failures} passed, {failures} failed")
    return 1 if failures else 0


# `moe-kernels bench --op NAME` -> the module of benchmarks/ that runs it.
BENCHMARKS = {
    "softmax_topk": "bench_routing",
    "knn_mix": "bench_knn",
    "knn_route": "bench_knn_route",
    "probmoe": "bench_probmoe",
    "fused_experts": "bench_experts",
    "knn_retrieval": "bench_retrieval",
    "hf_moe_block": "bench_hf",
    "hf_generate": "bench_hf_generate",
    "op_overhead": "bench_overhead",
    "dynamics": "bench_dynamics",
}


def cmd_bench(args, extra: list[str]) -> int:
    repo_root = Path(__file__).resolve().parent.parent
    if not (repo_root / "benchmarks" / "bench_routing.py").is_file():
        print("moe-kernels bench: the benchmarks/ folder ships with the source tree; run from a checkout", file=sys.stderr)
        return 2
    sys.path.insert(0, str(repo_root))
    names = BENCHMARKS if args.op == "all" else {args.op: BENCHMARKS[args.op]}
    chosen = {op: importlib.import_module(f"benchmarks.{module}") for op, module in names.items()}
    return max(bench.main(extra) for bench in chosen.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe-kernels", description=moe_kernels.__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="versions, device, and which backend each op uses")
    info.add_argument("--kernels", action="store_true", help="compile every kernel for sm_90/sm_80 and print its resources")
    validate = commands.add_parser("validate", help="check every op against its float64 reference on this device")
    validate.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    validate.add_argument("--dtype", action="append", choices=("float32", "float16", "bfloat16"))
    validate.add_argument("--tokens", type=int, nargs="+")
    validate.add_argument("--backend", default="auto", choices=("auto", "triton", "torch"))
    bench = commands.add_parser("bench", help="run the benchmark suite (other arguments pass to each op's benchmark)")
    bench.add_argument("--op", choices=("all", *BENCHMARKS), default="all")
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":
        return cmd_bench(args, extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return cmd_info(args) if args.command == "info" else cmd_validate(args)


if __name__ == "__main__":
    sys.exit(main())
