"""Counterfactual Routing on ``moe_kernels.MoE`` models, the analysis: the batched layer
sensitivity and expert impact against brute-force float64 oracles (one forward per layer / per
(token, layer, expert), with explicit perturbations written here), and a model built so that one
expert is essential for the hard tokens (the plan, its routing and bad input:
``test_cor_plan.py``)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from cor_cases import moe_blocks, tiny_lm, token_batches
from torch import nn

from moe_kernels import MoE, cor
from moe_kernels.testing import assert_close

DELTA = 0.2

pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # tiny models


# ---------------------------------------------------------------------------------------------
# float64 oracles: whole-batch forwards, explicit perturbations


def _oracle_losses(model, ids):
    """Next-token NLL per position by log_softmax and a loop, NaN at the last position."""
    logits = model(ids).logits.double()
    out = torch.full(ids.shape, math.nan, dtype=torch.float64)
    for b in range(ids.shape[0]):
        for i in range(ids.shape[1] - 1):
            out[b, i] = -torch.log_softmax(logits[b, i], -1)[ids[b, i + 1]]
    return out.reshape(-1)


def _split(clean, hard_q=0.7, easy_q=0.3):
    finite = clean.isfinite()
    hard = finite & (clean > torch.quantile(clean[finite], hard_q))
    easy = finite & (clean < torch.quantile(clean[finite], easy_q))
    return hard, easy


def _oracle_sensitivity(model, batches):
    with torch.no_grad():
        clean = torch.cat([_oracle_losses(model, b) for b in batches])
        hard, easy = _split(clean)
        rows = []
        for moe in moe_blocks(model):
            handle = moe.register_forward_hook(lambda module, args, out: out * (1 - DELTA))
            try:
                perturbed = torch.cat([_oracle_losses(model, b) for b in batches])
            finally:
                handle.remove()
            rows.append(((perturbed - clean)[hard].mean(), (perturbed - clean)[easy].mean()))
    hard_s = torch.stack([r[0] for r in rows])
    easy_s = torch.stack([r[1] for r in rows])
    return _oracle_ratio(hard_s, easy_s), hard_s, easy_s


def _oracle_ratio(hard, easy):
    """The documented ratio, written out per layer in float64: easy floored at half the layers'
    mean positive easy sensitivity (of the hard ones when no easy one is positive)."""
    hard, easy = [max(float(x), 0.0) for x in hard], [max(float(x), 0.0) for x in easy]
    scale = sum(easy) / len(easy) or sum(hard) / len(hard)
    return torch.tensor([h / (max(e, 0.5 * scale) + 1e-6) for h, e in zip(hard, easy)], dtype=torch.float64)


def _ablation(row: int, expert: int):
    """Router hook: token ``row`` loses ``expert``; the others' weights carry its mass."""

    def hook(module, args, out):
        weights, ids = out
        new = weights.clone().double()
        gates, chosen = new[row], ids[row].long() == expert
        total, rest = gates.sum(), gates[~chosen].sum()
        new[row] = torch.zeros_like(gates) if rest == 0 else torch.where(chosen, 0.0, gates * total / rest)
        return new.to(weights.dtype), ids

    return hook


def _oracle_impact(model, batches, num_experts):
    moes = moe_blocks(model)
    sums = torch.zeros(len(moes), num_experts, dtype=torch.float64)
    counts = torch.zeros_like(sums)
    with torch.no_grad():
        cleans, all_ids = [], []
        for batch in batches:
            ids = []
            handles = [
                m.router.register_forward_hook(lambda mod, a, out, ids=ids: ids.append(out[1].long())) for m in moes
            ]
            cleans.append(_oracle_losses(model, batch))
            for handle in handles:
                handle.remove()
            all_ids.append(ids)
        hard, _ = _split(torch.cat(cleans))
        offset = 0
        for batch, clean, ids in zip(batches, cleans, all_ids):
            for row in hard[offset : offset + clean.numel()].nonzero().flatten().tolist():
                for layer, moe in enumerate(moes):
                    for expert in ids[layer][row].tolist():
                        handle = moe.router.register_forward_hook(_ablation(row, expert))
                        try:
                            ablated = _oracle_losses(model, batch)[row]  # one forward per what-if
                        finally:
                            handle.remove()
                        sums[layer, expert] += ablated - clean[row]
                        counts[layer, expert] += 1
            offset += clean.numel()
    per_batch = [int(part.sum()) for part in hard.split([clean.numel() for clean in cleans])]
    return torch.where(counts > 0, sums / counts.clamp_min(1), 0.0), per_batch


# ---------------------------------------------------------------------------------------------
# analysis against the oracles


def test_layer_sensitivity_matches_oracle():
    model, batches = tiny_lm(num_layers=3), token_batches()
    result = cor.layer_sensitivity(
        model, batches, cor.causal_lm_token_losses, cor.CalibrationSettings(delta=DELTA, tokens_per_forward=12)
    )
    ratio, hard, easy = _oracle_sensitivity(model, batches)
    assert result.hard.dtype == torch.float32 and result.ratio.shape == (3,)
    assert_close(result.hard, hard, dtype=torch.float32)
    assert_close(result.easy, easy, dtype=torch.float32)
    assert_close(result.ratio, ratio, dtype=torch.float32)
    assert hard.abs().min() > 1e-4 and easy.abs().min() > 1e-4  # the perturbation moves the losses


@pytest.mark.parametrize("tokens_per_forward", [6, 4096])
def test_expert_impact_matches_oracle_and_is_batched(tokens_per_forward):
    model, batches = tiny_lm(), token_batches()
    model.blocks[1].moe.router.k = 1  # layer 1 selects one expert: its ablation zeroes the routed output
    forwards = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: forwards.append((args or (kwargs["input_ids"],))[0].shape[0]), with_kwargs=True
    )
    impact = cor.expert_impact(
        model, batches, cor.causal_lm_token_losses, cor.CalibrationSettings(tokens_per_forward=tokens_per_forward)
    )
    handle.remove()
    expected, hard_per_batch = _oracle_impact(model, batches, 4)
    assert impact.dtype == torch.float32 and impact.shape == (2, 4)
    assert_close(impact, expected, dtype=torch.float32)
    assert (expected != 0).sum() >= 6  # most (layer, expert) pairs were selected by some hard token
    # one clean forward per batch, then its W_b = hard_b * (2 + 1) what-ifs in copies of 6-token sequences
    copies = max(1, tokens_per_forward // 6)
    what_ifs = [hard * 3 for hard in hard_per_batch]
    assert len(forwards) == len(batches) + sum(math.ceil(w / copies) for w in what_ifs)
    assert forwards[: len(batches)] == [2, 2] and sum(forwards[len(batches) :]) == sum(what_ifs)
    if tokens_per_forward == 4096:  # against 2 + sum(what_ifs) forwards of one what-if each
        assert len(forwards) == 2 * len(batches) and sum(what_ifs) >= 12


def test_expert_impact_float32_independent_of_chunking():
    model, batches = tiny_lm(dtype=torch.float32), token_batches(num=1, seqs=3, seq_len=8)
    whole = cor.expert_impact(model, batches, cor.causal_lm_token_losses)
    one_copy = cor.expert_impact(
        model, batches, cor.causal_lm_token_losses, cor.CalibrationSettings(tokens_per_forward=1)
    )
    assert_close(one_copy, whole, dtype=torch.float32)
    assert whole.abs().max() > 1e-3


class _OneHotMoEModel(nn.Module):
    """Token t -> hidden ``4 * e_t`` (H = V), two residual MoE layers, logits = hidden. Layer 0's
    expert ``ESSENTIAL`` maps a hard token t to ``~3 * e_{perm(t)}``, its label; the router sends
    every hard token to it and no easy one. Easy tokens' label is themselves."""

    VOCAB, EXPERTS, ESSENTIAL = 16, 4, 2

    def __init__(self):
        super().__init__()
        size, experts, essential = self.VOCAB, self.EXPERTS, self.ESSENTIAL
        generator = torch.Generator().manual_seed(3)
        self.moes = nn.ModuleList([MoE(size, size, experts, 2, dtype=torch.float64) for _ in range(2)])
        half = size // 2
        self.labels = torch.arange(size)
        self.labels[half:] = half + torch.randperm(half, generator=generator)
        perm = torch.zeros(size, size, dtype=torch.float64)
        perm[self.labels[half:], torch.arange(half, size)] = 1.0  # hard t -> e_{label(t)}
        with torch.no_grad():
            for moe in self.moes:
                for param in (moe.gate_up_proj, moe.down_proj, moe.router.weight):
                    param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float64) * 0.05)
            first = self.moes[0]
            first.router.weight.copy_(torch.randn(first.router.weight.shape, generator=generator).double() * 0.3)
            first.router.weight[essential, :half] = -2.0
            first.router.weight[essential, half:] = 2.0
            first.gate_up_proj[essential] = torch.cat([perm, perm])  # silu(4) * 4 on the label's row
            first.down_proj[essential] = torch.eye(size, dtype=torch.float64) * 0.2

    def forward(self, tokens):
        x = 4.0 * F.one_hot(tokens, self.VOCAB).double()
        for moe in self.moes:
            x = x + moe(x)
        return x


def _one_hot_losses(model, tokens):
    logits = model(tokens)
    return F.cross_entropy(logits.reshape(-1, model.VOCAB), model.labels[tokens].reshape(-1), reduction="none")


def test_essential_expert_has_the_largest_impact_in_its_layer():
    model = _OneHotMoEModel().eval()
    generator = torch.Generator().manual_seed(4)
    batches = [torch.randint(0, model.VOCAB, (4, 8), generator=generator) for _ in range(2)]
    impact = cor.expert_impact(model, batches, _one_hot_losses)
    first = impact[0]
    assert int(first.argmax()) == model.ESSENTIAL, first
    others = torch.cat([first[: model.ESSENTIAL], first[model.ESSENTIAL + 1 :]])
    assert first[model.ESSENTIAL] > 1.0 and first[model.ESSENTIAL] > 10 * others.abs().max(), first
    plan = cor.calibrate(model, batches, _one_hot_losses)
    assert plan.prior[0, model.ESSENTIAL] == 1.0


def test_knowledge_ratio_floor_when_easy_tokens_do_not_get_worse():
    from moe_kernels.cor.sensitivity import knowledge_ratio

    hard = torch.tensor([0.02, 0.02, 0.02])
    # Layer 1's easy tokens improve (a noise-level -1e-5): unfloored its ratio would be 2e4,
    # 1e4 times the others'; floored, it counts as half the typical easy sensitivity (1/150):
    # three times the others'.
    easy = torch.tensor([0.01, -1e-5, 0.01])
    ratio = knowledge_ratio(hard, easy)
    torch.testing.assert_close(ratio.double(), _oracle_ratio(hard, easy), rtol=1e-6, atol=0)
    torch.testing.assert_close(ratio[1] / ratio[0], torch.tensor(3.0), rtol=1e-3, atol=0)
    assert knowledge_ratio(torch.zeros(3), -torch.ones(3)).tolist() == [0.0, 0.0, 0.0]
    # No easy sensitivity positive: the floor comes from the hard ones.
    torch.testing.assert_close(knowledge_ratio(hard, -easy).double(), _oracle_ratio(hard, -easy))
    # Every easy sensitivity above the floor: hard / (easy + 1e-6), unchanged.
    easy = torch.tensor([0.01, 0.02, 0.015])
    torch.testing.assert_close(knowledge_ratio(hard, easy), hard / (easy + 1e-6))
