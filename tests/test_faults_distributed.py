"""Expert parallelism under faults, on gloo at 2 and 4 spawned ranks: a disagreement (E, the expert
output's width, requires_grad) raises a named error on every rank before any row moves; a rank that
fails before dispatch, between dispatch and combine, or instead of its backward makes its peers
raise within the exchange timeout; never a hang, a signal or a wrong result, and a new group works
after the faults."""

from __future__ import annotations

import pytest
from distributed_faults import BOUND_S

from moe_kernels.distributed import run_group
from moe_kernels.distributed.agree import exchange_timeout, set_exchange_timeout

# Seven scenarios, three of them waiting out the bound, plus spawning: well under this.
TIMEOUT_S = 120


@pytest.fixture(scope="module", params=(2, 4), ids=lambda w: f"W{w}")
def outcomes(request):
    import distributed_faults

    return request.param, run_group(distributed_faults.rank_faults, request.param, timeout=TIMEOUT_S)


def test_disagreements_raise_a_named_error_on_every_rank(outcomes):
    world, results = outcomes
    for rank, result in enumerate(results):
        kind, message, _ = result["E differs (all divisible)"]
        assert kind == "ValueError" and "num_experts must be the same on every rank" in message
        assert f"[{2 * world}, {4 * world}" in message
        kind, message, _ = result["expert output 8 wide on rank 0"]
        assert kind == "ValueError" and "expert_out's width must be the same on every rank, got [8, 16" in message
        kind, message, _ = result["requires_grad on rank 0 only"]
        assert kind == "ValueError" and "requires_grad" in message and "[1, 0" in message
        kind, message, _ = result["E not divisible on rank 0"]
        if rank == 0:
            assert kind == "ValueError" and "divisible" in message
        else:
            assert kind == "RuntimeError" and "rank(s) [0]" in message
        for name in ("E differs (all divisible)", "expert output 8 wide on rank 0", "requires_grad on rank 0 only"):
            assert result[name][2] < BOUND_S, (rank, name)  # raised at once, not after a wait


@pytest.mark.parametrize(
    "scenario,step",
    [
        ("rank 0 fails before dispatch", "dispatch"),
        ("rank 0 fails between dispatch and combine", "combine"),
        ("rank 0 fails in backward", "combine (backward)"),
    ],
)
def test_a_failed_rank_makes_its_peers_raise_within_the_bound(outcomes, scenario, step):
    _, results = outcomes
    kind, message, _ = results[0][scenario]
    assert kind == "InjectedFault"
    for rank, result in enumerate(results[1:], 1):
        kind, message, seconds = result[scenario]
        assert kind == "RuntimeError" and message.startswith(f"{step}: the peers did not join"), (rank, message)
        assert BOUND_S * 0.9 <= seconds < BOUND_S + 5, (rank, seconds)


def test_a_new_group_works_after_the_faults(outcomes):
    _, results = outcomes
    assert all(result["clean after faults"] == ("ok", "(5, 16)", 0.0) for result in results)


def test_the_exchange_timeout_is_settable_and_checked():
    previous = set_exchange_timeout(7.5)
    try:
        assert exchange_timeout() == 7.5
        for bad in (0, -1, float("inf"), float("nan"), True, "5"):
            with pytest.raises(ValueError, match="seconds must be a finite number > 0"):
                set_exchange_timeout(bad)
    finally:
        set_exchange_timeout(previous)
