"""Eager per-call overhead of each op's boundary: the host time of one call at a size where the
work itself is negligible, through four doors:

- ``bare_forward``: the op's forward function (the Triton launcher on CUDA, the PyTorch path
  elsewhere), no argument checks, no autograd;
- ``public``: ``moe_kernels.<op>`` as users call it in eager mode (checks, backend choice, the
  eager ``autograd.Function`` that bypasses the dispatcher), under ``torch.no_grad``;
- ``public_autograd``: the same with inputs that require grad (it records the backward);
- ``registered_op``: ``torch.ops.moe_kernels.<op>`` through the dispatcher, called with its flat
  arguments (the option records' fields, rebuilt into records inside): what a ``torch.compile``
  graph calls, and what eager calls would cost without the bypass; ``registered_op_autograd``
  with its first input requiring grad (the registered autograd).

``overhead_us`` is a row's time minus ``bare_forward``'s. ``boundary_us`` is the same door timed
with the op's forward replaced by a stub that returns its precomputed outputs: the cost of the
boundary alone (argument checks, backend choice, autograd or dispatcher), free of the noise of the
work itself, which on a loaded CPU host exceeds the boundary. The timer is host wall time per
call, averaged over a loop of calls that ends with one device synchronisation: at these sizes the
GPU finishes each kernel before the host issues the next, so the loop measures the host.

    python -m benchmarks.bench_overhead
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Sequence

import torch

import moe_kernels
from benchmarks.command import bench_parser, main_for
from benchmarks.common import cpu_samples, resolve_device
from moe_kernels.config import KnnMixing, RoutingConfig
from moe_kernels.ops.experts import FUSED_EXPERTS
from moe_kernels.ops.grouped_mm import GROUPED_MM
from moe_kernels.ops.knn import KNN_MIX, KNN_ROUTE
from moe_kernels.ops.probmoe import EXACT_K
from moe_kernels.ops.routing import SOFTMAX_TOPK

OP_NAME = "op_overhead"
PROVIDERS = ("bare_forward", "public", "public_autograd", "registered_op", "registered_op_autograd")
TABLE_COLUMNS = ("op_name", "T", "provider", "median_us", "overhead_us", "boundary_us", "timer")
# Calls per timed loop, and loops per row (the row keeps their median).
CALLS_PER_LOOP = 200
LOOPS = 7
TOKENS, EXPERTS, K, NEIGHBORS, MEMORY, HIDDEN, INTERMEDIATE = 1, 64, 8, 8, 1024, 64, 32


def host_us_per_call(
    fn: Callable[[], object], device: torch.device, calls: int = CALLS_PER_LOOP, loops: int = LOOPS
) -> float:
    """Median over ``loops`` of the mean host time of ``calls`` back-to-back calls of ``fn``, in
    microseconds, each loop closed by one synchronisation of ``device``."""

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):
        fn()
    sync()
    if device.type == "cpu":  # loops stalled by the scheduler are dropped and re-run
        return statistics.median(cpu_samples(fn, loops, calls)[0]) * 1e3
    means = []
    for _ in range(loops):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        means.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(means)


def _cases(device: torch.device, use_triton: bool) -> dict:
    """op name -> (public call taking a requires-grad flag, the op (:class:`~moe_kernels.ops._boundary.Op`),
    its forward's arguments, the differentiable input first)."""
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen).to(device, dt)

    logits = rand(TOKENS, EXPERTS)
    neighbor_logits, sims = rand(TOKENS, NEIGHBORS, EXPERTS), torch.rand(TOKENS, NEIGHBORS, generator=gen).to(device)
    memory = rand(MEMORY, EXPERTS, dt=torch.float32)
    neighbor_ids = torch.randint(0, MEMORY, (TOKENS, NEIGHBORS), generator=gen).to(device)
    seed = torch.zeros((), dtype=torch.int64, device=device)
    weights, ids = moe_kernels.softmax_topk(logits, 2)
    hidden = rand(TOKENS, HIDDEN)
    gate_up, down = rand(8, 2 * INTERMEDIATE, HIDDEN), rand(8, HIDDEN, INTERMEDIATE)
    rows = rand(8, HIDDEN)
    offsets = torch.tensor([2, 4, 6, 8], dtype=torch.int32, device=device)
    b = rand(4, HIDDEN, HIDDEN)
    ids8 = ids.to(torch.int32) % 8
    routing, mixing = RoutingConfig(), KnnMixing()

    def grad(t, on):
        return t.detach().requires_grad_(on)

    return {
        "softmax_topk": (
            lambda g: moe_kernels.softmax_topk(grad(logits, g), K),
            SOFTMAX_TOPK,
            (logits, K, None, routing, use_triton),
        ),
        "knn_mix": (
            lambda g: moe_kernels.knn_mix(grad(logits, g), neighbor_logits, sims),
            KNN_MIX,
            (logits, neighbor_logits, sims, mixing, use_triton),
        ),
        "knn_route": (
            lambda g: moe_kernels.knn_route(grad(logits, g), neighbor_ids, sims, memory, K),
            KNN_ROUTE,
            (logits, neighbor_ids, sims, memory, K, None, routing, mixing, use_triton),
        ),
        "exact_k": (
            lambda g: moe_kernels.exact_k_marginals(grad(logits.float(), g), K),
            EXACT_K,
            (logits.float(), K, K, seed, False, use_triton),
        ),
        "grouped_mm": (
            lambda g: moe_kernels.grouped_mm(grad(rows, g), b, offsets),
            GROUPED_MM,
            (rows, b, offsets, use_triton),
        ),
        "fused_experts": (
            lambda g: moe_kernels.fused_experts(grad(hidden, g), gate_up, down, weights, ids8),
            FUSED_EXPERTS,
            (hidden, gate_up, down, weights, ids8, "silu", None, None, use_triton, False),
        ),
    }


@contextlib.contextmanager
def stubbed_forward(op, outputs):
    """Within the block, ``op`` (an :class:`~moe_kernels.ops._boundary.Op`) runs a stub returning
    ``outputs`` instead of its forward (every door of the op calls ``op.forward`` at call time).
    Yields the stub."""
    real = op.forward

    def stub(*args):
        return outputs

    op.forward = stub
    try:
        yield stub
    finally:
        op.forward = real


def _door_times(public, definition, bare, args, device) -> dict:
    """Host microseconds per call of each door of one op."""
    registered, flat = definition.op, definition.flat_args(args)
    with torch.no_grad():
        calls = {
            "bare_forward": lambda: bare(*args),
            "public": lambda: public(False),
            "registered_op": lambda: registered(*flat),
        }
        times = {name: host_us_per_call(fn, device) for name, fn in calls.items()}
    times["public_autograd"] = host_us_per_call(lambda: public(True), device)
    grad_flat = definition.flat_args((args[0].detach().requires_grad_(), *args[1:]))
    times["registered_op_autograd"] = host_us_per_call(lambda: registered(*grad_flat), device)
    return times


def run(*, device=None, ops: Sequence[str] | None = None) -> list[dict]:
    """Rows of every (op, provider)."""
    device = resolve_device(device)
    use_triton = device.type == "cuda"
    rows = []
    for op, (public, definition, args) in _cases(device, use_triton).items():
        if ops and op not in ops:
            continue
        times = _door_times(public, definition, definition.forward, args, device)
        with torch.no_grad():
            outputs = definition.forward(*args)
        with stubbed_forward(definition, outputs) as stub:
            boundary = _door_times(public, definition, stub, args, device)
        for provider in PROVIDERS:
            rows.append(
                {
                    "op": OP_NAME,
                    "op_name": op,
                    "T": TOKENS,
                    "provider": provider,
                    "median_us": times[provider],
                    "overhead_us": times[provider] - times["bare_forward"],
                    "boundary_us": boundary[provider] - boundary["bare_forward"],
                    "timer": "host_loop",
                    "device": str(device),
                    "backend": "triton" if use_triton else "torch",
                }
            )
    return rows


def _run_options(args, device: torch.device) -> dict:
    """``run``'s keywords (``--quick`` changes nothing: the sizes are tiny anyway)."""
    return {"device": device, "ops": args.ops}


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser("bench_overhead", __doc__, "accepted for the bench suite; the sizes are tiny anyway")
    parser.add_argument("--ops", nargs="+", help="a subset of the ops")
    return main_for(OP_NAME, parser, argv, run, TABLE_COLUMNS, options=_run_options)


if __name__ == "__main__":
    raise SystemExit(main())
