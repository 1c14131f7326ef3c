"""Gate + top-k routing benchmark: :func:`moe_kernels.softmax_topk` against the PyTorch baselines,
on every model shape of :data:`moe_kernels.shapes.ROUTING_SHAPES`.

Providers, all timed in one run on the same inputs:

==================  ==============================================================================
moe_kernels         the public op, ``backend="auto"`` (Triton on CUDA; the fast CPU path on CPU)
torch_eager         :func:`moe_kernels.reference.softmax_topk`, the same semantics in eager PyTorch
torch_compile       that reference through ``torch.compile``, compiled once per shape and dtype
torch_topk_chain    the eager chain model code runs today: float32 softmax | sigmoid (+ bias) ->
                    ``torch.topk`` -> renormalise -> scale; it has no group limit, so
                    group-limited shapes skip it
vllm                vLLM's fused ``topk_softmax`` CUDA kernel, for plain softmax shapes, when
                    ``vllm`` is installed
==================  ==============================================================================

Run from the repository root::

    python -m benchmarks.bench_routing --quick              # CPU: 3 shapes, T in (1, 64, 1024)
    python -m benchmarks.bench_routing --dtype bfloat16 --dtype float16 --models Qwen --tokens 1 4096
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Sequence

import torch

import moe_kernels
from benchmarks.command import DTYPE_CHOICES, add_dtype_flag, bench_parser, main_for, run_options
from benchmarks.common import measured_bandwidth_gbs, resolve_device
from benchmarks.cpu_baselines import topk_chain
from benchmarks.points import bandwidth_columns, bandwidth_rows, dtype_name
from moe_kernels import reference
from moe_kernels.config import RoutingConfig
from moe_kernels.shapes import ROUTING_SHAPES, ROUTING_TOKENS, RoutingShape

OP_NAME = "softmax_topk"
PROVIDERS = ("moe_kernels", "torch_eager", "torch_compile", "torch_topk_chain", "vllm")
# Providers that may fail to build or run here (no C++ compiler for inductor, a vLLM build
# without this dtype): their errors skip them with a note instead of ending the run.
OPTIONAL_PROVIDERS = ("torch_compile", "vllm")
DTYPES = DTYPE_CHOICES

QUICK_CPU_MODELS = ("Mixtral-8x7B", "OLMoE-1B-7B", "DeepSeek-V3")
QUICK_CPU_TOKENS = (1, 64, 1024)
# Inductor's C++ build costs seconds per graph on a small CPU (plus ~20 s of one-time start-up),
# so quick CPU runs compile only shapes this small.
QUICK_CPU_COMPILE_MAX_EXPERTS = 8
# Small batches are timed from a CUDA graph: launch overhead would otherwise dominate them, and
# a serving engine replays them from graphs too. Larger batches hide the launch anyway.
CUDA_GRAPH_MAX_TOKENS = 512

TABLE_COLUMNS = bandwidth_columns("model", "E", "k", "T", "dtype", extra=("ids_match",))

# A provider is called as provider(logits, bias=bias) and returns (weights, ids).
Provider = Callable[..., tuple]


def run(
    *,
    quick: bool = False,
    dtypes: Sequence[str] | None = None,
    device: str | torch.device | None = None,
    shapes: Sequence[RoutingShape] | None = None,
    tokens: Sequence[int] | None = None,
    providers: Sequence[str] = PROVIDERS,
) -> list[dict]:
    """Benchmark every (shape, dtype, T) and return the rows, one per provider measured.

    Defaults: every registered shape x ``ROUTING_TOKENS`` x bfloat16; with ``quick`` on the CPU,
    3 shapes x T in (1, 64, 1024) x float32 (under a minute on 2 cores). ``shapes``, ``tokens``
    and ``dtypes`` override either; ``providers`` picks a subset of :data:`PROVIDERS`.
    """
    device = resolve_device(device)
    quick_cpu = quick and device.type == "cpu"
    if shapes is None:
        shapes = [s for s in ROUTING_SHAPES if s.model in QUICK_CPU_MODELS] if quick_cpu else ROUTING_SHAPES
    tokens = tokens or (QUICK_CPU_TOKENS if quick_cpu else ROUTING_TOKENS)
    dtypes = dtypes or (("float32",) if quick_cpu else ("bfloat16",))
    if device.type != "cuda":
        print(
            f"note: on {device.type}, moe_kernels (backend='auto') runs the PyTorch path "
            "(moe_kernels.cpu on the CPU), not the Triton kernels"
        )
    peak_gbs = measured_bandwidth_gbs(device)
    print(f"measured copy bandwidth: {peak_gbs:.1f} GB/s")
    rows = []
    for shape in shapes:
        for name in dtypes:
            dtype = getattr(torch, name)
            available = _providers(shape, device, quick_cpu, providers)
            for num_tokens in tokens:
                rows += _bench_point(shape, dtype, num_tokens, device, available)
    return rows


def _providers(
    shape: RoutingShape, device: torch.device, quick_cpu: bool, wanted: Sequence[str]
) -> dict[str, Provider]:
    """The providers of ``wanted`` that apply to ``shape`` on ``device``, by name, in
    :data:`PROVIDERS` order; prints why a wanted one is left out (except a missing vLLM)."""
    routing = shape.routing
    found: dict[str, Provider] = {
        "moe_kernels": functools.partial(moe_kernels.softmax_topk, k=shape.k, routing=routing, backend="auto"),
        "torch_eager": functools.partial(reference.softmax_topk, k=shape.k, routing=routing),
    }
    if "torch_compile" in wanted:
        if quick_cpu and shape.num_experts > QUICK_CPU_COMPILE_MAX_EXPERTS:
            print(
                f"torch_compile skipped for {shape.label}: quick CPU runs compile only shapes with "
                f"E <= {QUICK_CPU_COMPILE_MAX_EXPERTS} (inductor's C++ build is slow)"
            )
        else:
            found["torch_compile"] = _compiled_reference(shape)
    if "torch_topk_chain" in wanted:
        if _group_limited(routing):
            print(f"torch_topk_chain skipped for {shape.label}: torch.topk has no group limit")
        else:
            options = dict(renormalize=routing.renormalize, score_func=routing.score_func, scale=routing.scale)
            found["torch_topk_chain"] = functools.partial(topk_chain, k=shape.k, **options)
    if "vllm" in wanted and device.type == "cuda" and _plain_softmax(shape):
        ops = _vllm_ops()
        if ops is not None:
            renormalize = routing.renormalize
            found["vllm"] = functools.partial(_vllm_topk_softmax, ops, k=shape.k, renormalize=renormalize)
    return {name: found[name] for name in PROVIDERS if name in wanted and name in found}


def _compiled_reference(shape: RoutingShape) -> Provider:
    """``torch.compile`` of the reference with ``shape``'s options bound (compiled at its first
    call, recompiled by dynamo when T changes from 1 to a dynamic size)."""
    # Dynamo caches graphs on the reference's code object, which every shape shares; starting each
    # shape from an empty cache keeps the recompile limit from silently sending later shapes to
    # eager mode.
    torch._dynamo.reset()
    return torch.compile(functools.partial(reference.softmax_topk, k=shape.k, routing=shape.routing))


def _group_limited(routing: RoutingConfig) -> bool:
    """True when the routing drops experts by group (one group, or keeping all, limits nothing)."""
    return routing.num_groups is not None and routing.topk_groups < routing.num_groups


def _plain_softmax(shape: RoutingShape) -> bool:
    """True for softmax -> top-k (-> renormalise) routing: what vLLM's ``topk_softmax`` computes."""
    routing = shape.routing
    return (
        not shape.has_bias and routing.score_func == "softmax" and not _group_limited(routing) and routing.scale == 1.0
    )


@functools.cache
def _vllm_ops():
    """vLLM's custom-op module, or None when vLLM is not installed."""
    try:
        from vllm import _custom_ops
    except ImportError:
        return None
    return _custom_ops


def _vllm_topk_softmax(ops, logits: torch.Tensor, bias: None = None, *, k: int, renormalize: bool) -> tuple:
    """vLLM's fused softmax + top-k, allocating its outputs as vLLM's ``fused_topk`` does per call."""
    shape = (logits.shape[0], k)
    weights = torch.empty(shape, dtype=torch.float32, device=logits.device)
    ids = torch.empty(shape, dtype=torch.int32, device=logits.device)
    token_expert_indices = torch.empty(shape, dtype=torch.int32, device=logits.device)
    ops.topk_softmax(weights, ids, token_expert_indices, logits, renormalize)
    return weights, ids


def make_inputs(shape: RoutingShape, dtype: torch.dtype, num_tokens: int, device: torch.device) -> tuple:
    """``(logits (T, E) dtype, bias (E,) float32 | None)``: ``randn * 2`` logits (random, not
    zeros, which would make every key tie) and a ``randn * 0.1`` bias for models that have one;
    seeded by T so that a rerun sees the same inputs."""
    gen = torch.Generator(device=device).manual_seed(num_tokens)
    logits = torch.randn(num_tokens, shape.num_experts, generator=gen, device=device, dtype=dtype) * 2
    bias = None
    if shape.has_bias:
        bias = torch.randn(shape.num_experts, generator=gen, device=device) * 0.1
    return logits, bias


def routing_bytes(shape: RoutingShape, dtype: torch.dtype, num_tokens: int) -> int:
    """Bytes the op must move: logits read, float32 weights and int32 ids written, bias read."""
    moved = num_tokens * shape.num_experts * dtype.itemsize + num_tokens * shape.k * (4 + 4)
    return moved + (shape.num_experts * 4 if shape.has_bias else 0)


def _bench_point(
    shape: RoutingShape,
    dtype: torch.dtype,
    num_tokens: int,
    device: torch.device,
    providers: dict[str, Provider],
) -> list[dict]:
    """Rows of every provider at one (shape, dtype, T), on one set of fresh inputs."""
    logits, bias = make_inputs(shape, dtype, num_tokens, device)
    calls, outputs = {}, {}
    for name, provider in providers.items():
        call = functools.partial(provider, logits, bias=bias)
        try:
            outputs[name] = call()  # untimed first call: compiles, autotunes, warms caches
        except Exception as exc:
            if name not in OPTIONAL_PROVIDERS:
                raise
            print(f"{name} skipped for {shape.label} T={num_tokens}: {type(exc).__name__}: {exc}")
            continue
        calls[name] = call
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # graph timing runs on a side stream: finish the warm-ups first
    ids_match = _ids_match(outputs, shape, dtype, num_tokens)
    use_graph = device.type == "cuda" and num_tokens <= CUDA_GRAPH_MAX_TOKENS
    case = {"op": OP_NAME, "model": shape.model, "E": shape.num_experts, "k": shape.k, "T": num_tokens}
    case["dtype"] = dtype_name(dtype)
    moved = routing_bytes(shape, dtype, num_tokens)
    rows = bandwidth_rows(case, calls, device, moved, cuda_graph=use_graph, warm=False)  # warmed up above
    for row in rows:
        row["ids_match"] = ids_match
    return rows


def _ids_match(outputs: dict, shape: RoutingShape, dtype: torch.dtype, num_tokens: int) -> bool | None:
    """Whether moe_kernels and torch_eager chose the same ids (None when either was not run).

    A mismatch is printed as a warning, not raised: near-equal float32 scores may rank
    differently in a fused kernel than in eager PyTorch.
    """
    if "moe_kernels" not in outputs or "torch_eager" not in outputs:
        return None
    ours, eager = outputs["moe_kernels"][1], outputs["torch_eager"][1]
    if torch.equal(ours, eager):
        return True
    tokens_differing = int((ours != eager).any(dim=-1).sum())
    print(
        f"WARNING: {shape.label} {dtype} T={num_tokens}: moe_kernels ids differ from torch_eager "
        f"on {tokens_differing} token(s)"
    )
    return False


def _run_options(parser: argparse.ArgumentParser, args: argparse.Namespace, device: torch.device) -> dict:
    """``run``'s keywords: ``--models`` names turn into the ``shapes`` they match (any case)."""
    options = run_options(args, device)
    models = options.pop("models", None)
    if models:
        wanted = [m.lower() for m in models]
        options["shapes"] = [s for s in ROUTING_SHAPES if any(m in s.model.lower() for m in wanted)]
        if not options["shapes"]:
            known = ", ".join(s.model for s in ROUTING_SHAPES)
            parser.error(f"--models {' '.join(models)} matches none of: {known}")
    return options


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = bench_parser(
        "bench_routing", __doc__, "CPU: 3 shapes x T in (1, 64, 1024) x float32; CUDA: every shape and T"
    )
    add_dtype_flag(parser, "logits dtype, repeatable (default: bfloat16; float32 for --quick on CPU)")
    parser.add_argument("--tokens", type=int, nargs="+", help="token counts T (default: ROUTING_TOKENS)")
    parser.add_argument("--models", nargs="+", help="keep the shapes whose model name contains one of these (any case)")
    parser.add_argument(
        "--providers", nargs="+", choices=PROVIDERS, default=PROVIDERS, help="providers to time (default: all)"
    )
    options = functools.partial(_run_options, parser)
    return main_for(OP_NAME, parser, argv, run, TABLE_COLUMNS, options=options)


if __name__ == "__main__":
    raise SystemExit(main())
