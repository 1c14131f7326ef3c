"""The CPU goal rows of ``bench_cpu`` as pytest-benchmark tests, grouped per op and point with
their baselines in the same group, so a run can be saved and a later one compared to catch a
regression::

    pytest benchmarks --benchmark-only --benchmark-autosave
    pytest benchmarks --benchmark-only --benchmark-compare

Not part of the test command (``testpaths = ["tests"]``): nothing here passes or fails on speed.
The points are ``bench_cpu --quick``'s (a few per op); ``bench_cpu`` itself gives the ratios.
"""

from __future__ import annotations

import functools

import pytest
import torch

from benchmarks import cpu_baselines, cpu_points
from benchmarks.bench_cpu import QUICK
from moe_kernels.shapes import ROUTING_SHAPES

pytest.importorskip("pytest_benchmark")


def _specs():
    """``(group id, builder of its Point, provider names)`` for every quick point."""
    shapes = [s for s in ROUTING_SHAPES if s.model in QUICK["routing_shapes"]]
    for shape in shapes:
        providers = (cpu_points.OURS, *cpu_baselines.routing_chains(shape))
        for tokens in QUICK["routing_tokens"]:
            yield (f"softmax_topk {shape.label} T={tokens}", ("routing", shape.model, tokens), providers)
    for tokens in QUICK["knn_tokens"]:
        yield (f"knn_mix T={tokens}", ("knn", "knn_mix", tokens), (cpu_points.OURS, "mix_chain"))
        yield (f"knn_route T={tokens}", ("knn", "knn_route", tokens), (cpu_points.OURS, "gather_mix_route_chain"))
    for num_experts, k in QUICK["probmoe_shapes"]:
        for tokens in QUICK["probmoe_forward"]:
            key = ("probmoe", "exact_k fwd", num_experts, k, tokens)
            yield (f"exact_k fwd E={num_experts} k={k} T={tokens}", key, (cpu_points.OURS, "autograd_dp"))
        for tokens in QUICK["probmoe_training"]:
            key = ("probmoe", "exact_k fwd+bwd", num_experts, k, tokens)
            yield (f"exact_k fwd+bwd E={num_experts} k={k} T={tokens}", key, (cpu_points.OURS, "autograd_dp"))
    for name, num_experts, k in QUICK["expert_shapes"]:
        for tokens in QUICK["expert_tokens"]:
            for direction in ("fwd", "fwd+bwd"):
                key = ("experts", name, num_experts, k, tokens, direction)
                providers = (cpu_points.OURS, "hf_eager", "hf_grouped_mm")
                yield (f"fused_experts {direction} {name} T={tokens}", key, providers)


@functools.cache
def _point(key):
    kind = key[0]
    if kind == "routing":
        shape = next(s for s in ROUTING_SHAPES if s.model == key[1])
        return next(cpu_points.routing_points([shape], (key[2],)))
    if kind == "knn":
        return next(p for p in cpu_points.knn_points((key[2],)) if p.goal == key[1])
    if kind == "probmoe":
        _, goal, num_experts, k, tokens = key
        points = cpu_points.probmoe_points(((num_experts, k),), (tokens,), (tokens,))
        return next(p for p in points if p.goal == goal)
    _, name, num_experts, k, tokens, direction = key
    return next(cpu_points.expert_points(((name, num_experts, k),), (tokens,), (direction,)))


CASES = [(group, key, provider) for group, key, providers in _specs() for provider in providers]


@pytest.mark.parametrize("group,key,provider", CASES, ids=[f"{g} [{p}]" for g, _, p in CASES])
def test_cpu(benchmark, group, key, provider):
    torch.set_num_threads(torch.get_num_threads())  # as configured (OMP_NUM_THREADS, --threads)
    call = _point(key).calls[provider]
    benchmark.group = group
    benchmark.extra_info.update(provider=provider, threads=torch.get_num_threads())
    benchmark(call)
