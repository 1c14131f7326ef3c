"""Fused experts benchmark: :func:`moe_kernels.fused_experts` against what MoE layers run today,
in the same run: the Hugging Face eager experts loop, a ``torch._grouped_mm`` MoE (CUDA, 16-bit),
``torch.compile`` of the reference, and liger-kernel's fused MoE (CUDA, SwiGLU shapes) when it is
installed.

Run from the repository root::

    python -m benchmarks.bench_experts --quick
    python -m benchmarks.bench_experts --tokens 1 8 64 256 4096 16384 32768 --routing uniform skewed

Rows report TFLOP/s (``6 * H * I`` per routed slot forward, twice that backward), the % of the
device's measured dense GEMM rate, and for decode batches the % of the weight-bandwidth floor
(bytes of the experts the batch touches over the measured copy bandwidth).
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence

import torch
import torch.nn.functional as F

import moe_kernels
from benchmarks.command import add_dtype_flag, bench_parser, main_for
from benchmarks.common import measured_bandwidth_gbs, measured_gemm_tflops, resolve_device
from benchmarks.points import SPEEDUP_BASELINES, add_speedups, dtype_name, time_calls
from moe_kernels import reference
from moe_kernels.shapes import EXPERT_DECODE_TOKENS, EXPERT_PREFILL_TOKENS, EXPERT_SHAPES, ExpertShape

OP_NAME = "fused_experts"
ROUTINGS = ("uniform", "skewed", "one_hot")
# A CPU smoke run: one scaled-down Mixtral-like layer, float32, reference and HF loop only.
QUICK_CPU_SHAPE = ExpertShape("tiny-cpu", 8, 2, 64, 128)
QUICK_CPU_TOKENS = (1, 64)
CUDA_GRAPH_MAX_TOKENS = 256
# Providers with host syncs (the HF loop, the reference's, liger's tile count): no CUDA graph.
UNCAPTURABLE = ("hf_eager", "torch_eager", "liger")
# (column, provider) of the speedups beyond eager and compiled PyTorch's.
MOE_BASELINES = (
    ("speedup_vs_hf", "hf_eager"),
    ("speedup_vs_grouped_mm", "torch_grouped_mm"),
    ("speedup_vs_liger", "liger"),
)
TABLE_COLUMNS = (
    "model",
    "T",
    "routing",
    "direction",
    "provider",
    "median_us",
    "tflops",
    "pct_gemm",
    "pct_weight_bw",
    "speedup_vs_eager",
    "speedup_vs_hf",
    "speedup_vs_grouped_mm",
    "speedup_vs_liger",
    "timer",
)


def routed_flops(shape: ExpertShape, num_slots: int, backward: bool) -> int:
    """FLOPs of the expert GEMMs: ``2*H*2I + 2*I*H`` per routed slot forward; the backward does
    twice the forward (input and weight gradients)."""
    forward = 6 * shape.hidden * shape.intermediate * num_slots
    return forward * (3 if backward else 1)


def route(shape: ExpertShape, num_tokens: int, routing: str, device, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights (T, k) float32, ids (T, k) int32)``: softmax top-k of random logits,
    ``"skewed"`` adds a Zipf-like prior (expert i's logit + 2 log(1 / (i + 1))), ``"one_hot"``
    sends every token to the same k experts."""
    logits = torch.randn(num_tokens, shape.num_experts, generator=generator, device=device)
    if routing == "skewed":
        logits = logits + 2 * torch.log(1.0 / torch.arange(1, shape.num_experts + 1, device=device))
    elif routing == "one_hot":
        logits = logits * 0.01 + torch.linspace(10, 0, shape.num_experts, device=device)
    return moe_kernels.softmax_topk(logits, shape.k, renormalize=True, backend="torch")


def hf_eager_experts(hidden, gate_up_proj, down_proj, weights, ids, activation="silu"):
    """The loop HF transformers' eager MoE blocks run: one iteration per expert with tokens, each
    finding its tokens with ``torch.where`` (a host sync) and adding its weighted output."""
    out = torch.zeros_like(hidden)
    mask = F.one_hot(ids.long().clamp(min=0), gate_up_proj.shape[0]).permute(2, 1, 0) * (ids >= 0).T[None]
    for expert in torch.nonzero(mask.sum(dim=(-1, -2)) > 0).flatten().tolist():
        slot, token = torch.where(mask[expert])
        gate_up = hidden[token] @ gate_up_proj[expert].T
        act = reference.gated_activation(gate_up, activation)
        out.index_add_(0, token, (act @ down_proj[expert].T) * weights[token, slot, None].to(hidden.dtype))
    return out


def grouped_mm_experts(hidden, gate_up_proj, down_proj, weights, ids, activation="silu"):
    """An MoE built on ``torch._grouped_mm`` (sort, two grouped GEMMs, activation, index_add)."""
    num_experts = gate_up_proj.shape[0]
    flat = ids.reshape(-1).long()
    order = torch.argsort(torch.where(flat < 0, num_experts, flat), stable=True)
    counts = torch.zeros(num_experts + 1, dtype=torch.int32, device=ids.device).scatter_add_(
        0, torch.where(flat < 0, num_experts, flat), torch.ones_like(flat, dtype=torch.int32)
    )
    offsets = counts[:num_experts].cumsum(0, dtype=torch.int32)
    tokens = order // ids.shape[1]
    h = torch._grouped_mm(hidden[tokens], gate_up_proj.transpose(1, 2), offs=offsets)
    act = reference.gated_activation(h, activation)
    y = torch._grouped_mm(act, down_proj.transpose(1, 2), offs=offsets)
    slot_weights = weights.reshape(-1)[order].to(y.dtype)
    valid = (torch.arange(order.numel(), device=ids.device) < offsets[-1]).to(y.dtype)
    return torch.zeros_like(hidden).index_add_(0, tokens, y * (slot_weights * valid)[:, None])


def liger_experts(hidden, gate_up_proj, down_proj, weights, ids, activation="silu"):
    """liger-kernel's fused MoE (``LigerFusedMoEFunction``: the same HF v5 layout, SwiGLU only,
    one host sync for its tile count)."""
    from liger_kernel.ops import LigerFusedMoEFunction

    if activation != "silu":
        raise ValueError(f"liger-kernel's fused MoE is SwiGLU only, got activation={activation!r}")
    return LigerFusedMoEFunction.apply(hidden, gate_up_proj, down_proj, ids.to(torch.int32), weights)


def _providers(device: torch.device, dtype: torch.dtype, quick_cpu: bool) -> dict:
    providers = {
        "moe_kernels": moe_kernels.fused_experts,
        "torch_eager": reference.fused_experts,
        "hf_eager": hf_eager_experts,
    }
    if device.type == "cuda" and dtype != torch.float32:
        providers["torch_grouped_mm"] = grouped_mm_experts
    if device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None:
        providers["liger"] = liger_experts
    if not quick_cpu:
        torch._dynamo.reset()
        providers["torch_compile"] = torch.compile(reference.fused_experts)
    return providers


def run(
    *,
    quick: bool = False,
    device=None,
    tokens: Sequence[int] | None = None,
    routings: Sequence[str] = ("uniform",),
    directions: Sequence[str] = ("fwd", "fwd+bwd"),
    dtypes: Sequence[str] | None = None,
    models: Sequence[str] | None = None,
) -> list[dict]:
    """Rows of every (shape, dtype, T, routing, direction) point, one per provider."""
    device = resolve_device(device)
    quick_cpu = quick and device.type == "cpu"
    shapes = [QUICK_CPU_SHAPE] if quick_cpu else [s for s in EXPERT_SHAPES if not models or s.model in models]
    tokens = tokens or (QUICK_CPU_TOKENS if quick_cpu else EXPERT_DECODE_TOKENS + EXPERT_PREFILL_TOKENS)
    dtypes = [getattr(torch, name) for name in (dtypes or (("float32",) if quick_cpu else ("bfloat16",)))]
    peak_gbs = measured_bandwidth_gbs(device)
    rows = []
    for dtype in dtypes:
        peak_tflops = measured_gemm_tflops(device, dtype)
        providers = _providers(device, dtype, quick_cpu)
        for shape in shapes:
            for num_tokens in tokens:
                for routing in routings:
                    for direction in directions:
                        if direction == "fwd+bwd" and num_tokens in EXPERT_DECODE_TOKENS and not quick_cpu:
                            continue  # training points are prefill-sized
                        rows += _bench_point(
                            shape, dtype, num_tokens, routing, direction, device, providers, peak_gbs, peak_tflops
                        )
    return rows


def _bench_point(shape, dtype, num_tokens, routing, direction, device, providers, peak_gbs, peak_tflops):
    generator = torch.Generator(device=device).manual_seed(num_tokens)
    hidden = torch.randn(num_tokens, shape.hidden, generator=generator, device=device).to(dtype)
    gate_up = (
        torch.randn(shape.num_experts, 2 * shape.intermediate, shape.hidden, generator=generator, device=device)
        * shape.hidden**-0.5
    ).to(dtype)
    down = (
        torch.randn(shape.num_experts, shape.hidden, shape.intermediate, generator=generator, device=device)
        * shape.intermediate**-0.5
    ).to(dtype)
    weights, ids = route(shape, num_tokens, routing, device, generator)
    backward = direction == "fwd+bwd"
    flops = routed_flops(shape, num_tokens * shape.k, backward)
    touched = int(torch.unique(ids).numel())
    weight_floor_us = touched * 3 * shape.hidden * shape.intermediate * dtype.itemsize / peak_gbs / 1e3
    use_graph = device.type == "cuda" and num_tokens <= CUDA_GRAPH_MAX_TOKENS and not backward
    grad = torch.randn_like(hidden)
    calls = {}
    for name, provider in providers.items():
        if name == "liger" and shape.activation != "silu":
            continue
        if backward:
            leaves = [t.detach().requires_grad_() for t in (hidden, gate_up, down)]

            def call(provider=provider, leaves=leaves):
                out = provider(leaves[0], leaves[1], leaves[2], weights, ids, activation=shape.activation)
                return torch.autograd.grad(out, leaves, grad)
        else:
            call = functools.partial(provider, hidden, gate_up, down, weights, ids, activation=shape.activation)
        calls[name] = call
    case = {"op": OP_NAME, "model": shape.model, "E": shape.num_experts, "k": shape.k, "H": shape.hidden}
    case.update(I=shape.intermediate, T=num_tokens, routing=routing, direction=direction, dtype=dtype_name(dtype))
    rows = []
    for name, timing in time_calls(calls, device, cuda_graph=use_graph, uncapturable=UNCAPTURABLE).items():
        tflops = flops / timing["median_us"] / 1e6
        decode = num_tokens <= CUDA_GRAPH_MAX_TOKENS
        rows.append(
            {
                **case,
                "provider": name,
                **timing,
                "flops": flops,
                "tflops": tflops,
                "pct_gemm": 100 * tflops / peak_tflops,
                "measured_gemm_tflops": peak_tflops,
                "pct_weight_bw": 100 * weight_floor_us / timing["median_us"] if decode else None,
            }
        )
    add_speedups(rows, SPEEDUP_BASELINES + MOE_BASELINES)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser("bench_experts", __doc__, "CPU: one tiny float32 layer, T in (1, 64)")
    parser.add_argument("--tokens", type=int, nargs="+")
    parser.add_argument("--routing", nargs="+", choices=ROUTINGS, default=["uniform"], dest="routings")
    parser.add_argument("--direction", action="append", choices=("fwd", "fwd+bwd"), dest="directions")
    add_dtype_flag(parser)
    parser.add_argument("--model", action="append", dest="models", help="an EXPERT_SHAPES model name (repeatable)")
    return main_for(OP_NAME, parser, argv, run, TABLE_COLUMNS)


if __name__ == "__main__":
    raise SystemExit(main())
