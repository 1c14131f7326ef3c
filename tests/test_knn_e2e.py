"""kNN-MoE end to end, on data that ships with Python: a small character-level MoE language model
trained on Python source code (the original domain), a routing memory built on the reference
half of an upper-cased English prose corpus (``pydoc_data.topics``: the shifted domain), and
kNN routing evaluated on held-out text of both domains against the frozen routers."""

from __future__ import annotations

import argparse
import inspect
import json.decoder
import pydoc_data.topics

import torch
from torch import nn

import moe_kernels as mk
from moe_kernels.knn import KNNRouter, build_routing_memory

CONTEXT, VOCAB = 8, 128


def _encode(text: str) -> torch.Tensor:
    return torch.tensor([min(ord(c), VOCAB - 1) for c in text], dtype=torch.long)


def _windows(data: torch.Tensor, positions: torch.Tensor):
    chunk = data[positions[:, None] + torch.arange(CONTEXT + 1)]
    return chunk[:, :CONTEXT], chunk[:, CONTEXT]


class CharMoE(nn.Module):
    """Embeddings of the last 8 characters -> two residual MoE blocks -> next-character logits."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.proj = nn.Linear(16 * CONTEXT, hidden)
        self.norms = nn.ModuleList([nn.LayerNorm(hidden) for _ in range(2)])
        self.blocks = nn.ModuleList([mk.MoE(hidden, 64, 8, 2) for _ in range(2)])
        self.out = nn.Linear(hidden, VOCAB)

    def forward(self, context):
        h = self.proj(self.embed(context).flatten(1))
        for norm, block in zip(self.norms, self.blocks):
            h = h + block(norm(h))
        return self.out(h)


def _loss(model, batch):
    context, target = batch
    return nn.functional.cross_entropy(model(context), target)


def _token_losses(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")


def test_knn_routing_helps_the_shifted_domain_and_falls_back_on_the_original():
    torch.manual_seed(0)
    code = _encode(inspect.getsource(argparse) + inspect.getsource(json.decoder))
    topics = pydoc_data.topics.topics
    prose = _encode(" ".join(topics[key] for key in sorted(topics))[:200_000].upper())
    code_end = int((len(code) - CONTEXT - 1) * 0.9)
    prose_half = (len(prose) - CONTEXT - 1) // 2

    model = CharMoE()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        loss = _loss(model, _windows(code, torch.randint(0, code_end, (128,), generator=generator)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()

    reference_positions = torch.arange(0, prose_half, 3)[:3072]
    reference = [_windows(prose, reference_positions[i : i + 512]) for i in range(0, 3072, 512)]
    built = build_routing_memory(model, reference, _loss, steps=20, lr=0.1, progress=False)
    assert built.loss_after < 0.9 * built.loss_before  # the memory fits the reference set

    held_out = {
        "original": _windows(code, torch.arange(code_end, len(code) - CONTEXT - 1, 7)[:2000]),
        "shifted": _windows(prose, torch.arange(prose_half, len(prose) - CONTEXT - 1, 11)[:2000]),
    }
    frozen_losses = {domain: _token_losses(model, batch) for domain, batch in held_out.items()}
    frozen_routers = [block.router for block in model.blocks]
    for block, router, memory in zip(model.blocks, frozen_routers, built.memories.values()):
        block.router = KNNRouter(router.weight, memory, 2, n_neighbors=8)  # soft fallback only
    knn_losses = {domain: _token_losses(model, batch) for domain, batch in held_out.items()}

    # Paired per-token differences: their mean and its standard error.
    stats = {}
    for domain in held_out:
        diff = knn_losses[domain] - frozen_losses[domain]
        stats[domain] = (
            diff.mean().item(),
            diff.std().item() / diff.numel() ** 0.5,
            frozen_losses[domain].mean().item(),
        )
    print(f"reference loss {built.loss_before:.3f} -> {built.loss_after:.3f}; (mean diff, SE, frozen loss): {stats}")
    mean, se, frozen = stats["shifted"]
    assert mean < -5 * se and mean < -0.02 * frozen, stats  # the memory helps the shifted domain
    mean, se, frozen = stats["original"]
    assert mean < max(3 * se, 0.01 * frozen), stats  # and costs the original domain nothing beyond noise
