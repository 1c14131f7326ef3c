"""Routing replay and batch-invariant mode: what each costs, measured against the plain call in the
same run.

================  ===============  ============================================================
group             provider         what runs
================  ===============  ============================================================
replay            plain            one forward of a model of one ``moe_kernels.MoE`` layer
                  record           ``with replay.record(model) as r: model(x)`` (taps attached,
                                   the forward's ids stored, taps removed)
                  record_open      ``model(x)`` inside an open ``record`` (one step of a recorded
                                   ``generate``: the per-forward cost alone)
                  replay           ``with replay.replay(model, r): model(x)`` (the recorded ids
                                   forced, the weights recomputed from the live logits)
batch_invariant   default          the op as it runs by default (its fastest path)
                  invariant        the same call with ``moe_kernels.set_batch_invariant(True)``
================  ===============  ============================================================

The replay group's layer routes like OLMoE's (E = 64, k = 8, renormalised; float32) at H = 256
with experts 16 wide, so that the layer itself is cheap and what record and replay add, per layer
and per forward (``extra_us``: the row's median minus the plain row's, whatever the experts
cost), is not lost in its noise. ``ratio`` is a row's median over the plain /
default row of its point. The batch-invariant group runs each op at decode and prefill sizes: the
routing ops at T = 1 / 64 / 4096 (E = 64, k = 8; kNN with n = 8 over 4096 memory rows),
``fused_experts`` at OLMoE-1B-7B's layer in bfloat16 (H = 2048, I = 1024, E = 64, k = 8) at T = 1 /
64 / 512 (its invariant CPU path is a compiled loop per routed row: about 0.7 s per call at 512
tokens).

    python -m benchmarks.bench_replay --quick
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

import moe_kernels as mk
from benchmarks.command import bench_parser, main_for
from benchmarks.common import resolve_device, time_fn, warm_up
from moe_kernels import replay

OP_NAME = "replay"
GROUPS = ("replay", "batch_invariant")
TABLE_COLUMNS = ("group", "op", "dtype", "T", "provider", "median_us", "p20_us", "p80_us", "ratio", "extra_us", "timer")
HIDDEN, EXPERTS, K, NEIGHBORS, MEMORY = 256, 64, 8, 8, 4096
ROUTING_TOKENS, QUICK_TOKENS = (1, 64, 4096), (1, 64)
# OLMoE-1B-7B's experts (bfloat16), and the quick run's small ones.
EXPERT_SIZES, QUICK_EXPERT_SIZES = (2048, 1024, 64, 8), (256, 128, 16, 4)
EXPERT_TOKENS, QUICK_EXPERT_TOKENS = (1, 64, 512), (1, 16)


def _replay_rows(tokens: Sequence[int], device: torch.device) -> list[dict]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(mk.MoE(HIDDEN, 16, EXPERTS, K, routing=mk.RoutingConfig.renormalize(), device=device))
    rows, keep_open = [], contextlib.ExitStack()
    for num_tokens in tokens:
        x = torch.randn(1, num_tokens, HIDDEN, device=device)
        with torch.no_grad(), replay.record(model) as recorded:
            model(x)

        def record(x=x):
            with replay.record(model):
                return model(x)

        def forced(x=x, recorded=recorded):
            with replay.replay(model, recorded):
                return model(x)

        def record_open(x=x):
            if not keep_open._exit_callbacks:
                keep_open.enter_context(replay.record(model))
            return model(x)

        calls = {"plain": lambda x=x: model(x), "record": record, "record_open": record_open, "replay": forced}
        case = {"group": "replay", "op": "MoE layer", "dtype": "float32", "T": num_tokens}
        with keep_open:  # the open record's ids are dropped with it
            rows += _timed(case, {name: (call, False) for name, call in calls.items()}, device)
    return rows


def _routing_calls(num_tokens: int, device: torch.device) -> dict:
    """op -> a call on ``num_tokens`` rows."""
    g = torch.Generator(device="cpu").manual_seed(num_tokens)
    logits = torch.randn(num_tokens, EXPERTS, generator=g).to(device)
    neighbor_logits = torch.randn(num_tokens, NEIGHBORS, EXPERTS, generator=g).to(device)
    sims = torch.rand(num_tokens, NEIGHBORS, generator=g).to(device)
    ids = torch.randint(0, MEMORY, (num_tokens, NEIGHBORS), generator=g).to(device)
    memory = torch.randn(MEMORY, EXPERTS, generator=g).to(device)
    renormalize = mk.RoutingConfig.renormalize()
    return {
        "softmax_topk": lambda: mk.softmax_topk(logits, K, routing=renormalize),
        "knn_mix": lambda: mk.knn_mix(logits, neighbor_logits, sims),
        "knn_route": lambda: mk.knn_route(logits, ids, sims, memory, K, routing=renormalize),
        "probmoe_route": lambda: mk.probmoe_route(logits, K, k_min=2, training=False),
    }


def _experts_calls(num_tokens: int, sizes: tuple, device: torch.device) -> dict:
    hidden, width, experts, k = sizes
    g = torch.Generator(device="cpu").manual_seed(num_tokens)
    gate_up = (torch.randn(experts, 2 * width, hidden, generator=g) * hidden**-0.5).to(device, torch.bfloat16)
    down = (torch.randn(experts, hidden, width, generator=g) * width**-0.5).to(device, torch.bfloat16)
    x = torch.randn(num_tokens, hidden, generator=g).to(device, torch.bfloat16)
    weights, ids = mk.softmax_topk(torch.randn(num_tokens, experts, generator=g).to(device), k)
    return {"fused_experts": lambda: mk.fused_experts(x, gate_up, down, weights, ids)}


def _invariant_rows(tokens: Sequence[int], expert_tokens: Sequence[int], sizes: tuple, device) -> list[dict]:
    rows = []
    points = [(t, _routing_calls(t, device), "float32") for t in tokens]
    points += [(t, _experts_calls(t, sizes, device), "bfloat16") for t in expert_tokens]
    for num_tokens, calls, dtype in points:
        for op, call in calls.items():
            case = {"group": "batch_invariant", "op": op, "dtype": dtype, "T": num_tokens}
            rows += _timed(case, {"default": (call, False), "invariant": (call, True)}, device)
    return rows


def _timed(case: dict, calls: dict, device: torch.device) -> list[dict]:
    """One row per provider of ``calls`` (``{provider: (call, batch-invariant mode)}``; the first
    is the baseline of ``ratio``)."""
    rows = []
    with torch.no_grad():
        for provider, (call, invariant) in calls.items():
            with mk.batch_invariant(invariant):
                warm_up(call, device)
                rows.append({**case, "provider": provider, **time_fn(call, device=device)})
    for row in rows:
        row["ratio"] = row["median_us"] / rows[0]["median_us"]
        row["extra_us"] = row["median_us"] - rows[0]["median_us"]
    return rows


def run(*, quick: bool = False, device=None, groups: Sequence[str] | None = None) -> list[dict]:
    """Rows of both groups (or of ``groups``)."""
    device = resolve_device(device)
    tokens = QUICK_TOKENS if quick else ROUTING_TOKENS
    rows = []
    if "replay" in (groups or GROUPS):
        rows += _replay_rows(tokens, device)
    if "batch_invariant" in (groups or GROUPS):
        expert_tokens = QUICK_EXPERT_TOKENS if quick else EXPERT_TOKENS
        rows += _invariant_rows(tokens, expert_tokens, QUICK_EXPERT_SIZES if quick else EXPERT_SIZES, device)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser("bench_replay", __doc__, "small sizes, T = 1 and 64 (seconds)")
    parser.add_argument("--groups", nargs="+", choices=GROUPS)
    return main_for(OP_NAME, parser, argv, run, TABLE_COLUMNS)


if __name__ == "__main__":
    raise SystemExit(main())
