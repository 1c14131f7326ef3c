"""Counterfactual Routing on Hugging Face models patched by ``apply_moe_kernels``, every family
(tiny random models from ``tiny_hf_config``, float32): the batched analysis against brute-force
oracles, the CoR-applied logits against a forward routed by a float64 oracle, revert."""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM

import moe_kernels.integrations.transformers as hf
from moe_kernels import cor
from moe_kernels.integrations.transformers.common import SAVED
from moe_kernels.testing import TINY_HF_SIZES, assert_close, tiny_hf_config

FAMILIES = hf.SUPPORTED_MODEL_TYPES
DELTA = 0.2

pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # tiny models


def _build(family: str):
    """The family's tiny model with its routing features on (as tests/test_hf_integration.py)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(family), experts_implementation="eager").eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            bias = getattr(module, "e_score_correction_bias", None)
            if bias is not None:
                bias.copy_(torch.randn(bias.shape, generator=generator) * 0.05)
            if type(module).__name__ == "GptOssExperts":
                module.gate_up_proj.mul_(6.0)
                module.gate_up_proj_bias.copy_(torch.randn(module.gate_up_proj_bias.shape, generator=generator) * 0.5)
    return model


def _patched(family: str):
    return hf.apply_moe_kernels(_build(family))


def _batch(seqs=2, seq_len=8, seed=2):
    ids = torch.randint(0, TINY_HF_SIZES["vocab_size"], (seqs, seq_len), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _layers(model):
    return [(layer.block, layer.router) for layer in cor.find_moe_layers(model, "test")]


def _oracle_losses(model, batch):
    logits = model(input_ids=batch["input_ids"]).logits.double()
    ids = batch["input_ids"]
    out = torch.full(ids.shape, math.nan, dtype=torch.float64)
    for b in range(ids.shape[0]):
        for i in range(ids.shape[1] - 1):
            out[b, i] = -torch.log_softmax(logits[b, i], -1)[ids[b, i + 1]]
    return out.reshape(-1)


def _scale_block(module, args, out):
    if isinstance(out, tuple):  # GPT-OSS: (hidden, router_scores)
        return (out[0] * (1 - DELTA), *out[1:])
    return out * (1 - DELTA)


def _ablate_row(row: int, expert: int):
    def hook(module, args, out):
        logits, weights, ids = out
        new = weights.clone().double()
        gates, chosen = new[row], ids[row] == expert
        total, rest = gates.sum(), gates[~chosen].sum()
        new[row] = torch.zeros_like(gates) if rest == 0 else torch.where(chosen, 0.0, gates * total / rest)
        return logits, new.to(weights.dtype), ids

    return hook


@pytest.mark.parametrize("family", FAMILIES)
def test_sensitivity_and_impact_match_brute_force(family):
    model, batch = _patched(family), _batch()
    layers = _layers(model)
    sensitivity = cor.layer_sensitivity(
        model, [batch], cor.causal_lm_token_losses, cor.CalibrationSettings(delta=DELTA)
    )
    impact = cor.expert_impact(model, [batch], cor.causal_lm_token_losses)
    with torch.no_grad():
        ids = []
        handles = [router.register_forward_hook(lambda m, a, out: ids.append(out[2])) for _, router in layers]
        clean = _oracle_losses(model, batch)
        for handle in handles:
            handle.remove()
        finite = clean.isfinite()
        hard = finite & (clean > torch.quantile(clean[finite], 0.7))
        easy = finite & (clean < torch.quantile(clean[finite], 0.3))
        hard_s, easy_s = [], []
        for block, _ in layers:  # one forward per layer, the whole block output scaled
            handle = block.register_forward_hook(_scale_block)
            increase = _oracle_losses(model, batch) - clean
            handle.remove()
            hard_s.append(increase[hard].mean())
            easy_s.append(increase[easy].mean())
        num_experts = impact.shape[1]
        sums, counts = torch.zeros(len(layers), num_experts, dtype=torch.float64), torch.zeros(len(layers), num_experts)
        for row in hard.nonzero().flatten().tolist():  # one forward per (token, layer, expert)
            for layer, (_, router) in enumerate(layers):
                for expert in ids[layer][row].tolist():
                    handle = router.register_forward_hook(_ablate_row(row, expert))
                    sums[layer, expert] += _oracle_losses(model, batch)[row] - clean[row]
                    handle.remove()
                    counts[layer, expert] += 1
    hard_s, easy_s = torch.stack(hard_s), torch.stack(easy_s)
    assert_close(sensitivity.hard, hard_s, dtype=torch.float32)
    assert_close(sensitivity.easy, easy_s, dtype=torch.float32)
    # the documented ratio in float64 (easy floored at half the mean positive easy sensitivity)
    scale = easy_s.clamp_min(0).mean()
    scale = scale if scale > 0 else hard_s.clamp_min(0).mean()
    ratio = hard_s.clamp_min(0) / (torch.maximum(easy_s.clamp_min(0), 0.5 * scale) + 1e-6)
    torch.testing.assert_close(sensitivity.ratio.double(), ratio, rtol=1e-3, atol=1e-6)
    expected = torch.where(counts > 0, sums / counts.clamp_min(1), 0.0)
    assert_close(impact, expected, dtype=torch.float32, op="whole_model")
    assert (expected.abs() > 1e-3).sum() >= 4  # the ablations move the losses


def _oracle_router(family: str, k: int, prior64: torch.Tensor, gaps: list, changed: list):
    """A router hook replacing the routing by a float64 computation from the router's logits:
    key = scores + bias + prior (groups for DeepSeek-V3), top-k, the family's weights."""

    def hook(router, args, out):
        logits = out[0]
        z = logits.double()
        scores = z.sigmoid() if family == "deepseek_v3" else z.softmax(-1)
        key = scores + prior64
        if family == "deepseek_v3":
            key = key + router.e_score_correction_bias.double()
            grouped = key.view(key.shape[0], router.num_group, -1)
            group_score = grouped.topk(2, -1).values.sum(-1)
            kept = torch.zeros_like(group_score, dtype=torch.bool)
            kept.scatter_(1, group_score.topk(router.topk_group, -1).indices, True)
            key = torch.where(kept[:, :, None], grouped, -math.inf).view_as(key)
        ordered = key.topk(k + 1, -1)
        ids = ordered.indices[:, :k]
        gaps.append(float((ordered.values[:, k - 1] - ordered.values[:, k]).min()))
        static_ids = (key - prior64).topk(k, -1).indices
        changed.append(int((ids.sort(-1).values != static_ids.sort(-1).values).any(-1).sum()))
        weights = scores.gather(1, ids)
        if family in ("mixtral", "gpt_oss") or router.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        if family == "deepseek_v3":
            weights = weights * router.routed_scaling_factor
        dtype = torch.float32 if family in ("mixtral", "deepseek_v3") else logits.dtype
        return logits, weights.to(dtype), ids

    return hook


@pytest.mark.parametrize("family", FAMILIES)
def test_applied_routing_matches_an_oracle_forward_and_reverts_exactly(family):
    model, batch = _patched(family), _batch(seqs=2, seq_len=10, seed=3)
    layers = cor.find_moe_layers(model, "test")
    base = [layer.k for layer in layers]
    k = torch.tensor([base[0] - 1, min(base[1] + 1, layers[1].eligible_experts)])
    generator = torch.Generator().manual_seed(4)
    plan = cor.CoRPlan(k, torch.rand(len(layers), layers[0].num_experts, generator=generator), strength=0.3)
    with torch.no_grad():
        before = model(**batch).logits
        cor.apply_counterfactual_routing(model, plan)
        routed = model(**batch).logits
        cor.revert_counterfactual_routing(model)
        after = model(**batch).logits
        gaps, changed, handles = [], [], []
        for layer in layers:
            prior64 = plan.prior[layer.index].double() * plan.strength
            hook = _oracle_router(family, int(k[layer.index]), prior64, gaps, changed)
            handles.append(layer.router.register_forward_hook(hook))
        oracle = model(**batch).logits
        for handle in handles:
            handle.remove()
    assert min(gaps) > 1e-6, "near-tie in the oracle's keys"
    assert sum(changed) > 0  # the prior moved some selections
    assert_close(routed, oracle, op="whole_model")
    assert torch.equal(before, after)
    assert not any(SAVED in m.__dict__ and "forward" not in m.__dict__ for m in model.modules())


def test_calibrate_and_apply_deepseek_v3_with_groups():
    model = _patched("deepseek_v3")
    batches = [_batch(seed=5), _batch(seed=6)]
    plan = cor.calibrate(model, batches, cor.causal_lm_token_losses)
    assert plan.total_k == 6 and int(plan.k.max()) <= 4  # 2 of 4 groups of 2 experts selectable
    assert plan.prior.shape == (2, 8)
    cor.apply_counterfactual_routing(model, plan)
    with torch.no_grad():
        assert torch.isfinite(model(**batches[0]).logits).all()
    cor.revert_counterfactual_routing(model)


def test_unpatched_hf_model_is_refused_with_a_hint():
    with pytest.raises(
        ValueError, match="are not patched: call moe_kernels.integrations.transformers.apply_moe_kernels"
    ):
        cor.expert_impact(_build("mixtral"), [_batch()], cor.causal_lm_token_losses)
