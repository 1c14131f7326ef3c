"""The claims table from the seeds' runs: each claim's criterion (fixed here and in
:mod:`moe_kernels.demo.protocol` before any run), per-seed numbers and verdict
(:mod:`moe_kernels.demo.verdict`)."""

from __future__ import annotations

import math

import torch

from moe_kernels.demo.protocol import (
    DELTA,
    FALLBACK_SE,
    FALLBACK_SHARE,
    FEWER_SHARE,
    KNN_SHARE,
    MIN_HEADROOM,
    PLACEBO_QUANTILE,
    THRESHOLD_BAND,
    Protocol,
    settings,
)
from moe_kernels.demo.verdict import MIN_SEEDS, ClaimResult, above, below, estimate

KNN = "kNN-MoE (arXiv 2601.02144)"
PROBMOE = "ProbMoE (arXiv 2606.01509)"
COR = "Counterfactual Routing (arXiv 2604.14246)"
DYNAMIC_KEYS = (
    "top_1",
    "top_k",
    "exact_k",
    "dynamic_k",
    "dynamic_experts",
    "dynamic_minus_exact",
    "dynamic_minus_static_line",
    "positive_logits_before",
    "positive_logits_dynamic",
    "cardinality_dynamic",
)
FINETUNED = ("full_ft", "exact_k", "dynamic_k", "top_1")
BIFURCATION = "Minimal bifurcation model of load imbalance (arXiv 2605.29121)"


def _claim(paper, claim, criterion, decided, seeds, claim_settings, bound=None) -> ClaimResult:
    verdict, reason, result = decided
    interval = None if result is None else (result.low, result.high)
    mean = None if result is None else result.mean
    values = () if result is None else result.values
    return ClaimResult(paper, claim, criterion, verdict, reason, mean, interval, seeds, claim_settings, values, bound)


def _pick(rows: list[dict], keys: tuple[str, ...]) -> list[dict]:
    """Each per-seed row cut to ``seed`` and the claim's own ``keys``."""
    return [{key: row[key] for key in ("seed", *keys)} for row in rows]


def _named(name: str, decided: tuple) -> tuple:
    """A decision whose reason starts with the condition's name."""
    return (decided[0], f"{name}: {decided[1]}", *decided[2:])


def combine(*decisions: tuple[str, str, object]) -> tuple[str, str]:
    """Several conditions that must all hold: ``not testable`` / ``not supported`` if any is,
    ``supported`` if all are, ``inconclusive`` otherwise; the reasons joined."""
    verdicts = [d[0] for d in decisions]
    for verdict in ("not testable", "not supported", "inconclusive"):
        if verdict in verdicts:
            break
    else:
        verdict = "supported"
    return verdict, "; ".join(dict.fromkeys(d[1] for d in decisions))


def _gain_share(gain: float, reference: float) -> float:
    return gain / reference if reference > 0 else math.nan


def knn_claims(runs: list[dict], protocol: Protocol) -> list[ClaimResult]:
    knn_settings = {name: s.to_dict() for name, s in settings(protocol)["knn"].items()}
    rows = []
    for run in runs:
        paired, arms = run["paired"], run["arms"]
        router, full = -paired["router_ft-zero_shot:prose"]["mean"], -paired["full_ft-zero_shot:prose"]["mean"]
        knn = -paired["knn-zero_shot:prose"]["mean"]
        rows.append(
            {
                "seed": run["seed"],
                "zero_shot": arms["zero_shot"]["loss_prose"],
                "knn": arms["knn"]["loss_prose"],
                "router_ft": arms["router_ft"]["loss_prose"],
                "full_ft": arms["full_ft"]["loss_prose"],
                "knn_change": -knn,
                "knn_change_se": paired["knn-zero_shot:prose"]["se"],
                "headroom": _gain_share(router, full),
                "share_of_router_ft": _gain_share(knn, router),
                "code_change": paired["knn-zero_shot:code"]["mean"],
                "code_change_se": paired["knn-zero_shot:code"]["se"],
                "confidence_prose": arms["knn"]["confidence"]["prose"],
                "confidence_code": arms["knn"]["confidence"]["code"],
                "chosen": {key: arms["knn"]["choice"][key] for key in ("neighbors", "weighting", "min_confidence")},
            }
        )
    beats = below([r["knn_change"] for r in rows], 0.0)
    headroom = [r["headroom"] for r in rows]
    shares = [r["share_of_router_ft"] for r in rows]
    if not all(math.isfinite(h) for h in headroom + shares):
        competitive = ("not testable", "a fine-tuning arm did not lower the held-out loss in some seed", None)
    elif estimate(headroom).mean < MIN_HEADROOM:
        mean = estimate(headroom).mean
        competitive = ("not testable", f"routing headroom {mean:.3f} < {MIN_HEADROOM}", estimate(shares))
    else:
        competitive = above(shares, KNN_SHARE)
    margin = max(
        FALLBACK_SE * sum(r["code_change_se"] for r in rows) / len(rows),
        FALLBACK_SHARE * sum(run["arms"]["zero_shot"]["loss_code"] for run in runs) / len(runs),
    )
    fallback = below([r["code_change"] for r in rows], margin)
    return [
        _claim(
            KNN,
            "retrieval-augmented routing beats the frozen router on a shifted domain",
            "upper 95% bound of the paired held-out prose loss change (kNN-MoE - zero-shot) < 0",
            beats,
            _pick(rows, ("zero_shot", "knn", "knn_change", "knn_change_se", "chosen")),
            knn_settings,
            bound=0.0,
        ),
        _claim(
            KNN,
            "kNN-MoE is competitive with fine-tuning the routers on the same data",
            f"lower 95% bound of kNN-MoE's share of router-only fine-tuning's gain > {KNN_SHARE}; not testable "
            f"when the mean routing headroom (router-only gain / full fine-tuning gain) < {MIN_HEADROOM}",
            competitive,
            _pick(rows, ("zero_shot", "knn", "router_ft", "full_ft", "headroom", "share_of_router_ft")),
            knn_settings,
            bound=KNN_SHARE,
        ),
        _claim(
            KNN,
            "where retrieval does not apply, kNN-MoE falls back to the frozen router (the training domain does not "
            "get worse)",
            f"upper 95% bound of the paired held-out code loss change < max({FALLBACK_SE:g} SE, "
            f"{FALLBACK_SHARE:.0%} of zero-shot) = {margin:.4g}",
            fallback,
            _pick(rows, ("code_change", "code_change_se", "confidence_prose", "confidence_code", "chosen")),
            knn_settings,
            bound=margin,
        ),
    ]


def probmoe_claims(runs: list[dict], protocol: Protocol) -> list[ClaimResult]:
    probmoe_settings = {name: s.to_dict() for name, s in settings(protocol)["probmoe"].items()}
    k = protocol.size.k
    rows = []
    for run in runs:
        arms, paired = run["arms"], run["paired"]
        top_1, top_k, dynamic = (arms[name] for name in ("top_1", "full_ft", "dynamic_k"))
        slope = (top_k["loss_prose"] - top_1["loss_prose"]) / (k - 1)
        line = top_1["loss_prose"] + slope * (dynamic["experts_per_token"] - 1)
        rows.append(
            {
                "seed": run["seed"],
                "top_k": top_k["loss_prose"],
                "exact_k": arms["exact_k"]["loss_prose"],
                "dynamic_k": dynamic["loss_prose"],
                "top_1": top_1["loss_prose"],
                "exact_minus_top_k": paired["exact_k-full_ft:prose"]["mean"],
                "exact_minus_top_k_se": paired["exact_k-full_ft:prose"]["se"],
                "entropy_top_k": top_k["routing_entropy"],
                "entropy_exact_k": arms["exact_k"]["routing_entropy"],
                "experts_for_99_top_k": top_k["experts_for_99"],
                "experts_for_99_exact_k": arms["exact_k"]["experts_for_99"],
                "dynamic_experts": dynamic["experts_per_token"],
                "dynamic_minus_exact": paired["dynamic_k-exact_k:prose"]["mean"],
                "dynamic_minus_static_line": dynamic["loss_prose"] - line,
                "positive_logits_before": arms["zero_shot"]["positive_logits"],
                "positive_logits_dynamic": dynamic["positive_logits"],
                "cardinality_dynamic": dynamic["cardinality"],
                "lr": {name: arms[name]["choice"]["lr"] for name in ("full_ft", "exact_k", "dynamic_k", "top_1")},
                "epochs": {
                    name: arms[name]["choice"]["epochs"] for name in ("full_ft", "exact_k", "dynamic_k", "top_1")
                },
            }
        )
    entropy = above([r["entropy_exact_k"] - r["entropy_top_k"] for r in rows], 0.0)
    mass = above([r["experts_for_99_exact_k"] - r["experts_for_99_top_k"] for r in rows], 0.0)
    diversity = (*combine(_named("entropy", entropy), _named("experts for 99%", mass)), entropy[2])
    fewer = below([r["dynamic_experts"] for r in rows], FEWER_SHARE * k)
    matched = below([r["dynamic_minus_exact"] for r in rows], DELTA)
    dynamic = (*combine(_named("experts", fewer), _named("loss", matched)), fewer[2])
    return [
        _claim(
            PROBMOE,
            "exact-k fine-tuning is not worse than top-k fine-tuning",
            f"upper 95% bound of the paired held-out prose loss change (exact-k - top-k) < delta = {DELTA}",
            below([r["exact_minus_top_k"] for r in rows], DELTA),
            _pick(rows, ("top_k", "exact_k", "exact_minus_top_k", "exact_minus_top_k_se", "lr", "epochs")),
            probmoe_settings,
            bound=DELTA,
        ),
        _claim(
            PROBMOE,
            "exact-k routing is more diverse than top-k (higher routing entropy, more experts for 99% of the mass)",
            "lower 95% bounds of both paired differences (exact-k - top-k) > 0; estimate: the entropy's",
            diversity,
            _pick(rows, ("entropy_top_k", "entropy_exact_k", "experts_for_99_top_k", "experts_for_99_exact_k")),
            probmoe_settings,
            bound=0.0,
        ),
        _claim(
            PROBMOE,
            "dynamic-k routing uses fewer experts per token at comparable loss",
            f"upper 95% bound of dynamic-k's experts per token < {FEWER_SHARE} k = {FEWER_SHARE * k:g}, and of its "
            f"paired loss change against exact-k < delta = {DELTA}; estimate: the experts per token",
            dynamic,
            _pick(rows, DYNAMIC_KEYS),
            probmoe_settings,
            bound=FEWER_SHARE * k,
        ),
    ]


def _quantile(values: list[float], q: float) -> float:
    """``torch.quantile``'s linear-interpolation quantile of ``values``, in float64."""
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), q))


def cor_claim(runs: list[dict], protocol: Protocol) -> ClaimResult:
    cor_settings = {name: s.to_dict() for name, s in settings(protocol)["cor"].items()}
    rows = []
    for run in runs:
        numbers = run["cor"]
        placebos = numbers["placebos"]["entropy"]
        rows.append(
            {
                "seed": run["seed"],
                "budget": numbers["budget"],
                "budget_moved": numbers["budget_moved"],
                "cor_entropy": numbers["cor"]["entropy"],
                "cor_all": numbers["cor"]["all"],
                "cor_hard_by_loss": numbers["cor"]["hard_by_loss"],
                "layer_only_entropy": numbers["layer_only"]["entropy"],
                "prior_only_entropy": numbers["prior_only"]["entropy"],
                "placebo_q05_entropy": _quantile(placebos, PLACEBO_QUANTILE),
                "placebo_rank_entropy": sum(p <= numbers["cor"]["entropy"] for p in placebos) / len(placebos),
                "placebo_pass_hard_by_loss": sum(p < 0 for p in numbers["placebos"]["hard_by_loss"])
                / len(numbers["placebos"]["hard_by_loss"]),
            }
        )
    primary = [r["cor_entropy"] for r in rows]
    result = estimate(primary)
    # The placebo distribution of the mean across seeds: placebo j of every seed averaged.
    count = min(len(run["cor"]["placebos"]["entropy"]) for run in runs)
    pooled = [sum(run["cor"]["placebos"]["entropy"][j] for run in runs) / len(runs) for j in range(count)]
    bound = _quantile(pooled, PLACEBO_QUANTILE)
    if not any(r["budget_moved"] for r in rows):
        decided = ("not testable", "budget not exercised: no layer's budget moved in any seed", result)
    elif len(rows) < MIN_SEEDS:
        decided = ("inconclusive", f"{len(rows)} seed(s): a verdict needs at least {MIN_SEEDS}", result)
    else:
        why = f"mean change {result.mean:.4g} vs the pooled placebos' 5th percentile {bound:.4g}"
        placebo = ("supported" if result.mean < bound else "not supported", why, result)
        all_tokens = _named("all tokens", below([r["cor_all"] for r in rows], DELTA))
        decided = (*combine(_named("placebos", placebo), all_tokens), result)
    return _claim(
        COR,
        "re-routing by counterfactual expert impact at an equal total activation count helps the tokens it targets "
        "more than a placebo prior, without hurting the rest",
        f"mean paired change on high-predictive-entropy held-out tokens below the {PLACEBO_QUANTILE:.0%} quantile of "
        f"{protocol.placebos} placebo priors (pooled across seeds), and upper 95% bound of the all-token change "
        f"< delta = {DELTA}; not testable when no layer's budget moved",
        decided,
        rows,
        cor_settings,
        bound=bound,
    )


def bifurcation_claim(runs: list[dict], protocol: Protocol) -> ClaimResult:
    bif_settings = {name: s.to_dict() for name, s in settings(protocol)["bifurcation"].items()}
    rows = [
        {
            "seed": run["seed"],
            **{
                f"E={d['experts']}": {
                    "predicted": d["predicted"],
                    "measured": d["measured"],
                    "with_bias": d["with_bias"],
                    "miss": None
                    if d["measured"] is None or d["predicted"] is None
                    else (d["measured"] - d["predicted"]) / d["predicted"],
                }
                for d in run["digits"]
            },
        }
        for run in runs
    ]
    held = all(d["with_bias"] is None or d["with_bias"] > d["largest_feedback"] for run in runs for d in run["digits"])
    decisions, estimates = [], []
    for experts in protocol.digits_experts:
        misses = [row[f"E={experts}"]["miss"] for row in rows]
        if any(row[f"E={experts}"]["predicted"] is None for row in rows):
            decisions.append(("not testable", f"E={experts}: no predicted threshold within the swept feedbacks"))
            continue
        if any(m is None for m in misses):
            decisions.append(("not supported", f"E={experts}: no collapse within the swept feedbacks in some seed"))
            continue
        result = estimate(misses)
        estimates.append(result)
        if len(misses) < MIN_SEEDS:
            decisions.append(("inconclusive", f"{len(misses)} seed(s): a verdict needs at least {MIN_SEEDS}"))
        elif -THRESHOLD_BAND < result.low and result.high < THRESHOLD_BAND:
            decisions.append(("supported", f"E={experts}: relative miss in [{result.low:.3f}, {result.high:.3f}]"))
        elif result.low >= THRESHOLD_BAND or result.high <= -THRESHOLD_BAND:
            decisions.append(("not supported", f"E={experts}: [{result.low:.3f}, {result.high:.3f}] outside the band"))
        else:
            decisions.append(("inconclusive", f"E={experts}: [{result.low:.3f}, {result.high:.3f}] crosses the band"))
    if not held:
        decisions.append(("not supported", "the bias did not keep the load balanced in some seed"))
    verdict, reason = combine(*decisions)
    first = estimates[0] if estimates else None
    return _claim(
        BIFURCATION,
        "adaptive softmax routing collapses near the predicted critical feedback strength; a negative-feedback bias "
        "keeps it balanced past it",
        f"per expert count, the 95% bounds of the relative miss (measured - predicted) / predicted across seeds "
        f"inside +-{THRESHOLD_BAND:.0%}, and the bias balanced at every swept feedback in every seed; estimate: "
        f"E={protocol.digits_experts[0]}'s miss",
        (verdict, reason, first),
        rows,
        bif_settings,
    )


def all_claims(runs: list[dict], protocol: Protocol) -> list[ClaimResult]:
    return [
        *knn_claims(runs, protocol),
        *probmoe_claims(runs, protocol),
        cor_claim(runs, protocol),
        bifurcation_claim(runs, protocol),
    ]
