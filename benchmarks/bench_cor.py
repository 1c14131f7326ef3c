"""Counterfactual Routing: the batched ``cor.expert_impact`` against a naive loop of one forward per
(token, layer, expert) what-if, and the applied routing against plain ``softmax_topk``.

Rows of panel ``expert_impact``: ``median_us`` is the time per what-if (``T`` the calibration
tokens); ``batched`` runs ``cor.expert_impact`` on one batch (its clean forward included),
``naive_loop`` times one whole-batch forward with one ablated (token, layer, expert), i.e. one
what-if of the naive loop. Rows of the routing panels: ``softmax_topk`` (the router's call
without CoR) against ``cor_route`` (the same call with CoR's prior added to the selection bias:
what an applied plan runs), at the same k, op alone and inside a ``TopKRouter`` (linear gate
included).

    python -m benchmarks.bench_cor --quick
    python -m benchmarks.bench_cor --threads 1
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from benchmarks.command import bench_parser, main_for
from benchmarks.common import resolve_device, time_fn, warm_up
from moe_kernels import TopKRouter, cor, softmax_topk
from moe_kernels.routing_override import clear_selection_override, set_selection_override

OP_NAME = "cor"
TABLE_COLUMNS = (
    "panel",
    "T",
    "provider",
    "median_us",
    "what_ifs",
    "what_ifs_per_s",
    "speedup_vs_naive",
    "ratio_vs_plain",
)
# (vocab, hidden, layers, experts, k, sequences, sequence length) of the impact model
IMPACT_MODEL = dict(vocab_size=512, hidden_size=128, num_layers=4, num_experts=16, k=2, intermediate_size=64)
IMPACT_BATCH = (8, 64)
QUICK_MODEL = dict(vocab_size=64, hidden_size=32, num_layers=2, num_experts=8, k=2, intermediate_size=16)
QUICK_BATCH = (4, 16)
ROUTING_TOKENS = (1, 64, 4096)
ROUTING_SHAPE = (2048, 64, 6)  # H, E, k (a DeepSeek-V2-Lite-sized router)
ROUNDS = 3


def _impact_rows(device, quick: bool, tokens_per_forward: int) -> list[dict]:
    sizes, (seqs, seq_len) = (QUICK_MODEL, QUICK_BATCH) if quick else (IMPACT_MODEL, IMPACT_BATCH)
    torch.manual_seed(0)
    model = cor.TinyMoELM(**sizes).to(device).eval()
    batch = torch.randint(0, sizes["vocab_size"], (seqs, seq_len), generator=torch.Generator().manual_seed(1))
    batch = batch.to(device)
    with torch.no_grad():
        clean = cor.causal_lm_token_losses(model, batch)
    finite = clean[clean.isfinite()]
    num_hard = int((clean > torch.quantile(finite, 0.7)).sum())
    what_ifs = num_hard * sizes["k"] * sizes["num_layers"]
    tokens = seqs * seq_len

    def batched():
        settings = cor.CalibrationSettings(tokens_per_forward=tokens_per_forward)
        return cor.expert_impact(model, [batch], cor.causal_lm_token_losses, settings)

    warm_up(batched, device)
    reps = 1 if not quick else 3
    start = time.perf_counter()
    for _ in range(reps):
        batched()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    batched_us = (time.perf_counter() - start) / reps * 1e6 / what_ifs

    # one what-if of the naive loop: a whole-batch forward with one row's expert ablated at layer 0
    router = model.blocks[0].moe.router
    row = int(clean.isfinite().nonzero()[0])

    def ablate(module, args, out):
        weights, ids = out
        return cor.ablate_weights(weights, ids, torch.tensor([row], device=device), ids[row : row + 1, 0].long()), ids

    handle = router.register_forward_hook(ablate)

    def naive():
        with torch.no_grad():
            return cor.causal_lm_token_losses(model, batch)[row]

    try:
        warm_up(naive, device)
        naive_timing = time_fn(naive, device=device)
    finally:
        handle.remove()
    base = {"op": OP_NAME, "panel": "expert_impact", "T": tokens, "dtype": "float32", "what_ifs": what_ifs}
    naive_us = naive_timing["median_us"]
    return [
        {**base, "provider": "naive_loop", **naive_timing, "what_ifs_per_s": 1e6 / naive_us},
        {
            **base,
            "provider": "batched",
            "median_us": batched_us,
            "p20_us": None,
            "p80_us": None,
            "timer": f"wall x{reps}",
            "what_ifs_per_s": 1e6 / batched_us,
            "speedup_vs_naive": naive_us / batched_us,
            "tokens_per_forward": tokens_per_forward,
        },
    ]


def _routing_rows(device, quick: bool, tokens: Sequence[int]) -> list[dict]:
    hidden_size, num_experts, k = (64, 16, 4) if quick else ROUTING_SHAPE
    generator = torch.Generator().manual_seed(2)
    prior = (torch.rand(num_experts, generator=generator) * 0.1).to(device)
    router = TopKRouter(hidden_size, num_experts, k).to(device)
    rows = []
    for num_tokens in tokens:
        hidden = torch.randn(num_tokens, hidden_size, generator=generator).to(device)
        logits = torch.randn(num_tokens, num_experts, generator=generator).to(device)
        rows += _routing_point(router, prior, hidden, logits, k, device)
    return rows


def _routing_point(router, prior, hidden, logits, k, device) -> list[dict]:
    """The four rows of one token count: the op without / with the prior, the router without /
    with a CoR override (same k). The four are timed in turn, ``ROUNDS`` times, and each keeps its
    fastest round, so that load from other processes on a shared CPU does not land on one of them."""
    num_tokens, num_experts = logits.shape

    def routed():
        set_selection_override(router, k, prior)
        try:
            return router(hidden)
        finally:
            clear_selection_override(router)

    calls = {
        ("softmax_topk", "softmax_topk"): lambda: softmax_topk(logits, k),
        ("softmax_topk", "cor_route"): lambda: softmax_topk(logits, k, bias=prior),
        ("TopKRouter", "softmax_topk"): lambda: router(hidden),
        ("TopKRouter", "cor_route"): routed,  # + setting and clearing the override: two dict writes
    }
    best: dict = {}
    for _ in range(ROUNDS):
        for key, call in calls.items():
            row = _routing_row(*key, num_tokens, call, device, num_experts, k)
            if key not in best or row["median_us"] < best[key]["median_us"]:
                best[key] = row
    point = list(best.values())
    for row in point:
        plain = best[(row["panel"].split()[0], "softmax_topk")]
        row["ratio_vs_plain"] = row["median_us"] / plain["median_us"]
    return point


def _routing_row(panel, provider, num_tokens, call, device, num_experts, k) -> dict:
    def run():
        with torch.no_grad():
            return call()

    warm_up(run, device)
    return {
        "op": OP_NAME,
        "panel": f"{panel} E={num_experts} k={k}",
        "T": num_tokens,
        "dtype": "float32",
        "provider": provider,
        **time_fn(run, device=device),
    }


def run(
    *, quick: bool = False, device=None, tokens: Sequence[int] | None = None, tokens_per_forward: int = 4096
) -> list[dict]:
    """The impact rows, then the routing rows."""
    device = resolve_device(device)
    tokens = tokens or ((1, 256) if quick else ROUTING_TOKENS)
    return _impact_rows(device, quick, tokens_per_forward) + _routing_rows(device, quick, tokens)


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser("bench_cor", __doc__, "a tiny model and router (seconds on a CPU)")
    parser.add_argument("--tokens", type=int, nargs="+", help="router token counts")
    parser.add_argument("--tokens-per-forward", type=int, default=4096, help="expert_impact's batching")
    return main_for(OP_NAME, parser, argv, run, TABLE_COLUMNS)


if __name__ == "__main__":
    raise SystemExit(main())
