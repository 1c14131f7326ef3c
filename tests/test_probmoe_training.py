"""End to end: fine-tuning a tiny top-k MoE with ProbMoE routing, the paper's regime (a router
trained with top-k, then fine-tuned on a shifted task with each routing), on the reference path."""

from __future__ import annotations

import copy

import pytest
import torch

import moe_kernels as mk

DIM, EXPERTS, K, CLUSTERS = 16, 8, 2, 8


def _task(num_tokens: int, generator: torch.Generator, shift: float):
    """Tokens from 8 clusters; the target is a cluster-specific linear map of the token. ``shift``
    perturbs the maps: 0 is the pre-training task, 0.5 the fine-tuning one."""
    centers = torch.randn(CLUSTERS, DIM, generator=torch.Generator().manual_seed(0)) * 2
    maps = torch.randn(CLUSTERS, DIM, DIM, generator=torch.Generator().manual_seed(1))
    maps = (maps + shift * torch.randn(CLUSTERS, DIM, DIM, generator=torch.Generator().manual_seed(2))) / DIM**0.5
    cluster = torch.randint(0, CLUSTERS, (num_tokens,), generator=generator)
    x = centers[cluster] + torch.randn(num_tokens, DIM, generator=generator)
    y = torch.einsum("nij,nj->ni", maps[cluster], x) + 0.05 * torch.randn(num_tokens, DIM, generator=generator)
    return x, y


class TinyMoE(torch.nn.Module):
    """Linear experts, a linear gate, softmax weights of the selected experts (not
    renormalised, as in OLMoE and Qwen1.5-MoE, the paper's models)."""

    def __init__(self):
        super().__init__()
        self.gate = torch.nn.Linear(DIM, EXPERTS, bias=False)
        self.experts = torch.nn.Parameter(torch.randn(EXPERTS, DIM, DIM) / DIM**0.5)
        self.routing = "topk"

    def forward(self, x):
        logits = self.gate(x)
        if self.routing == "topk":
            weights, ids = mk.softmax_topk(logits, K)
        else:
            weights, ids = mk.probmoe_route(logits, K, training=self.training)
        outputs = torch.einsum("eij,nj->nei", self.experts, x)  # dense: the model is tiny
        picked = outputs.gather(1, ids.long()[..., None].expand(-1, -1, DIM))
        return (weights[..., None] * picked).sum(1), logits


def _train(model, shift, steps, lr, seed):
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        x, y = _task(256, generator, shift)
        loss = (model(x)[0] - y).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _evaluate(model, shift):
    model.eval()
    x, y = _task(4096, torch.Generator().manual_seed(999), shift)
    with torch.no_grad():
        prediction, logits = model(x)
    probs = torch.softmax(logits, -1)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean()
    return (prediction - y).square().mean().item(), entropy.item()


@pytest.mark.parametrize("seed", [0, 1])
def test_probmoe_fine_tuning_is_no_worse_than_top_k(seed):
    torch.manual_seed(seed)
    pretrained = TinyMoE()
    _train(pretrained, shift=0.0, steps=300, lr=1e-2, seed=seed)
    before, _ = _evaluate(pretrained, shift=0.5)
    results = {}
    for routing in ("topk", "probmoe"):
        model = copy.deepcopy(pretrained)
        model.routing = routing
        torch.manual_seed(seed + 50)
        _train(model, shift=0.5, steps=300, lr=1e-3, seed=seed + 7)
        results[routing] = _evaluate(model, shift=0.5)
    (loss_topk, _), (loss_probmoe, _) = results["topk"], results["probmoe"]
    assert loss_topk < 0.5 * before and loss_probmoe < 0.5 * before  # both fine-tuned
    # Measured over 3 seeds (lr 1e-3 and 3e-4, k = 2 and 4): ratios 0.998-1.037. The paper's
    # other effect, a higher routing entropy, does not show on this task: ProbMoE's entropy
    # came out 0.02-0.05 nats lower (measured, not a property of the method), so it is not asserted.
    assert loss_probmoe <= 1.05 * loss_topk, results
