"""Counterfactual Routing on ``moe_kernels.MoE`` models, the plan: the applied routing against a
float64 top-k, revert, calibration's budget and the plan file, the token losses, the end-to-end
evaluation, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from cor_cases import VOCAB, moe_blocks, tiny_lm, token_batches
from torch import nn

from moe_kernels import RoutingConfig, cor
from moe_kernels.testing import assert_close, make_bias

pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # tiny models


# ---------------------------------------------------------------------------------------------
# the applied routing


def _oracle_route(x, router, routing: RoutingConfig, k: int, prior64):
    """float64 scores, key = s + bias + prior, group limit, top-k; weights = s[ids] renormalised
    and scaled. Returns ``(weights, ids, key gap between the k-th and the next expert)``."""
    logits = x.double() @ router.weight.double().T
    scores = logits.softmax(-1) if routing.score_func == "softmax" else logits.sigmoid()
    key = scores + prior64
    if router.e_score_correction_bias is not None:
        key = key + router.e_score_correction_bias.double()
    if routing.num_groups:
        grouped = key.view(key.shape[0], routing.num_groups, -1)
        group_score = grouped.topk(2, -1).values.sum(-1)
        kept = torch.zeros_like(group_score, dtype=torch.bool)
        kept.scatter_(1, group_score.topk(routing.topk_groups, -1).indices, True)
        key = torch.where(kept[:, :, None], grouped, -math.inf).view_as(key)
    ordered = key.topk(k + 1 if k < key.shape[1] else k, -1)
    ids = ordered.indices[:, :k]
    gap = (ordered.values[:, k - 1] - ordered.values[:, k]).min() if k < key.shape[1] else math.inf
    weights = scores.gather(1, ids)
    if routing.renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * routing.scale, ids, gap


def _capture_routing(model):
    records = []
    handles = [
        m.router.register_forward_hook(lambda mod, args, out: records.append((args[0], *out)))
        for m in moe_blocks(model)
    ]
    return records, handles


ROUTINGS = {
    "softmax": (None, False),
    "deepseek_v3": (RoutingConfig.deepseek_v3(num_groups=4, topk_groups=2, scale=2.5), True),
}


@pytest.mark.parametrize("name", ROUTINGS)
def test_applied_routing_is_a_float64_topk_with_the_models_weights(name):
    routing, bias = ROUTINGS[name]
    model = tiny_lm(dtype=torch.float32, num_layers=3, num_experts=8, k=2, routing=routing, correction_bias=bias)
    for index, moe in enumerate(moe_blocks(model)):
        if bias:
            moe.router.e_score_correction_bias.copy_(make_bias(8, seed=index) * 0.1)
    batch = token_batches(num=1, seqs=3, seq_len=8)[0]
    generator = torch.Generator().manual_seed(5)
    plan = cor.CoRPlan(torch.tensor([1, 3, 2]), torch.rand(3, 8, generator=generator), strength=0.3)
    with torch.no_grad():
        before = model(batch).logits
        records, handles = _capture_routing(model)
        cor.apply_counterfactual_routing(model, plan)
        assert cor.is_counterfactual_routing_applied(model)
        model(batch)
        for handle in handles:
            handle.remove()
        cor.revert_counterfactual_routing(model)
        after = model(batch).logits
    changed = 0
    for layer, (x, weights, ids) in enumerate(records):
        router = moe_blocks(model)[layer].router
        prior64 = plan.prior[layer].double() * plan.strength
        k = int(plan.k[layer])
        want_weights, want_ids, gap = _oracle_route(x, router, router.routing, k, prior64)
        assert gap > 1e-5, "near-tie in the oracle's keys: the comparison of ids would be ill-posed"
        assert torch.equal(ids.long(), want_ids), layer
        assert_close(weights, want_weights, dtype=torch.float32)
        _, static_ids, _ = _oracle_route(x, router, router.routing, k, torch.zeros_like(prior64))
        changed += int((static_ids != want_ids).any(-1).sum())
    assert changed > 0  # the prior moved some selections
    assert sum(ids.shape[1] for _, _, ids in records) == plan.total_k  # activations per token
    assert all(bool((ids >= 0).all()) for _, _, ids in records)
    assert torch.equal(before, after)  # revert is bit-exact
    assert not cor.is_counterfactual_routing_applied(model)


def test_zero_prior_at_the_base_k_is_the_models_own_routing():
    model = tiny_lm(dtype=torch.float32, num_experts=6, k=2, routing=RoutingConfig.renormalize())
    batch = token_batches(num=1)[0]
    with torch.no_grad():
        before = model(batch).logits
        cor.apply_counterfactual_routing(model, cor.CoRPlan(torch.tensor([2, 2]), torch.zeros(2, 6), strength=1.0))
        applied = model(batch).logits
        cor.revert_counterfactual_routing(model)
    # Not bit-exact: a (zero) selection bias takes the biased CPU routing path (full softmax,
    # gathered and renormalised) where the plain one takes the softmax of the k selected logits.
    assert_close(applied, before, dtype=torch.float32)


def test_calibrate_keeps_the_budget_and_the_plan_file_round_trips(tmp_path):
    model, batches = tiny_lm(dtype=torch.float32, num_layers=3, num_experts=6, k=2), token_batches(seq_len=10)
    plan = cor.calibrate(model, batches, cor.causal_lm_token_losses, cor.CalibrationSettings(strength=0.2))
    assert plan.total_k == 6 and plan.strength == 0.2 and plan.k.min() >= 1 and plan.k.max() <= 6
    assert plan.calibration["hard_tokens"] > 0 and plan.calibration["base_k"] == [2, 2, 2]
    assert torch.equal(plan.k, cor.allocate_layer_budget(plan.ratio, 6, k_max=6))
    assert torch.equal(plan.prior, cor.min_max_normalize(plan.impact))
    assert (plan.prior.amax(1) == 1).all() and (plan.prior.amin(1) == 0).all()
    wider = cor.calibrate(model, batches, cor.causal_lm_token_losses, cor.CalibrationSettings(total_k=9))
    assert wider.total_k == 9
    path = plan.save(tmp_path / "plan.json")
    loaded = cor.CoRPlan.load(path)
    for field in ("k", "prior", "ratio", "impact"):
        assert torch.equal(getattr(loaded, field), getattr(plan, field)), field
    assert loaded.strength == plan.strength and loaded.calibration == plan.calibration
    batch = batches[0]
    with torch.no_grad():
        cor.apply_counterfactual_routing(model, plan)
        first = model(batch).logits
        cor.apply_counterfactual_routing(model, loaded)
        second = model(batch).logits
        cor.revert_counterfactual_routing(model)
    assert torch.equal(first, second)


def test_causal_lm_token_losses_skips_padding_and_ignored_labels():
    model = tiny_lm(dtype=torch.float64)
    ids = token_batches(num=1, seqs=2, seq_len=7)[0]
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    labels = ids.clone()
    labels[0, 4] = -100
    losses = cor.causal_lm_token_losses(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    logits = model(ids, attention_mask=mask).logits
    expected = torch.full((2, 7), math.nan, dtype=torch.float64)
    for b in range(2):
        for i in range(6):
            if labels[b, i + 1] != -100 and mask[b, i] and mask[b, i + 1]:
                expected[b, i] = -torch.log_softmax(logits[b, i], -1)[labels[b, i + 1]]
    assert losses.dtype == torch.float64 and losses.shape == (14,)
    assert torch.equal(losses.isnan(), expected.reshape(-1).isnan())
    assert int(losses.isnan().sum()) == 2 + 1 + 2  # last positions, label -100, the padding and its next
    assert_close(losses[~losses.isnan()], expected.reshape(-1)[~losses.isnan()])


def test_evaluate_end_to_end(tmp_path):
    model = tiny_lm(dtype=torch.float32, num_layers=3, num_experts=6, k=2)
    calibration, evaluation = token_batches(seq_len=10), token_batches(num=1, seqs=4, seq_len=10, seed=7)
    result = cor.evaluate_counterfactual_routing(model, calibration, evaluation, cor.causal_lm_token_losses)
    assert list(result.losses) == list(cor.evaluate.VARIANTS)
    assert all(row["activations_per_token"] == 6 for row in result.losses.values())
    assert [row["k_cor"] for row in result.layers] == result.plan.k.tolist()
    assert [row["k_static"] for row in result.layers] == [2, 2, 2]
    with torch.no_grad():
        static = cor.causal_lm_token_losses(model, evaluation[0])  # the model was left unrouted
        cor.apply_counterfactual_routing(model, result.plan)
        routed = cor.causal_lm_token_losses(model, evaluation[0])
        cor.revert_counterfactual_routing(model)
    assert math.isclose(result.losses["static"]["all"], float(static.nanmean()), rel_tol=1e-6)
    assert math.isclose(result.losses["cor"]["all"], float(routed.nanmean()), rel_tol=1e-6)
    hard = static > torch.quantile(static[static.isfinite()], 0.7)
    assert math.isclose(result.losses["cor"]["hard"], float(routed[hard].mean()), rel_tol=1e-6)
    assert "| 2 | blocks.2.moe | 6 | 2 |" in result.budget_markdown()
    json.dumps(result.to_dict())
    png = cor.plot_impact_heatmap(result.impact, tmp_path / "impact.png", k=result.plan.k)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a given plan of another total: static top-k is the uniform split of that total, no prior
    wider = cor.CoRPlan(torch.tensor([2, 4, 3]), result.plan.prior, 0.1)
    again = cor.evaluate_counterfactual_routing(model, None, evaluation, cor.causal_lm_token_losses, plan=wider)
    assert [row["k_static"] for row in again.layers] == [3, 3, 3]
    assert all(row["activations_per_token"] == 9 for row in again.losses.values())
    assert again.losses["static"]["all"] != result.losses["static"]["all"]


# ---------------------------------------------------------------------------------------------
# bad input


def test_plans_of_the_wrong_shape_are_refused(tmp_path):
    model = tiny_lm(
        dtype=torch.float32, num_experts=4, k=2, routing=RoutingConfig.deepseek_v3(num_groups=2, topk_groups=1)
    )
    with pytest.raises(ValueError, match="the plan is for 3 MoE layers, the model has 2"):
        cor.apply_counterfactual_routing(model, cor.CoRPlan(torch.tensor([2, 2, 2]), torch.zeros(3, 4)))
    with pytest.raises(ValueError, match=r"the plan is for E=6 experts, layer 0 \(blocks.0.moe\) has 4"):
        cor.apply_counterfactual_routing(model, cor.CoRPlan(torch.tensor([2, 2]), torch.zeros(2, 6)))
    with pytest.raises(ValueError, match=r"plan.k\[1\]=3 exceeds the 2 experts layer 1"):
        cor.apply_counterfactual_routing(model, cor.CoRPlan(torch.tensor([1, 3]), torch.zeros(2, 4)))
    mutated = cor.CoRPlan(torch.tensor([1, 2]), torch.zeros(2, 4))
    mutated.k = torch.tensor([0, 2])
    with pytest.raises(ValueError, match="apply_counterfactual_routing: CoRPlan: k must be >= 1"):
        cor.apply_counterfactual_routing(model, mutated)
    assert not cor.is_counterfactual_routing_applied(model)  # nothing was half-applied
    with pytest.raises(ValueError, match=r"prior must be \(L, E\) with L = len\(k\) = 2"):
        cor.CoRPlan(torch.tensor([2, 2]), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="k must be >= 1"):
        cor.CoRPlan(torch.tensor([0, 2]), torch.zeros(2, 4))
    with pytest.raises(TypeError, match="k must hold ints"):
        cor.CoRPlan(torch.tensor([1.0, 2.0]), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"prior must lie in \[0, 1\]"):
        cor.CoRPlan(torch.tensor([2, 2]), torch.full((2, 4), 1.5))
    data = cor.CoRPlan(torch.tensor([2, 2]), torch.zeros(2, 4)).to_dict()
    assert data["version"] == 2
    data.update(version=1)
    with pytest.raises(ValueError, match="plan format version 1, this moe_kernels reads version 2"):
        cor.CoRPlan.from_dict(data)


@pytest.mark.parametrize(
    "strength,error", [(math.nan, ValueError), (math.inf, ValueError), ("0.1", TypeError), (True, TypeError)]
)
def test_strength_must_be_finite(strength, error):
    expected = "strength must be a finite number" if error is ValueError else "strength must be a number"
    with pytest.raises(error, match=expected):
        cor.CoRPlan(torch.tensor([2, 2]), torch.zeros(2, 4), strength=strength)
    with pytest.raises(error, match=f"CalibrationSettings: {expected}"):
        cor.CalibrationSettings(strength=strength)
    plan = cor.CoRPlan(torch.tensor([2, 2]), torch.zeros(2, 4))
    plan.strength = strength  # mutated after validation
    with pytest.raises(error, match=f"apply_counterfactual_routing: plan.{expected}"):
        cor.apply_counterfactual_routing(tiny_lm(), plan)


def test_total_k_out_of_reach_and_other_bad_arguments():
    model, batches = tiny_lm(), token_batches()
    for total in (1, 9):
        with pytest.raises(ValueError, match=r"calibrate: total_k must be an int in \[L, sum of selectable experts\]"):
            cor.calibrate(model, batches, cor.causal_lm_token_losses, cor.CalibrationSettings(total_k=total))
    with pytest.raises(TypeError, match=r"CalibrationSettings: total_k must be None or an int, got float"):
        cor.CalibrationSettings(total_k=2.5)
    with pytest.raises(ValueError, match="CalibrationSettings: easy_quantile must be <= hard_quantile"):
        cor.CalibrationSettings(hard_quantile=0.3, easy_quantile=0.6)
    with pytest.raises(ValueError, match=r"CalibrationSettings: hard_quantile must be a number in \(0, 1\)"):
        cor.CalibrationSettings(hard_quantile=1.0)
    with pytest.raises(ValueError, match=r"CalibrationSettings: delta must be a number in \(0, 1\]"):
        cor.CalibrationSettings(delta=-0.1)
    with pytest.raises(TypeError, match=r"layer_sensitivity: settings must be a moe_kernels.cor.CalibrationSettings"):
        cor.layer_sensitivity(model, batches, cor.causal_lm_token_losses, {"delta": 0.1})
    with pytest.raises(ValueError, match="batches is empty"):
        cor.expert_impact(model, [], cor.causal_lm_token_losses)
    with pytest.raises(TypeError, match="token_losses must return a 1-D floating tensor"):
        cor.expert_impact(model, batches, lambda m, b: m(b).logits)
    with pytest.raises(ValueError, match="needs one loss per routed row"):
        cor.expert_impact(model, batches, lambda m, b: cor.causal_lm_token_losses(m, b).view(2, 6)[:, :5].reshape(-1))
    cor.apply_counterfactual_routing(model, cor.CoRPlan(torch.tensor([2, 2]), torch.zeros(2, 4)))
    with pytest.raises(ValueError, match="calibrate: the model has a CoR plan applied"):
        cor.calibrate(model, batches, cor.causal_lm_token_losses)


def test_a_model_without_moe_layers_is_refused():
    dense = nn.Sequential(nn.Embedding(VOCAB, 8), nn.Linear(8, VOCAB))
    plan = cor.CoRPlan(torch.tensor([2]), torch.zeros(1, 4))
    calls = [
        lambda: cor.calibrate(dense, token_batches(), cor.causal_lm_token_losses),
        lambda: cor.layer_sensitivity(dense, token_batches(), cor.causal_lm_token_losses),
        lambda: cor.expert_impact(dense, token_batches(), cor.causal_lm_token_losses),
        lambda: cor.apply_counterfactual_routing(dense, plan),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="the model has no MoE layers"):
            call()


def test_benchmark_quick_run_and_registration():
    from benchmarks import bench_cor
    from moe_kernels.bench_index import BENCHMARKS

    assert BENCHMARKS["cor"] == "bench_cor"
    rows = bench_cor.run(quick=True, device="cpu", tokens=(4,))
    impact = {row["provider"]: row for row in rows if row["panel"] == "expert_impact"}
    assert set(impact) == {"batched", "naive_loop"} and impact["batched"]["what_ifs"] > 0
    assert impact["batched"]["speedup_vs_naive"] == impact["naive_loop"]["median_us"] / impact["batched"]["median_us"]
    routing = [row for row in rows if row["panel"] != "expert_impact"]
    assert {(row["panel"].split()[0], row["provider"]) for row in routing} == {
        (panel, provider) for panel in ("softmax_topk", "TopKRouter") for provider in ("softmax_topk", "cor_route")
    }
