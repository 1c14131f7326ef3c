"""What each rank runs for ``tests/test_faults_distributed.py``: one fault per scenario, injected on
rank 0, each in a fresh gloo subgroup (a rank that skipped an exchange leaves its group out of
step). Every rank records ``(exception type, message, seconds)``; the parent asserts."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from moe_kernels.distributed import combine, dispatch
from moe_kernels.distributed.agree import set_exchange_timeout

H = 16
BOUND_S = 2.0  # the exchange timeout the scenarios run with


class InjectedFault(Exception):
    """The failure a scenario injects on rank 0."""


def _inputs(rank: int, world: int, requires_grad: bool = False):
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(5, H, generator=g).requires_grad_(requires_grad)
    ids = torch.randint(0, 2 * world, (5, 2), generator=g)
    return x, ids, torch.rand(5, 2, generator=g).requires_grad_(requires_grad)


def _round_trip(x, ids, weights, world, group, width=H):
    recv, handle = dispatch(x, ids, 2 * world, group)
    expert_out = recv[:, :width] * 2.0
    return combine(expert_out, handle, weights)


def _scenario(name: str, rank: int, world: int, group) -> None:
    x, ids, weights = _inputs(rank, world)
    if name == "E differs (all divisible)":
        dispatch(x, ids, 2 * world if rank == 0 else 4 * world, group)
    elif name == "E not divisible on rank 0":
        dispatch(x, ids, 2 * world + 1 if rank == 0 else 2 * world, group)
    elif name == "expert output 8 wide on rank 0":
        _round_trip(x, ids, weights, world, group, width=8 if rank == 0 else H)
    elif name == "requires_grad on rank 0 only":
        dispatch(x.detach().requires_grad_(rank == 0), ids, 2 * world, group)
    elif name == "rank 0 fails before dispatch":
        if rank == 0:
            raise InjectedFault("before dispatch")
        dispatch(x, ids, 2 * world, group)
    elif name == "rank 0 fails between dispatch and combine":
        recv, handle = dispatch(x, ids, 2 * world, group)
        if rank == 0:
            raise InjectedFault("between dispatch and combine")
        combine(recv * 2.0, handle, weights)
    elif name == "rank 0 fails in backward":
        x, ids, weights = _inputs(rank, world, requires_grad=True)
        out = _round_trip(x, ids, weights, world, group)
        if rank == 0:
            raise InjectedFault("instead of backward")
        out.sum().backward()
    else:
        raise AssertionError(name)


SCENARIOS = (
    "E differs (all divisible)",
    "E not divisible on rank 0",
    "expert output 8 wide on rank 0",
    "requires_grad on rank 0 only",
    "rank 0 fails before dispatch",
    "rank 0 fails between dispatch and combine",
    "rank 0 fails in backward",
)


def rank_faults(rank: int, world: int) -> dict:
    """Every scenario's outcome on this rank, and a clean round trip after them all."""
    set_exchange_timeout(BOUND_S)
    outcomes = {}
    for name in SCENARIOS:
        group = dist.new_group(backend="gloo")  # every rank, the same order: outside the faults
        start = time.perf_counter()
        try:
            _scenario(name, rank, world, group)
            outcomes[name] = ("ok", "", time.perf_counter() - start)
        except Exception as error:  # noqa: BLE001 - the outcome is what is checked
            outcomes[name] = (type(error).__name__, str(error), time.perf_counter() - start)
    x, ids, weights = _inputs(rank, world)
    out = _round_trip(x, ids, weights, world, dist.new_group(backend="gloo"))
    outcomes["clean after faults"] = ("ok", f"{tuple(out.shape)}", 0.0)
    return outcomes
