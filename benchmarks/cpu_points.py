"""The measurement points of the CPU goals: for each, the calls to time (the op as users
call it, and its baselines from :mod:`benchmarks.cpu_baselines`) on one set of inputs.

A :class:`Point` is what both ``bench_cpu`` (ratios in one run, at 1 thread and at all threads)
and the pytest-benchmark groups (``benchmarks/test_cpu_benchmarks.py``) time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

import moe_kernels
from benchmarks import cpu_baselines as base
from moe_kernels.shapes import ROUTING_SHAPES

OURS = "moe_kernels"
ROUTING_TOKENS = (1, 64, 1024, 16384)
KNN_TOKENS = (1, 64, 1024, 16384)
KNN_EXPERTS, KNN_K, KNN_NEIGHBORS, KNN_MEMORY = 64, 8, 8, 4096
PROBMOE_SHAPES = ((64, 8), (128, 8), (60, 4))
PROBMOE_FORWARD_TOKENS = (1, 64, 1024, 4096)
PROBMOE_TRAINING_TOKENS = (1024, 4096)
EXPERT_SHAPES = (("OLMoE-like", 64, 8), ("Qwen3-like", 128, 8))
EXPERT_HIDDEN, EXPERT_INTERMEDIATE = 512, 256
EXPERT_TOKENS = (1, 16, 256, 2048)


@dataclass
class Point:
    """One goal measurement: ``calls`` (provider -> zero-argument call; :data:`OURS` first), the
    ``targets`` (baseline -> the ratio baseline time / ours the goal asks for; a tuple of
    baselines means the fastest of them), and a label."""

    goal: str
    case: str
    calls: dict[str, Callable[[], object]]
    targets: dict[str | tuple[str, ...], float]
    tokens: int = 0
    notes: list[str] = field(default_factory=list)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------


def routing_points(shapes=ROUTING_SHAPES, tokens=ROUTING_TOKENS) -> Iterator[Point]:
    """``softmax_topk`` on every registry shape against the fastest chain giving its result."""
    for shape in shapes:
        chains = base.routing_chains(shape)
        for num_tokens in tokens:
            gen = _generator(num_tokens)
            logits = torch.randn(num_tokens, shape.num_experts, generator=gen) * 2
            bias = torch.randn(shape.num_experts, generator=gen) * 0.1 if shape.has_bias else None
            calls = {
                OURS: functools.partial(moe_kernels.softmax_topk, logits, shape.k, routing=shape.routing, bias=bias)
            }
            calls.update({name: functools.partial(chain, logits, bias) for name, chain in chains.items()})
            yield Point("softmax_topk", f"{shape.label} T={num_tokens}", calls, {tuple(chains): 1.0}, num_tokens)


def knn_points(tokens=KNN_TOKENS) -> Iterator[Point]:
    """``knn_mix`` and ``knn_route`` (E = 64, k = 8, n = 8, a 4096-row memory) against the plain
    gather + mix (+ softmax -> top-k) chain."""
    memory = torch.randn(KNN_MEMORY, KNN_EXPERTS, generator=_generator(0)) * 2
    route = functools.partial(base.topk_chain, k=KNN_K)
    for num_tokens in tokens:
        gen = _generator(num_tokens)
        router = torch.randn(num_tokens, KNN_EXPERTS, generator=gen) * 2
        ids = torch.randint(0, KNN_MEMORY, (num_tokens, KNN_NEIGHBORS), generator=gen)
        sims = torch.rand(num_tokens, KNN_NEIGHBORS, generator=gen) * 0.5 + 0.4
        neighbors = memory[ids]
        label = f"E={KNN_EXPERTS} n={KNN_NEIGHBORS} T={num_tokens}"
        yield Point(
            "knn_mix",
            label,
            {
                OURS: functools.partial(moe_kernels.knn_mix, router, neighbors, sims),
                "mix_chain": functools.partial(base.knn_mix_chain, router, neighbors, sims),
            },
            {"mix_chain": 1.0},
            num_tokens,
        )
        yield Point(
            "knn_route",
            f"{label} k={KNN_K}",
            {
                OURS: functools.partial(moe_kernels.knn_route, router, ids, sims, memory, KNN_K),
                "gather_mix_route_chain": functools.partial(base.knn_route_chain, router, ids, sims, memory, route),
            },
            {"gather_mix_route_chain": 1.0},
            num_tokens,
        )


def probmoe_points(
    shapes=PROBMOE_SHAPES, forward_tokens=PROBMOE_FORWARD_TOKENS, training_tokens=PROBMOE_TRAINING_TOKENS
):
    """``exact_k_marginals`` against ProbMoE's autograd DP: forward, and forward + backward."""
    for num_experts, k in shapes:
        for num_tokens in sorted(set(forward_tokens) | set(training_tokens)):
            gen = _generator(num_tokens)
            logits = torch.randn(num_tokens, num_experts, generator=gen) * 2
            grad = torch.randn(num_tokens, num_experts, generator=gen)
            label = f"E={num_experts} k={k} T={num_tokens}"
            if num_tokens in forward_tokens:
                yield Point(
                    "exact_k fwd",
                    label,
                    {
                        OURS: functools.partial(moe_kernels.exact_k_marginals, logits, k),
                        "autograd_dp": functools.partial(base.probmoe_autograd_marginals, logits, k),
                    },
                    {"autograd_dp": 1.0},
                    num_tokens,
                )
            if num_tokens in training_tokens:
                leaf = logits.clone().requires_grad_()

                def ours(leaf=leaf, grad=grad, k=k):
                    return torch.autograd.grad(moe_kernels.exact_k_marginals(leaf, k), leaf, grad)

                def dp(leaf=leaf, grad=grad, k=k):
                    return torch.autograd.grad(base.probmoe_autograd_marginals(leaf, k), leaf, grad)

                yield Point("exact_k fwd+bwd", label, {OURS: ours, "autograd_dp": dp}, {"autograd_dp": 5.0}, num_tokens)


def expert_points(shapes=EXPERT_SHAPES, tokens=EXPERT_TOKENS, directions=("fwd", "fwd+bwd")) -> Iterator[Point]:
    """``fused_experts`` (H = 512, I = 256) against transformers' experts modules: the eager loop
    (goal 1.2x) and ``grouped_mm`` (goal 1.0x)."""
    for name, num_experts, k in shapes:
        gen = _generator(num_experts)
        gate_up = torch.randn(num_experts, 2 * EXPERT_INTERMEDIATE, EXPERT_HIDDEN, generator=gen) * EXPERT_HIDDEN**-0.5
        down = torch.randn(num_experts, EXPERT_HIDDEN, EXPERT_INTERMEDIATE, generator=gen) * EXPERT_INTERMEDIATE**-0.5
        family = base.EXPERT_FAMILIES[name]
        for num_tokens in tokens:
            gen = _generator(num_tokens)
            hidden = torch.randn(num_tokens, EXPERT_HIDDEN, generator=gen)
            logits = torch.randn(num_tokens, num_experts, generator=gen)
            weights, ids32 = moe_kernels.softmax_topk(logits, k, renormalize=True)
            ids = ids32.long()  # what HF's routers hand their experts
            for direction in directions:
                backward = direction == "fwd+bwd"
                leaves = [t.detach().clone().requires_grad_(backward) for t in (hidden, gate_up, down)]
                modules = {
                    impl: base.hf_experts_module(family, leaves[1], leaves[2], impl) for impl in ("eager", "grouped_mm")
                }
                grad = torch.randn(num_tokens, EXPERT_HIDDEN, generator=gen)
                calls = {
                    OURS: _experts_call(
                        functools.partial(moe_kernels.fused_experts, *leaves, weights, ids), leaves, grad, backward
                    )
                }
                for impl, module in modules.items():
                    calls[f"hf_{impl}"] = _experts_call(
                        functools.partial(module, leaves[0], ids, weights),
                        [leaves[0], module.gate_up_proj, module.down_proj],
                        grad,
                        backward,
                    )
                yield Point(
                    f"fused_experts {direction}",
                    f"{name} E={num_experts} k={k} H={EXPERT_HIDDEN} I={EXPERT_INTERMEDIATE} T={num_tokens}",
                    calls,
                    {"hf_eager": 1.2, "hf_grouped_mm": 1.0},
                    num_tokens,
                )


def _experts_call(forward, leaves, grad, backward):
    if not backward:

        def call():
            with torch.no_grad():
                return forward()

        return call
    return lambda: torch.autograd.grad(forward(), leaves, grad)
