"""Inputs and shape sets shared by the experts family's tests (``grouped_mm``, ``fused_experts``,
``moe_align``, ``expert_counts``)."""

from __future__ import annotations

import contextlib
import math

import torch
from oracles import fused_experts_oracle

from moe_kernels.ops.tuned_configs import pinned_config

F64 = torch.float64

# ------------------------------------------------------------------------------------------------
# grouped_mm

# Small tiles keep the interpreter fast and put several tiles in every group dimension.
SMALL = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)

# (M, K, N, rows per group): the rows past sum(counts) are the zero tail.
SHAPES = {
    "m0": (0, 8, 8, [0, 0]),
    "m1": (1, 5, 3, [1]),
    "tail": (20, 12, 10, [5, 7]),
    "all-empty": (6, 4, 5, [0, 0, 0]),
    "long-tail": (50, 8, 12, [3, 4]),
    "empty-first-mid-last": (45, 16, 24, [0, 12, 0, 28, 0]),
    "single-group": (33, 20, 17, [33]),
    "small-and-large-groups": (64, 24, 16, [2, 40, 5, 17]),
    "prime": (37, 47, 97, [3, 0, 19, 8, 5]),
    # Degenerate: nothing to multiply (the launchers write zeros without a launch).
    "k0": (5, 0, 4, [2, 2]),
    "n0": (4, 3, 0, [4]),
    "g0": (3, 4, 2, []),
}

# (M, K, N, offsets) of the reference against the oracles.
GROUP_CASES = [
    (10, 6, 5, [0, 3, 3, 10]),  # empty first and middle groups
    (9, 6, 5, [2, 5, 5]),  # rows 5..8 past the end
    (12, 6, 5, [12]),
    (7, 6, 5, [0, 7, 7]),
    (0, 6, 5, [0, 0, 0]),
    (8, 6, 5, [0, 0, 0]),  # every row past the end
    (33, 97, 47, [5, 5, 20, 30]),
]
GROUP_IDS = [f"M{m}-K{k}-N{n}-{'_'.join(map(str, o))}" for m, k, n, o in GROUP_CASES]


def offsets_of(counts, device="cpu"):
    """``(G,)`` int32 group ends of groups of ``counts`` rows."""
    return torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32).to(device)


def uniform(*shape, generator, dtype=torch.float32):
    """Values in [-1, 1): products and sums stay O(sqrt(K)), errors O(sqrt(K) eps)."""
    return (torch.rand(*shape, generator=generator, dtype=torch.float64) * 2 - 1).to(dtype)


def grouped_inputs(m, k, n, counts, dtype=torch.float32, device="cpu", seed=0):
    """``a (M, K)``, ``b (G, K, N)``, offsets and an output gradient ``(M, N)``."""
    generator = torch.Generator().manual_seed(seed)
    a = uniform(m, k, generator=generator, dtype=dtype)
    b = uniform(len(counts), k, n, generator=generator, dtype=dtype)
    grad = uniform(m, n, generator=generator, dtype=dtype)
    return a.to(device), b.to(device), offsets_of(counts, device), grad.to(device)


def grouped_normal_inputs(m, k, n, offsets, seed=0):
    """float64 ``a``, ``b`` scaled by 1/sqrt(K) (outputs O(1), like a layer's: the float32
    tolerance's atol is absolute, and the float32 rounding error grows with the output's scale)
    and int32 ``offsets``."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k, generator=g, dtype=F64)
    b = torch.randn(len(offsets), k, n, generator=g, dtype=F64) / math.sqrt(k)
    return a, b, torch.tensor(offsets, dtype=torch.int32)


def gather_inputs(device, dtype, m_src=23, k=20, n=18, counts=(7, 0, 16, 5), seed=1):
    """Inputs of the gathering / row-scaling grouped GEMM launchers: ``[a, b, a_rows, scale,
    grad, offsets]``, with 3 output rows past the groups."""
    generator = torch.Generator().manual_seed(seed)
    m_out = sum(counts) + 3
    a = uniform(m_src, k, generator=generator, dtype=dtype)
    b = uniform(len(counts), k, n, generator=generator, dtype=dtype)
    a_rows = torch.randint(0, m_src, (m_out,), generator=generator, dtype=torch.int32)
    # Scales with 2 fraction bits: times a float16/float32 value, exact in float32.
    scale = torch.randint(4, 13, (m_out,), generator=generator).to(torch.float32) / 4
    grad = uniform(m_out, n, generator=generator, dtype=dtype)
    return [t.to(device) for t in (a, b, a_rows, scale, grad)] + [offsets_of(list(counts), device)]


# ------------------------------------------------------------------------------------------------
# fused_experts


def fused_problem(num_tokens, hidden, inter, num_experts, k, *, dtype=torch.float32, bias=False, device="cpu", seed=0):
    """The op's arguments as a dict: layer-scaled projections, distinct experts per token and
    one empty (-1) slot when T > 2 and k > 1."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(dtype).to(device)

    rows = [torch.randperm(num_experts, generator=generator)[:k] for _ in range(num_tokens)]
    ids = (torch.stack(rows) if rows else torch.zeros(0, k, dtype=torch.int64)).int()
    if num_tokens > 2 and k > 1:
        ids[1, -1] = -1  # an empty slot
    return dict(
        hidden=randn(num_tokens, hidden),
        gate_up_proj=randn(num_experts, 2 * inter, hidden, scale=hidden**-0.5),
        down_proj=randn(num_experts, hidden, inter, scale=inter**-0.5),
        weights=torch.rand(num_tokens, k, generator=generator)
        .to(torch.float64 if dtype == torch.float64 else torch.float32)
        .to(device),
        ids=ids.to(device),
        gate_up_bias=randn(num_experts, 2 * inter, scale=0.5) if bias else None,
        down_bias=randn(num_experts, hidden, scale=0.5) if bias else None,
    )


def to_float64(p):
    """The problem with every float tensor in float64."""
    return {key: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for key, v in p.items()}


def small_tiles(device):
    """The interpreter runs one program at a time: small tiles keep the tests fast there."""
    return pinned_config(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16) if device == "cpu" else contextlib.nullcontext()


def routed_ids(num_tokens, num_experts, k, mode, generator):
    """``(T, k)`` int32 ids: ``"random"`` (distinct per token), ``"holes"`` (30% -1, token 0 with
    none), ``"one"`` (every slot on one expert) or ``"sparse"`` (even experts only, repeats)."""
    if mode == "one":
        return torch.full((num_tokens, k), num_experts // 2, dtype=torch.int32)
    if mode == "sparse":
        pool = torch.arange(0, num_experts, 2)
        return pool[torch.randint(len(pool), (num_tokens, k), generator=generator)].to(torch.int32)
    ids = torch.rand(num_tokens, num_experts, generator=generator).argsort(dim=-1)[:, :k].to(torch.int32)
    if mode == "holes":
        ids[torch.rand(num_tokens, k, generator=generator) < 0.3] = -1
        ids[:1] = -1
    return ids


def reference_problem(
    num_tokens, num_experts, k, hidden_dim, inter, *, mode="random", bias=False, seed=0, gate_scale=3.0
):
    """Random float64 inputs (never zero). ``gate_scale`` sets the std of the pre-activation, so
    that a few GPT-OSS gates and ups lie beyond the clamp limit 7."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden=torch.randn(num_tokens, hidden_dim, generator=g, dtype=F64),
        gate_up_proj=torch.randn(num_experts, 2 * inter, hidden_dim, generator=g, dtype=F64)
        * (gate_scale / math.sqrt(hidden_dim)),
        down_proj=torch.randn(num_experts, hidden_dim, inter, generator=g, dtype=F64) / math.sqrt(inter),
        weights=torch.rand(num_tokens, k, generator=g, dtype=F64) + 0.1,
        ids=routed_ids(num_tokens, num_experts, k, mode, g),
        gate_up_bias=torch.randn(num_experts, 2 * inter, generator=g, dtype=F64) if bias else None,
        down_bias=torch.randn(num_experts, hidden_dim, generator=g, dtype=F64) * 0.5 if bias else None,
    )


# (T, E, k, ids mode, H, I)
CASES = [
    (0, 5, 2, "random", 16, 12),
    (1, 1, 1, "random", 16, 12),
    (1, 8, 8, "holes", 16, 12),
    (7, 1, 1, "holes", 16, 12),
    (7, 5, 1, "random", 16, 12),
    (7, 5, 5, "random", 16, 12),
    (7, 8, 2, "holes", 16, 12),
    (64, 8, 2, "random", 16, 12),
    (64, 8, 8, "holes", 16, 12),
    (64, 5, 2, "one", 16, 12),
    (64, 8, 2, "sparse", 16, 12),
    (64, 8, 2, "random", 97, 47),
]
CASE_IDS = [f"T{t}-E{e}-k{k}-{mode}-H{h}-I{i}" for t, e, k, mode, h, i in CASES]


# A problem's tensors in the order of every fused experts signature (public op, reference,
# launchers, registered op, C++ oracle): these five, the activation (in a backward, ``h`` before
# it), then the two biases.
INPUTS = ("hidden", "gate_up_proj", "down_proj", "weights", "ids")


def inputs_of(p) -> tuple:
    """``(hidden, gate_up_proj, down_proj, weights, ids)`` of the problem ``p``."""
    return tuple(p[name] for name in INPUTS)


def biases_of(p) -> tuple:
    """``(gate_up_bias, down_bias)`` of the problem ``p`` (None without biases)."""
    return p["gate_up_bias"], p["down_bias"]


def cast(p, dtype):
    return {name: t.to(dtype) if t is not None and t.is_floating_point() else t for name, t in p.items()}


def call(fn, p, activation, **extra):
    """``fn`` (the reference, or the public op) on the problem ``p``."""
    return fn(*inputs_of(p), activation=activation, gate_up_bias=p["gate_up_bias"], down_bias=p["down_bias"], **extra)


def oracle(p, activation):
    """The float64 loop oracle on the problem ``p``."""
    return fused_experts_oracle(**p, activation=activation)


def cpp(cref, p, activation):
    """The C++ oracle on the problem ``p``."""
    return cref.fused_experts_ref(*inputs_of(p), activation, *biases_of(p))
