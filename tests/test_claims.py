"""The claims table's decisions on synthetic per-seed numbers (every verdict reachable, from numbers
made to land on each side of each criterion), the placebo shuffles, the seeds' process runner,
and a seed's run being a function of its seed."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from moe_kernels.demo import claims as claims_module
from moe_kernels.demo import experiments
from moe_kernels.demo.context import DemoContext
from moe_kernels.demo.cor_arm import shuffled_prior
from moe_kernels.demo.model import ModelSize
from moe_kernels.demo.protocol import DELTA, PROTOCOLS
from moe_kernels.demo.seed_run import run_seed
from moe_kernels.demo.verdict import VERDICTS

PROTOCOL = replace(PROTOCOLS["full"], seeds=4)


def _arm(loss_prose, loss_code=2.0, *, experts=2.0, entropy=1.5, mass=10.0):
    return {
        "loss_prose": loss_prose,
        "loss_code": loss_code,
        "experts_per_token": experts,
        "routing_entropy": entropy,
        "experts_for_99": mass,
        "positive_logits": 1.0,
        "cardinality": [0.0, 0.0, 1.0],
        "choice": {"lr": 1e-3, "epochs": 2, "neighbors": 8, "weighting": "softmax", "min_confidence": 0.0},
        "confidence": {"prose": 0.7, "code": 0.7},
    }


def _run(seed, *, knn=-0.05, router=-0.10, full=-0.15, code=0.0, exact=0.0, dynamic=0.0, dyn_experts=1.5, **cor):
    """A seed's result with the given paired changes (the arms' losses made consistent)."""
    zero = 2.0
    arms = {
        "zero_shot": _arm(zero),
        "knn": _arm(zero + knn, 2.0 + code),
        "router_ft": _arm(zero + router),
        "full_ft": _arm(zero + full),
        "exact_k": _arm(zero + full + exact, entropy=1.6, mass=11.0),
        "dynamic_k": _arm(zero + full + exact + dynamic, experts=dyn_experts),
        "top_1": _arm(zero + full + 0.05, experts=1.0),
    }
    paired = {
        "knn-zero_shot:prose": {"mean": knn, "se": 0.003},
        "knn-zero_shot:code": {"mean": code, "se": 0.003},
        "router_ft-zero_shot:prose": {"mean": router, "se": 0.001},
        "full_ft-zero_shot:prose": {"mean": full, "se": 0.004},
        "exact_k-full_ft:prose": {"mean": exact, "se": 0.002},
        "dynamic_k-exact_k:prose": {"mean": dynamic, "se": 0.002},
    }
    placebos = cor.get("placebos", [0.001 * j for j in range(-10, 40)])
    moved = cor.get("moved", True)
    cor_numbers = {
        "budget": [3, 2, 1] if moved else [2, 2, 2],
        "budget_static": [2, 2, 2],
        "budget_moved": moved,
        "cor": {"all": cor.get("cor_all", 0.0), "entropy": cor.get("cor", -0.02), "hard_by_loss": -0.02},
        "layer_only": {"all": 0.0, "entropy": 0.0, "hard_by_loss": 0.0},
        "prior_only": {"all": 0.0, "entropy": 0.0, "hard_by_loss": 0.0},
        "placebos": {"entropy": placebos, "hard_by_loss": placebos},
    }
    digits = [
        {"experts": e, "predicted": 10.0, "measured": 10.0 * (1 + cor.get("miss", 0.05)), "with_bias": None}
        for e in (2, 4)
    ]
    for d in digits:
        d["largest_feedback"] = 20.0
    return {"seed": seed, "arms": arms, "paired": paired, "cor": cor_numbers, "digits": digits}


def _runs(count=4, jitter=0.002, **values):
    """``count`` seeds, each value moved by a small per-seed offset (so the interval has a width)."""
    runs = []
    for seed in range(count):
        offset = jitter * (seed - (count - 1) / 2)
        shifted = {
            k: (v + offset if isinstance(v, float) and k not in ("dyn_experts",) else v) for k, v in values.items()
        }
        runs.append(_run(seed, **shifted))
    return runs


def _verdicts(runs, protocol=PROTOCOL):
    return {(c.paper.split(" (")[0], c.claim[:30]): c.verdict for c in claims_module.all_claims(runs, protocol)}


def test_every_claim_reaches_supported_and_has_the_schema():
    results = claims_module.all_claims(_runs(knn=-0.08, router=-0.12, full=-0.15), PROTOCOL)
    assert [c.verdict for c in results] == ["supported"] * len(results), [(c.claim, c.reason) for c in results]
    for claim in results:
        record = claim.to_dict()
        assert set(record) == {"paper", "claim", "criterion", "verdict", "reason", "estimate", "interval"} | {
            "seeds",
            "settings",
        }
        assert len(record["seeds"]) == 4 and record["interval"][0] <= record["estimate"] <= record["interval"][1]
        assert all(s["source"] in ("paper", "ours") and s["reason"] for s in record["settings"].values())


def test_knn_verdicts_go_either_way():
    verdicts = _verdicts(_runs(knn=0.03, router=-0.12, full=-0.15))
    assert verdicts[("kNN-MoE", "retrieval-augmented routing be")] == "not supported"
    assert verdicts[("kNN-MoE", "kNN-MoE is competitive with fi")] == "not supported"  # negative share
    # Headroom 0.1 / 0.5 = 0.2 < 0.5: the share criterion cannot be met by routing: not testable.
    verdicts = _verdicts(_runs(knn=-0.05, router=-0.01, full=-0.5))
    assert verdicts[("kNN-MoE", "kNN-MoE is competitive with fi")] == "not testable"
    # A straddling interval: inconclusive.
    verdicts = _verdicts(_runs(knn=0.0, jitter=0.01))
    assert verdicts[("kNN-MoE", "retrieval-augmented routing be")] == "inconclusive"
    # The fallback: code loss worse by far more than the margin.
    verdicts = _verdicts(_runs(code=0.2))
    assert verdicts[("kNN-MoE", "where retrieval does not apply")] == "not supported"


def test_probmoe_verdicts_go_either_way():
    verdicts = _verdicts(_runs(exact=0.05))
    assert verdicts[("ProbMoE", "exact-k fine-tuning is not wor")] == "not supported"
    verdicts = _verdicts(_runs(exact=DELTA, jitter=0.0005))
    assert verdicts[("ProbMoE", "exact-k fine-tuning is not wor")] == "inconclusive"
    verdicts = _verdicts(_runs(dyn_experts=2.0))
    assert verdicts[("ProbMoE", "dynamic-k routing uses fewer e")] == "not supported"
    verdicts = _verdicts(_runs(dynamic=0.05))
    assert verdicts[("ProbMoE", "dynamic-k routing uses fewer e")] == "not supported"


def test_cor_verdicts_go_either_way():
    key = ("Counterfactual Routing", "re-routing by counterfactual e")
    assert _verdicts(_runs(cor=-0.02))[key] == "supported"
    # Inside the placebos' spread (their 5th percentile is about -0.008): not supported.
    assert _verdicts(_runs(cor=0.0))[key] == "not supported"
    # Below the placebos but the all-token loss worse beyond delta: not supported.
    assert _verdicts(_runs(cor=-0.02, cor_all=0.05))[key] == "not supported"
    # No layer's budget moved in any seed: not testable, whatever the numbers.
    assert _verdicts(_runs(cor=-0.05, moved=False))[key] == "not testable"
    # Two seeds: inconclusive.
    assert _verdicts(_runs(count=2, cor=-0.02))[key] == "inconclusive"


def test_bifurcation_verdicts_go_either_way():
    key = ("Minimal bifurcation model of load imbalance", "adaptive softmax routing colla")
    assert _verdicts(_runs(miss=0.05))[key] == "supported"
    assert _verdicts(_runs(miss=0.4))[key] == "not supported"
    assert _verdicts(_runs(miss=0.19, jitter=0.05))[key] == "inconclusive"
    runs = _runs(miss=0.05)
    runs[1]["digits"][0]["with_bias"] = 5.0  # the bias let it collapse
    assert _verdicts(runs)[key] == "not supported"
    runs = _runs(miss=0.05)
    runs[2]["digits"][1]["measured"] = None  # never collapsed within the sweep
    assert _verdicts(runs)[key] == "not supported"
    runs = _runs(miss=0.05)
    runs[0]["digits"][0]["predicted"] = None  # the theory's curve never reached the level: no test
    assert _verdicts(runs)[key] == "not testable"


def test_combine_orders_the_verdicts():
    assert claims_module.combine(("supported", "a"), ("supported", "b")) == ("supported", "a; b")
    assert claims_module.combine(("supported", "a"), ("inconclusive", "b"))[0] == "inconclusive"
    assert claims_module.combine(("inconclusive", "a"), ("not supported", "b"))[0] == "not supported"
    assert claims_module.combine(("not supported", "a"), ("not testable", "b"))[0] == "not testable"
    assert set(VERDICTS) == {"supported", "not supported", "inconclusive", "not testable"}


def test_placebo_shuffles_keep_the_prior_values():
    generator = torch.Generator().manual_seed(0)
    prior = torch.rand(3, 16)
    shuffles = [shuffled_prior(prior, generator) for _ in range(20)]
    for placebo in shuffles:
        assert torch.equal(placebo.sort(dim=1).values, prior.sort(dim=1).values)  # the same values per layer
    assert sum(not torch.equal(p, prior) for p in shuffles) == 20  # at other experts
    assert len({tuple(p.flatten().tolist()) for p in shuffles}) == 20


def test_a_failing_seed_fails_the_stage_naming_it(tmp_path, monkeypatch):
    def failing(ctx, seed, folder):
        return ["python3", "-c", f"import sys; print('broken at seed {seed}'); sys.exit(3)"]

    monkeypatch.setattr(experiments, "_command", failing)
    ctx = DemoContext(out=tmp_path, device=torch.device("cpu"), quick=True, seed=0)
    with pytest.raises(RuntimeError, match=r"seed \d exited with 3(.|\n)*broken at seed"):
        experiments.run_seeds(ctx, [0, 1], workers=2)


TINY = replace(
    PROTOCOLS["quick"],
    size=ModelSize(context=6, hidden=16, intermediate=16, experts=4, k=2, layers=2, train_steps=20, batch=32, lr=3e-3),
    corpus_chars=12_000,
    reference_batches=3,
    lr_grid=(1e-3,),
    max_epochs=1,
    calibration_windows=256,
    memory_steps=2,
    cor_calibration_batches=1,
    placebos=3,
    digits_feedbacks=(0.8, 1.6),
    digits_pretrain_epochs=1,
    digits_epochs=1,
    block=64,
    bootstrap_resamples=50,
)


def test_same_seed_same_numbers():
    torch.set_num_threads(1)
    first, second = run_seed(TINY, 3), run_seed(TINY, 3)
    other = run_seed(TINY, 4)
    for result in (first, second, other):
        result.pop("timings")
    assert first == second
    assert first["arms"]["zero_shot"]["loss_prose"] != other["arms"]["zero_shot"]["loss_prose"]
    assert first["cor"]["placebos"] != other["cor"]["placebos"]
    results = claims_module.all_claims([first, copy.deepcopy(second), other], TINY)
    assert all(c.verdict in VERDICTS for c in results)
