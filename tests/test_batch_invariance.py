"""Batch invariance: inside ``moe_kernels.batch_invariant()`` every op gives a row the same bits
whether it is computed alone or in a batch of 7, 64 or 300, first, last or in the middle, on the
CPU path (1 and 2 threads) and in the Triton kernels (CUDA, or the interpreter); the routing ops
that are invariant by default stay so outside the mode; repeated calls are bitwise equal."""

from __future__ import annotations

import pytest
import torch

import moe_kernels as mk
from moe_kernels import RoutingConfig

SIZES = (7, 64, 300)
E, K, N, H, I = 16, 4, 5, 40, 24  # odd widths: rows of different alignments
GROUPED = RoutingConfig.deepseek_v3(num_groups=4, topk_groups=2)


def _rows(name: str, count: int, dtype: torch.dtype, seed: int, sizes: tuple = (H, I)) -> tuple:
    """``count`` rows of op ``name``'s per-token inputs."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(count, E, generator=g).to(dtype)
    if name in ("softmax_topk", "grouped", "probmoe"):
        return (logits,)
    sims = torch.rand(count, N, generator=g)
    if name == "knn_mix":
        return logits, torch.randn(count, N, E, generator=g), sims
    if name == "knn_route":
        return logits, torch.randint(0, 50, (count, N), generator=g), sims
    hidden = torch.randn(count, sizes[0], generator=g).to(dtype)
    weights, ids = mk.softmax_topk(logits.float(), K)
    return hidden, weights, torch.where(ids == 3, -1, ids)  # a few empty slots


def _op(name: str, dtype: torch.dtype, device: str, backend: str, sizes: tuple = (H, I)):
    """The op on a batch of rows -> a tuple of per-row outputs (``sizes``: the experts' H, I)."""
    g = torch.Generator().manual_seed(99)
    hidden_size, width = sizes
    memory = torch.randn(50, E, generator=g).to(device)
    bias = (torch.randn(E, generator=g) * 0.05).to(device)
    gate_up = (torch.randn(E, 2 * width, hidden_size, generator=g) * hidden_size**-0.5).to(device, dtype)
    down = (torch.randn(E, hidden_size, width, generator=g) * width**-0.5).to(device, dtype)
    ops = {
        "softmax_topk": lambda l: mk.softmax_topk(l, K, routing=RoutingConfig.renormalize(), backend=backend),
        "grouped": lambda l: mk.softmax_topk(l.float(), K, routing=GROUPED, bias=bias, backend=backend),
        "probmoe": lambda l: mk.probmoe_route(l, K, k_min=1, training=False, renormalize=True, backend=backend),
        "knn_mix": lambda r, n, s: mk.knn_mix(r, n, s, backend=backend),
        "knn_route": lambda r, n, s: mk.knn_route(r, n, s, memory, K, routing=GROUPED, bias=bias, backend=backend),
        "fused_experts": lambda x, w, i: (mk.fused_experts(x, gate_up, down, w, i, backend=backend),),
    }
    return ops[name]


def _assert_invariant(
    name: str, dtype: torch.dtype, device: str = "cpu", backend: str = "auto", sizes=SIZES, dims: tuple = (H, I)
):
    op = _op(name, dtype, device, backend, dims)
    probe = [t.to(device) for t in _rows(name, 3, dtype, 0, dims)]
    alone = [op(*[t[row : row + 1] for t in probe]) for row in range(3)]
    for size in sizes:
        batch = [t.to(device) for t in _rows(name, size, dtype, size, dims)]
        for row, at in enumerate((0, size // 2, size - 1)):  # each probe row at one position
            for tensor, source in zip(batch, probe):
                tensor[at] = source[row]
        outputs = op(*batch)
        for row, at in enumerate((0, size // 2, size - 1)):
            for got, expected in zip(outputs, alone[row]):
                assert torch.equal(got[at], expected[0]), (name, dtype, size, at, (got[at] - expected[0]).abs().max())


CPU_OPS = ("softmax_topk", "grouped", "probmoe", "knn_mix", "knn_route", "fused_experts")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", CPU_OPS)
def test_cpu_ops_are_batch_invariant_in_the_mode(name, dtype, threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with mk.batch_invariant():
            _assert_invariant(name, dtype)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("name", ("softmax_topk", "grouped", "probmoe", "knn_mix"))
def test_cpu_routing_is_batch_invariant_by_default(name):
    assert not mk.is_batch_invariant()
    for dtype in (torch.float32, torch.bfloat16):
        _assert_invariant(name, dtype)


def test_the_checks_can_fail_outside_the_mode():
    """Outside the mode the fastest CPU path of fused_experts (oneDNN's GEMMs, at aligned sizes)
    varies with the batch, and the check sees it: its passing in the mode is evidence."""
    with pytest.raises(AssertionError):
        _assert_invariant("fused_experts", torch.float32, dims=(256, 128))
    with mk.batch_invariant():
        _assert_invariant("fused_experts", torch.float32, dims=(256, 128))


@pytest.mark.parametrize("name", CPU_OPS)
def test_repeated_calls_are_bitwise_equal(name):
    op = _op(name, torch.float32, "cpu", "auto")
    rows = _rows(name, 64, torch.float32, seed=5)
    first, second = op(*rows), op(*rows)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_the_mode_switches():
    assert mk.set_batch_invariant(True) is False
    try:
        assert mk.is_batch_invariant()
        with mk.batch_invariant(False):
            assert not mk.is_batch_invariant()
        assert mk.is_batch_invariant()
    finally:
        assert mk.set_batch_invariant(False) is True
    with pytest.raises(RuntimeError), mk.batch_invariant():
        raise RuntimeError("a failing step")
    assert not mk.is_batch_invariant()
    with pytest.raises(TypeError, match="enabled must be a bool"):
        mk.set_batch_invariant(1)


@pytest.mark.kernel
@pytest.mark.parametrize("name", CPU_OPS)
def test_triton_ops_are_batch_invariant_in_the_mode(name, kernel_device):
    dtypes = (torch.float32, torch.bfloat16) if kernel_device == "cuda" else (torch.float32,)
    with mk.batch_invariant():
        for dtype in dtypes:
            _assert_invariant(name, dtype, kernel_device, "triton", sizes=(7, 64, 300))
