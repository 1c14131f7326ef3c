"""Expert parallelism on gloo: 2 and 4 spawned CPU ranks (``moe_kernels.distributed.run_group``:
a free localhost port, each rank's results or traceback sent back, a deadline so that a broken
rank fails the test instead of hanging it).

One spawn per world size runs every check (``distributed_cases.rank_checks``: spawning and
importing torch costs seconds per process); the tests below assert on its records.
"""

from __future__ import annotations

import time

import pytest
import torch.distributed as dist
from distributed_cases import CASES, EXPERT_PARAMS, tokens_per_rank

from moe_kernels.distributed import RankError, run_group

WORLD_SIZES = (2, 4)
# Far above a healthy run (~10 s for 4 ranks on 2 cores), far below a CI job's patience.
TIMEOUT_S = 120


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"W{w}")
def ranks(request):
    """Every rank's records from one spawn of ``W`` gloo ranks: ``(W, [records of rank r])``."""
    import distributed_cases

    return request.param, run_group(distributed_cases.rank_checks, request.param, timeout=TIMEOUT_S)


def _failures(records: dict) -> dict:
    return {name: record for name, record in records.items() if not record["ok"]}


@pytest.mark.parametrize("case_name", list(CASES))
def test_matches_unsharded_block(ranks, case_name):
    world, results = ranks
    for rank, result in enumerate(results):
        case = result["cases"][case_name]
        assert not _failures(case["records"]), f"rank {rank}: {_failures(case['records'])}"
        # Every output and every parameter's gradient was compared.
        assert {f"grad {name}" for name in case["names"]} | {"output", "grad x"} == set(case["records"])
        assert case["tokens"] == tokens_per_rank(CASES[case_name].tokens, world)[rank]
        local = CASES[case_name].experts_per_rank
        for name, shape in case["expert_shapes"].items():
            assert shape[0] == local, f"rank {rank}: {name} keeps {shape[0]} experts, not E/W = {local}"
        assert "gate_up_proj" in case["expert_shapes"] and "down_proj" in case["expert_shapes"]


def test_cases_exercise_what_they_claim(ranks):
    world, results = ranks
    cases = results[0]["cases"]  # routing statistics over every rank's tokens, the same on each rank
    assert cases["f64-empty-slots-gpt-oss"]["empty_slots"] > 0
    assert cases["f64-all-to-one-expert"]["experts_used"] == [2 * world - 1]  # the last rank's
    assert cases["f64-one-expert-per-rank"]["experts_used"] == list(range(world))
    assert results[0]["cases"]["f64-first-rank-no-tokens-gelu-tanh"]["tokens"] == 0
    assert results[-1]["cases"]["f64-all-to-one-expert"]["tokens"] == 0  # the one expert's rank sends nothing
    assert {"gate_up_bias", "down_bias"} <= set(cases["f64-topk-bias-shared-gate"]["expert_shapes"])
    assert set(EXPERT_PARAMS) >= set(cases["f64-topk-bias-shared-gate"]["expert_shapes"])


def test_routing_replay_and_load_metrics_on_every_rank(ranks):
    _, results = ranks
    for rank, result in enumerate(results):
        checks = result["replay"]
        assert checks.pop("shape") == (2, 3 + rank, 2)
        assert all(checks.values()), f"rank {rank}: {checks}"


def test_dispatch_layout_and_identity_combine_exact(ranks):
    _, results = ranks
    for rank, result in enumerate(results):
        records = result["exchange"]
        assert len(records) == 12
        assert not _failures(records), f"rank {rank}: {_failures(records)}"


def test_bad_input_raises_on_every_rank(ranks):
    world, results = ranks
    outcomes = [result["bad input"] for result in results]
    last = world - 1
    for rank, outcome in enumerate(outcomes):
        kind, message = outcome["E not divisible"]
        assert kind == "ValueError" and "divisible" in message and f"num_experts = {2 * world + 1}" in message
        kind, message = outcome["from_moe E not divisible"]
        assert kind == "ValueError" and "from_moe" in message and "divisible" in message
        kind, message = outcome["H = 8 on rank 0, 16 elsewhere"]
        assert kind == "ValueError" and "hidden size H must be the same on every rank" in message and "[8, " in message
        kind, message = outcome["float64 on rank 0, float32 elsewhere"]
        assert kind == "TypeError" and "dtype must be the same on every rank" in message
        assert "[torch.float64, torch.float32" in message

        kind, message = outcome["id = E on the last rank"]
        if rank == last:
            assert kind == "ValueError" and f"[0, {2 * world})" in message and f"e.g. [{2 * world}" in message
        else:
            assert kind == "RuntimeError" and f"rank(s) [{last}]" in message
        kind, message = outcome["id = -2 on rank 0"]
        if rank == 0:
            assert kind == "ValueError" and "e.g. [-2" in message
        else:
            assert kind == "RuntimeError" and "rank(s) [0]" in message
        kind, message = outcome["ids rows != x rows on rank 1"]
        if rank == 1:
            assert kind == "ValueError" and "ids must have shape (T, k) with T = x.shape[0] = 4" in message
        else:
            assert kind == "RuntimeError" and "rank(s) [1]" in message


def test_benchmark_rows(ranks):
    world, results = ranks
    rows = results[0]["bench rows"]
    assert all(not result["bench rows"] for result in results[1:])
    providers = ("all_to_all", "allgather_reducescatter")
    assert {(row["phase"], row["provider"]) for row in rows} == {
        (phase, provider) for phase in ("dispatch", "combine", "block") for provider in providers
    }
    for row in rows:
        assert row["W"] == world and row["backend"] == "gloo" and row["median_us"] > 0
        assert (row["speedup_vs_ag_rs"] is not None) == (row["provider"] == "all_to_all")
        assert (row["gb_per_s"] is None) == (row["phase"] == "block")


def _raise_on_rank_one(rank, world):
    if rank == 1:
        raise ValueError("rank one is broken")
    dist.barrier()  # waits for rank 1, which never comes


def test_run_group_reports_a_failed_rank_without_waiting_for_the_timeout():
    start = time.monotonic()
    with pytest.raises(RankError, match="rank one is broken") as info:
        run_group(_raise_on_rank_one, 2, timeout=TIMEOUT_S)
    assert 1 in info.value.errors
    assert time.monotonic() - start < TIMEOUT_S / 2
