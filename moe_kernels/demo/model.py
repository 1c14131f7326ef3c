"""The demo's language model: a small character-level MoE LM built from :class:`moe_kernels.MoE`
blocks, and its training loop.

``CharMoELM``: the last ``context`` characters (each with its own position's embedding) are
projected to the hidden size, then ``layers`` residual blocks ``h + MoE(LayerNorm(h))``, then a
linear head over the 128 byte codes: a causal next-character model (it sees only the past).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from moe_kernels.config import RoutingConfig
from moe_kernels.demo.data import VOCAB
from moe_kernels.nn import MoE
from moe_kernels.progress import Progress


@dataclass(frozen=True)
class ModelSize:
    """The LM's sizes and its training schedule."""

    context: int
    hidden: int
    intermediate: int
    experts: int
    k: int
    layers: int
    train_steps: int
    batch: int
    lr: float


# The quick run's (a CI test) and the full run's (the claims' protocol; the same on a GPU, so
# that its verdicts compare with a CPU run's).
SIZES = {
    "quick": ModelSize(
        context=12, hidden=64, intermediate=64, experts=8, k=2, layers=2, train_steps=300, batch=128, lr=3e-3
    ),
    "full": ModelSize(
        context=16, hidden=96, intermediate=96, experts=16, k=2, layers=3, train_steps=1500, batch=192, lr=2e-3
    ),
}


class CharMoELM(nn.Module):
    """``forward(context (B, C) int64) -> logits (B, 128)``; ``blocks`` are the MoE layers, routed
    by ``routing`` (default ``RoutingConfig()``: softmax top-k, not renormalised, as OLMoE)."""

    def __init__(self, size: ModelSize, *, routing: RoutingConfig | None = None, device=None):
        super().__init__()
        self.size = size
        self.embed = nn.Embedding(VOCAB * size.context, 32, device=device)  # one table per position
        self.proj = nn.Linear(32 * size.context, size.hidden, device=device)
        self.norms = nn.ModuleList([nn.LayerNorm(size.hidden, device=device) for _ in range(size.layers)])
        self.blocks = nn.ModuleList(
            [
                MoE(
                    size.hidden,
                    size.intermediate,
                    size.experts,
                    size.k,
                    routing=routing or RoutingConfig(),
                    device=device,
                )
                for _ in range(size.layers)
            ]
        )
        self.final_norm = nn.LayerNorm(size.hidden, device=device)
        self.head = nn.Linear(size.hidden, VOCAB, device=device)
        offsets = torch.arange(size.context, device=device) * VOCAB
        self.register_buffer("offsets", offsets, persistent=False)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        h = self.proj(self.embed(context + self.offsets).flatten(1))
        for norm, block in zip(self.norms, self.blocks):
            h = h + block(norm(h))
        return self.head(self.final_norm(h))


def batch_loss(model: nn.Module, batch) -> torch.Tensor:
    """Mean next-character cross-entropy of a ``(contexts, targets)`` batch."""
    context, target = batch
    return nn.functional.cross_entropy(model(context), target)


def token_losses(model: nn.Module, batch) -> torch.Tensor:
    """``(B,)`` per-token cross-entropy, no gradient (the demo's ``token_losses`` for CoR)."""
    with torch.no_grad():
        context, target = batch
        return nn.functional.cross_entropy(model(context), target, reduction="none")


def record_routing(model: CharMoELM, batches) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Run ``model`` on ``batches`` (no gradient) and return, per MoE layer, its router inputs
    ``(N, H)`` and chosen ids ``(N, k)`` over all the batches' tokens."""
    inputs = [[] for _ in model.blocks]
    ids = [[] for _ in model.blocks]

    def record(layer: int):
        def hook(module, args, out):
            inputs[layer].append(args[0])
            ids[layer].append(out[1])

        return hook

    hooks = [block.router.register_forward_hook(record(i)) for i, block in enumerate(model.blocks)]
    try:
        with torch.no_grad():
            for context, _ in batches:
                model(context)
    finally:
        for hook in hooks:
            hook.remove()
    return [torch.cat(x) for x in inputs], [torch.cat(x) for x in ids]


def mean_loss(model: nn.Module, batches) -> float:
    """Mean per-token loss over evaluation batches."""
    losses = torch.cat([token_losses(model, batch) for batch in batches])
    return float(losses.mean())


@dataclass
class Training:
    """What :func:`train` did: the loss after each step, its wall time and step count."""

    losses: list[float]
    seconds: float
    steps: int


def train(
    model: nn.Module,
    batches,
    *,
    lr: float,
    parameters=None,
    description: str = "train",
    loss_fn=batch_loss,
    progress: bool = True,
) -> Training:
    """Adam over ``parameters`` (default: all of the model's) for one step per batch."""
    parameters = [p for p in (parameters if parameters is not None else model.parameters()) if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=lr)
    model.train()
    losses = []
    start = time.perf_counter()
    with Progress(len(batches), description, enabled=progress) as bar:
        for batch in batches:
            loss = loss_fn(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            bar.update(status={"loss": losses[-1]})
    model.eval()
    return Training(losses, time.perf_counter() - start, len(batches))
