"""ProbMoE exact-k benchmark: the fused DP kernels (marginals + one exact sample forward, the
Cov-vector product backward) against the PyTorch reference DP in eager mode and under
``torch.compile``, with :func:`moe_kernels.softmax_topk` at the same shape as the cost floor of
any router.

Run from the repository root::

    python -m benchmarks.bench_probmoe --quick
    python -m benchmarks.bench_probmoe --tokens 1 64 4096 65536
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

import moe_kernels
from benchmarks.command import add_dtype_flag, bench_parser, main_for
from benchmarks.common import resolve_device
from benchmarks.points import bandwidth_columns, bandwidth_rows, dtype_name
from moe_kernels.reference import probmoe as reference
from moe_kernels.shapes import PROBMOE_SHAPES, PROBMOE_TOKENS

OP_NAME = "probmoe"
QUICK_CPU = dict(shapes=((8, 2), (64, 8)), tokens=(1, 64, 1024))
CUDA_GRAPH_MAX_TOKENS = 512
# torch.compile unrolls the reference's loop over experts: beyond this E it compiles for minutes.
COMPILE_MAX_EXPERTS = 64
TABLE_COLUMNS = bandwidth_columns("E", "k", "T", "dtype", "direction", extra=("x_softmax_topk",))


def probmoe_bytes(num_tokens: int, num_experts: int, k: int, dtype: torch.dtype, backward: bool) -> int:
    """Bytes the op must move: logits read and float32 marginals written, plus log Z and the
    sampled ids (forward); logits and the float32 marginals' gradient read, the logits'
    gradient written (backward)."""
    forward = num_tokens * (num_experts * (dtype.itemsize + 4) + 4 + k * 4)
    return forward + (num_tokens * num_experts * (2 * dtype.itemsize + 4) if backward else 0)


def _providers(num_experts: int, k: int, backward: bool, with_compile: bool) -> dict:
    """name -> function of ``(logits, uniforms, grad)``, each computing the same quantities."""

    def fused(x, _uniforms, grad):
        if not backward:
            return moe_kernels.probmoe_route(x, k, seed=0)
        marginals = moe_kernels.exact_k_marginals(x, k)
        return torch.autograd.grad(marginals, x, grad)

    def reference_dp(x, uniforms, grad):
        out = reference.exact_k_forward(x.detach(), k, k, uniforms)
        if backward:
            out = reference.exact_k_backward(x.detach(), grad, torch.zeros_like(grad[:, 0]), k, k)
        return out

    providers = {"moe_kernels": fused, "torch_eager": reference_dp}
    if with_compile and num_experts <= COMPILE_MAX_EXPERTS:
        torch._dynamo.reset()
        providers["torch_compile"] = torch.compile(reference_dp)
    providers["softmax_topk"] = lambda x, _u, _g: moe_kernels.softmax_topk(x.detach(), k)
    return providers


def run(
    *,
    quick: bool = False,
    device=None,
    tokens: Sequence[int] | None = None,
    directions: Sequence[str] = ("fwd", "fwd+bwd"),
    dtypes: Sequence[str] | None = None,
) -> list[dict]:
    """Rows of every (E, k, logits dtype, T, direction) point, one per provider."""
    device = resolve_device(device)
    quick_cpu = quick and device.type == "cpu"
    shapes = QUICK_CPU["shapes"] if quick_cpu else PROBMOE_SHAPES
    tokens = tokens or (QUICK_CPU["tokens"] if quick_cpu else PROBMOE_TOKENS)
    dtypes = dtypes or ("float32",)
    rows = []
    for num_experts, k in shapes:
        for direction in directions:
            providers = _providers(num_experts, k, direction == "fwd+bwd", with_compile=not quick_cpu)
            for dtype in map(lambda name: getattr(torch, name), dtypes):
                for num_tokens in tokens:
                    rows += _bench_point(num_experts, k, dtype, num_tokens, direction, device, providers)
    return rows


def _bench_point(num_experts, k, dtype, num_tokens, direction, device, providers) -> list[dict]:
    generator = torch.Generator(device=device).manual_seed(num_tokens)
    logits = (2 * torch.randn(num_tokens, num_experts, generator=generator, device=device)).to(dtype)
    logits.requires_grad_(True)
    uniforms = torch.rand(num_tokens, num_experts + 1, generator=generator, device=device)
    grad = torch.randn(num_tokens, num_experts, generator=generator, device=device)
    case = {"op": OP_NAME, "E": num_experts, "k": k, "T": num_tokens, "direction": direction}
    case.update(dtype=dtype_name(dtype), model=f"E={num_experts} k={k} {direction}")
    calls = {name: functools.partial(provider, logits, uniforms, grad) for name, provider in providers.items()}
    moved = probmoe_bytes(num_tokens, num_experts, k, dtype, direction == "fwd+bwd")
    use_graph = device.type == "cuda" and num_tokens <= CUDA_GRAPH_MAX_TOKENS and direction == "fwd"
    rows = bandwidth_rows(case, calls, device, moved, cuda_graph=use_graph)
    floor = {row["provider"]: row["median_us"] for row in rows}.get("softmax_topk")
    for row in rows:
        # The forward goal: at most 3x softmax_topk's time at the same shape.
        row["x_softmax_topk"] = row["median_us"] / floor if row["provider"] == "moe_kernels" and floor else None
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser("bench_probmoe", __doc__, "CPU: (E, k) in ((8, 2), (64, 8)), T in (1, 64, 1024)")
    parser.add_argument("--tokens", type=int, nargs="+")
    parser.add_argument("--direction", action="append", choices=("fwd", "fwd+bwd"), dest="directions")
    add_dtype_flag(parser, "logits dtype (the DP computes in float32); default float32")
    return main_for(OP_NAME, parser, argv, run, TABLE_COLUMNS)


if __name__ == "__main__":
    raise SystemExit(main())
