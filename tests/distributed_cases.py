"""What each rank of the expert-parallel tests runs (``tests/test_distributed.py`` spawns the
ranks). Every check only *records* its outcome: a rank that raised an assertion here would leave
its peers waiting in the next collective, so the parent process asserts on the records.

Every rank builds the same block and draws every rank's tokens from the same seeds, so each one
can compute the unsharded float64 (or float32) oracle itself, with no extra communication.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from moe_kernels import MoE, TopKRouter, testing
from moe_kernels.config import RoutingConfig
from moe_kernels.distributed import ExpertParallelMoE, combine, dispatch

HIDDEN, INTER = 16, 8
EXPERT_PARAMS = ("gate_up_proj", "down_proj", "gate_up_bias", "down_bias")


class DropSlotsRouter(nn.Module):
    """Top-k routing that empties (id -1) every slot whose weight is below ``threshold``: a
    content-based rule, so a token is routed alike wherever it lives."""

    def __init__(self, hidden_size, num_experts, k, threshold, dtype):
        super().__init__()
        self.inner = TopKRouter(hidden_size, num_experts, k, dtype=dtype)
        self.threshold = threshold

    def forward(self, hidden):
        weights, ids = self.inner(hidden)
        return weights, torch.where(weights < self.threshold, torch.full_like(ids, -1), ids)


class OneExpertRouter(nn.Module):
    """Every token to the last expert (k = 1), weighted by a sigmoid gate (so the router still
    gets a gradient)."""

    def __init__(self, hidden_size, num_experts, dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_experts, hidden_size, dtype=dtype) * hidden_size**-0.5)

    def forward(self, hidden):
        weights = torch.sigmoid(nn.functional.linear(hidden, self.weight)[:, -1:])
        ids = torch.full((hidden.shape[0], 1), self.weight.shape[0] - 1, dtype=torch.int32, device=hidden.device)
        return weights, ids


@dataclass(frozen=True)
class Case:
    """A block configuration: experts per rank (E = experts_per_rank * W), tokens per rank."""

    dtype: torch.dtype
    experts_per_rank: int = 2
    k: int = 2
    router: str = "topk"  # "topk", "drop_slots" or "one_expert"
    tokens: str = "uneven"  # "uneven", "first_empty" or "last_empty"
    options: dict = field(default_factory=dict)
    seed: int = 0


CASES = {
    "f64-topk-bias-shared-gate": Case(
        torch.float64,
        options=dict(
            expert_bias=True, shared_intermediate_size=8, shared_gate=True, routing=RoutingConfig.renormalize()
        ),
    ),
    "f64-first-rank-no-tokens-gelu-tanh": Case(
        torch.float64, tokens="first_empty", options=dict(activation="gelu_tanh", shared_intermediate_size=8), seed=1
    ),
    "f64-empty-slots-gpt-oss": Case(
        torch.float64, k=3, router="drop_slots", options=dict(activation="gpt_oss", expert_bias=True), seed=2
    ),
    "f64-all-to-one-expert": Case(torch.float64, router="one_expert", tokens="last_empty", seed=3),
    "f64-one-expert-per-rank": Case(torch.float64, experts_per_rank=1, options=dict(activation="gelu"), seed=4),
    "f32-topk-bias-shared-gate": Case(
        torch.float32, options=dict(expert_bias=True, shared_intermediate_size=8, shared_gate=True), seed=5
    ),
}


def tokens_per_rank(kind: str, world: int) -> list[int]:
    counts = [3 + 4 * rank for rank in range(world)]
    if kind == "first_empty":
        counts[0] = 0
    elif kind == "last_empty":
        counts[-1] = 0
    return counts


def build_moe(case: Case, world: int) -> MoE:
    num_experts = case.experts_per_rank * world
    torch.manual_seed(case.seed)
    options = dict(case.options)
    if case.router == "drop_slots":
        options["router"] = DropSlotsRouter(HIDDEN, num_experts, case.k, 0.2, case.dtype)
    elif case.router == "one_expert":
        options["router"] = OneExpertRouter(HIDDEN, num_experts, case.dtype)
    k = 1 if case.router == "one_expert" else case.k
    moe = MoE(HIDDEN, INTER, num_experts, k, dtype=case.dtype, **options)
    with torch.no_grad():  # MoE starts its biases at zero: make them count
        for bias in (moe.gate_up_bias, moe.down_bias):
            if bias is not None:
                bias.normal_()
    return moe


def _record(actual, expected, dtype, op=None) -> dict:
    if actual is None:
        return dict(ok=False, err="no gradient")
    expected = torch.zeros_like(actual) if expected is None else expected
    atol, rtol = testing.tolerance(dtype, op)
    same_shape = actual.shape == expected.shape
    ok = same_shape and torch.allclose(actual.double(), expected.double(), atol=atol, rtol=rtol)
    err = testing.max_errors(actual, expected)[0] if same_shape else f"shape {tuple(actual.shape)}"
    return dict(ok=bool(ok), err=err)


def compare_with_unsharded(rank: int, world: int, case: Case) -> dict:
    """ExpertParallelMoE on this rank's tokens against the unsharded block: one record per
    output / gradient, and the routing statistics the parent checks the case exercises."""
    moe = build_moe(case, world)
    block = ExpertParallelMoE.from_moe(moe)
    counts = tokens_per_rank(case.tokens, world)
    lo, hi = sum(counts[:rank]), sum(counts[: rank + 1])
    generator = torch.Generator().manual_seed(100 + case.seed)
    x = torch.randn(sum(counts), HIDDEN, generator=generator, dtype=torch.float64).to(case.dtype)
    grad = torch.randn(sum(counts), HIDDEN, generator=generator, dtype=torch.float64).to(case.dtype)

    full = copy.deepcopy(moe)  # every rank's tokens: outputs, input and expert gradients
    x_all = x.clone().requires_grad_(True)
    expected = full(x_all)
    (expected * grad).sum().backward()
    local = copy.deepcopy(moe)  # this rank's tokens: the router's and shared expert's contribution
    (local(x[lo:hi]) * grad[lo:hi]).sum().backward()

    x_local = x[lo:hi].clone().requires_grad_(True)
    out = block(x_local)
    (out * grad[lo:hi]).sum().backward()

    op = "fused_experts" if case.dtype == torch.float32 else None
    records = {"output": _record(out, expected[lo:hi].detach(), case.dtype, op)}
    records["grad x"] = _record(x_local.grad, x_all.grad[lo:hi], case.dtype, op)
    full_params, local_params = dict(full.named_parameters()), dict(local.named_parameters())
    num_local = case.experts_per_rank
    for name, param in block.named_parameters():
        if name in EXPERT_PARAMS:
            reference = full_params[name].grad[rank * num_local : (rank + 1) * num_local]
        else:
            reference = local_params[name].grad
        records[f"grad {name}"] = _record(param.grad, reference, case.dtype, op)
    with torch.no_grad():
        _, ids = moe.router(x)
    return dict(
        records=records,
        names=sorted(name for name, _ in block.named_parameters()),
        expert_shapes={name: tuple(p.shape) for name in EXPERT_PARAMS if (p := getattr(block, name)) is not None},
        empty_slots=int((ids < 0).sum()),
        experts_used=sorted(set(ids[ids >= 0].tolist())),
        tokens=counts[rank],
    )


def identity_data(rank: int, world: int, dtype: torch.dtype, empty_rank: int | None = None):
    """Rank ``rank``'s tokens for the exchange checks (every rank can draw every rank's):
    ``x (T, H)``, ``ids (T, 3)`` with empty slots, ``weights (T, 3)`` float32; ``empty_rank`` has
    no tokens."""
    num_tokens = 0 if rank == empty_rank else 5 + 3 * rank
    generator = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(num_tokens, HIDDEN, generator=generator).to(dtype)
    ids = torch.randint(-1, 2 * world, (num_tokens, 3), generator=generator, dtype=torch.int32)
    weights = torch.rand(num_tokens, 3, generator=generator)
    return x, ids, weights


def _expected_rows(rank: int, world: int, dtype, empty_rank) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows this rank's 2 experts receive, in the documented order (by local expert, then
    source rank, then the source's flat slot index), and the count per local expert."""
    rows, counts = [], []
    for expert in range(rank * 2, rank * 2 + 2):
        for source in range(world):
            x_s, ids_s, _ = identity_data(source, world, dtype, empty_rank)
            slots = torch.nonzero(ids_s.reshape(-1) == expert).reshape(-1)
            rows.append(x_s[slots // 3])
        counts.append(sum(len(r) for r in rows) - sum(counts))
    return torch.cat(rows), torch.tensor(counts, dtype=torch.int32)


def check_exchange(rank: int, world: int) -> dict:
    """dispatch's rows and layout against an oracle, combine of the identity expert against
    ``sum_k weights * x`` (exact), and both gradients in float64."""
    num_experts, records = 2 * world, {}
    for dtype, empty_rank in ((torch.float32, None), (torch.float32, 1), (torch.bfloat16, None)):
        label = f"{dtype}{'' if empty_rank is None else ', rank 1 empty'}"
        x, ids, weights = identity_data(rank, world, dtype, empty_rank)
        recv, handle = dispatch(x, ids, num_experts)
        expected_rows, expected_counts = _expected_rows(rank, world, dtype, empty_rank)
        records[f"{label} recv_x"] = dict(ok=torch.equal(recv, expected_rows), err=tuple(recv.shape))
        records[f"{label} counts/offsets"] = dict(
            ok=torch.equal(handle.counts, expected_counts)
            and handle.offsets.dtype == torch.int32
            and torch.equal(handle.offsets, expected_counts.cumsum(0).int()),
            err=str(handle.offsets.tolist()),
        )
        # NaN weights at empty slots: combine must ignore them, as fused_experts does.
        out = combine(recv, handle, torch.where(ids >= 0, weights, torch.full_like(weights, float("nan"))))
        kept = torch.where(ids >= 0, weights, torch.zeros_like(weights))
        expected = (x.float().unsqueeze(1) * kept.unsqueeze(-1)).sum(1).to(dtype)
        error = testing.max_errors(out, expected)[0]
        records[f"{label} combine(identity)"] = dict(ok=torch.equal(out, expected), err=error)

    # Gradients: a row of expert e is scaled by (1 + e), so out[t] = sum_j w[t,j] (1 + e[t,j]) x[t].
    x, ids, weights = identity_data(rank, world, torch.float64)
    x.requires_grad_(True)
    weights = weights.double().requires_grad_(True)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
    recv, handle = dispatch(x, ids, num_experts)
    scale = 1.0 + (handle.expert_ids + handle.first_expert).double()
    out = combine(recv * scale.unsqueeze(-1), handle, weights)
    (out * grad).sum().backward()
    factor = torch.where(ids >= 0, 1.0 + ids.double(), torch.zeros_like(weights))
    total = (weights * factor).sum(1, keepdim=True).detach()
    records["float64 output"] = _record(out, total * x.detach(), torch.float64)
    records["float64 grad x"] = _record(x.grad, total * grad, torch.float64)
    grad_weights = factor * (grad * x.detach()).sum(-1, keepdim=True)
    records["float64 grad weights"] = _record(weights.grad, grad_weights, torch.float64)
    return records


def _outcome(call) -> tuple[str, str]:
    try:
        call()
    except Exception as error:  # noqa: BLE001 - recorded for the parent to judge
        return type(error).__name__, str(error)
    return "returned", ""


def check_bad_input(rank: int, world: int) -> dict:
    """Each bad call's outcome on this rank: (exception type, message). Runs before the other
    checks, which then show that the group survived every failed call."""
    num_experts = 2 * world
    x = torch.randn(4, HIDDEN)
    ids = torch.randint(0, num_experts, (4, 2), dtype=torch.int32)
    last = world - 1
    too_high = ids.clone().fill_(num_experts) if rank == last else ids
    too_low = torch.full_like(ids, -2) if rank == 0 else ids
    wrong_rows = ids[:3] if rank == 1 else ids
    narrow = x[:, :8].contiguous() if rank == 0 else x
    double = x.double() if rank == 0 else x
    odd = MoE(HIDDEN, INTER, world + 1, 1)
    return {
        "E not divisible": _outcome(lambda: dispatch(x, ids, num_experts + 1)),
        "from_moe E not divisible": _outcome(lambda: ExpertParallelMoE.from_moe(odd)),
        "id = E on the last rank": _outcome(lambda: dispatch(x, too_high, num_experts)),
        "id = -2 on rank 0": _outcome(lambda: dispatch(x, too_low, num_experts)),
        "ids rows != x rows on rank 1": _outcome(lambda: dispatch(x, wrong_rows, num_experts)),
        "H = 8 on rank 0, 16 elsewhere": _outcome(lambda: dispatch(narrow, ids, num_experts)),
        "float64 on rank 0, float32 elsewhere": _outcome(lambda: dispatch(double, ids, num_experts)),
    }


def check_replay(rank: int, world: int) -> dict:
    """Routing replay and load metrics of an expert-parallel model on this rank's tokens (every
    forward collective): the replayed forward reproduces the recorded one, a changed router still
    selects the recorded ids and gets a gradient, and the counts match the record."""
    from moe_kernels import balance, replay

    torch.manual_seed(7)
    model = nn.Sequential(ExpertParallelMoE.from_moe(MoE(HIDDEN, INTER, 2 * world, 2)))
    x = torch.randn(2, 3 + rank, HIDDEN, generator=torch.Generator().manual_seed(rank))
    with replay.record(model) as record, balance.measure_load(model) as load, torch.no_grad():
        expected = model(x)
    ids = record.ids("0")
    with replay.replay(model, record), torch.no_grad():
        out = model(x)
    with torch.no_grad():
        model[0].router.weight.add_(torch.randn_like(model[0].router.weight))
    with replay.replay(model, record), replay.record(model) as again:
        model(x).sum().backward()
    grad = model[0].router.weight.grad
    return dict(
        shape=tuple(ids.shape),
        same_output=bool(torch.allclose(out, expected, atol=1e-6, rtol=0)),
        same_ids=bool(torch.equal(again.ids("0"), ids)),
        router_grad=bool(grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0),
        counts=bool(torch.equal(load.counts()["0"], torch.bincount(ids.reshape(-1), minlength=2 * world))),
    )


def rank_checks(rank: int, world: int) -> dict:
    """Everything one spawn of ``world`` ranks checks (bad input first: the rest then runs on a
    group that has been through every error path)."""
    from benchmarks import bench_expert_parallel

    results = {"bad input": check_bad_input(rank, world), "exchange": check_exchange(rank, world)}
    results["replay"] = check_replay(rank, world)
    results["cases"] = {name: compare_with_unsharded(rank, world, case) for name, case in CASES.items()}
    results["bench rows"] = bench_expert_parallel.bench_rank(rank, world, bench_expert_parallel.TINY)
    return results
