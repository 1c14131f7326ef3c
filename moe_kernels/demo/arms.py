"""The fine-tuning arms of a seed's run and what is measured of every arm's routing.

Every arm fine-tunes a copy of the pretrained LM on one fixed set of prose windows (the same set
the kNN memory holds) with one recipe: Adam, linear warmup then linear decay to 0 over
``max_epochs`` epochs, the batches reshuffled each epoch by the seed; after each epoch the loss
on the calibration windows is measured and the best epoch kept (early stopping); over the lr grid
the lowest calibration loss wins. Arms differ only in what trains and how the routers route:

- ``router_ft``: the routers only (top-k); ``full_ft``: the whole model (top-k);
- ``exact_k`` / ``dynamic_k``: the whole model with ProbMoE routers sharing the trained gates
  (exact k, or the band ``[1, k]``), never renormalised;
- ``top_1``: the whole model routing each token to one expert (the static line's other end).
"""

from __future__ import annotations

import copy
import time

import torch

from moe_kernels.config import RoutingConfig
from moe_kernels.demo.model import CharMoELM, batch_loss, mean_loss, token_losses
from moe_kernels.demo.protocol import Protocol
from moe_kernels.layers import Tap, attach_tap, detach_tap
from moe_kernels.nn import ProbMoERouter, TopKRouter

ARMS = ("router_ft", "full_ft", "exact_k", "dynamic_k", "top_1")


def set_routers(model: CharMoELM, arm: str) -> None:
    """Give ``model`` the routers of ``arm`` (sharing each layer's gate weight)."""
    k = model.size.k
    for block in model.blocks:
        gate = block.router
        if arm in ("exact_k", "dynamic_k"):
            block.router = ProbMoERouter.from_gate(gate, k, k_min=1 if arm == "dynamic_k" else None, renormalize=False)
        elif arm == "top_1":
            router = TopKRouter(gate.weight.shape[1], gate.weight.shape[0], 1, routing=RoutingConfig())
            router.weight = gate.weight
            block.router = router


def _schedule(total_steps: int, warmup_share: float):
    warmup = max(1, round(warmup_share * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def finetune_arm(
    pretrained: CharMoELM, arm: str, data: list, calibration: list, protocol: Protocol, seed: int
) -> tuple[CharMoELM, dict]:
    """The arm's best model over the lr grid and epochs (by calibration loss), and what was chosen:
    ``{"lr", "epochs", "calibration_loss", "seconds"}`` (seconds: all of the arm's training)."""
    best, chosen, seconds = None, None, 0.0
    total = protocol.max_epochs * len(data)
    for lr_index, lr in enumerate(protocol.lr_grid):
        torch.manual_seed(seed * 7919 + ARMS.index(arm) * 31 + lr_index)  # ProbMoE's sampling stream
        model = copy.deepcopy(pretrained)
        set_routers(model, arm)
        parameters = [p for b in model.blocks for p in b.router.parameters()] if arm == "router_ft" else None
        parameters = [p for p in (parameters or model.parameters()) if p.requires_grad]
        optimizer = torch.optim.Adam(parameters, lr=lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(total, protocol.warmup_share))
        order = torch.Generator().manual_seed(seed * 104729 + ARMS.index(arm))  # the same order for every lr
        for epoch in range(1, protocol.max_epochs + 1):
            start = time.perf_counter()
            model.train()
            for index in torch.randperm(len(data), generator=order).tolist():
                loss = batch_loss(model, data[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
            model.eval()
            seconds += time.perf_counter() - start
            loss = mean_loss(model, calibration)
            if chosen is None or loss < chosen["calibration_loss"]:
                best = copy.deepcopy(model)
                chosen = {"lr": lr, "epochs": epoch, "calibration_loss": loss}
    return best, {**chosen, "seconds": seconds}


class RoutingStats(Tap):
    """Observes a router's selections: per token the experts used, the entropy of the softmax of
    the logits it routed from (kNN-MoE's mixed logits, ProbMoE's own), the fewest experts holding
    99% of that softmax and its positive logits; and the distribution of experts per token."""

    def __init__(self, k: int):
        self.k = k
        self.tokens = 0
        self.sums = torch.zeros(4, dtype=torch.float64)
        self.cardinality = torch.zeros(k + 1, dtype=torch.float64)

    def observe(self, ids: torch.Tensor, logits: torch.Tensor) -> None:
        with torch.no_grad():
            logits = logits.detach().float().reshape(-1, logits.shape[-1])
            probs = torch.softmax(logits, dim=-1)
            entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
            mass = (probs.sort(dim=-1, descending=True).values.cumsum(-1) < 0.99).sum(-1) + 1
            used = (ids.reshape(-1, ids.shape[-1]) >= 0).sum(-1)
            rows = torch.stack([used.double(), entropy.double(), mass.double(), (logits > 0).sum(-1).double()])
            self.sums += rows.sum(1).cpu()
            self.tokens += logits.shape[0]
            self.cardinality += torch.bincount(used, minlength=self.k + 1)[: self.k + 1].double().cpu()


def evaluate(model: CharMoELM, held_out: dict) -> tuple[dict, dict]:
    """One pass over every held-out batch (no gradient): ``(losses, numbers)`` with ``losses
    {domain: (N,) float64}`` the per-position losses and ``numbers`` the mean loss per domain
    (``loss_<domain>``), and on prose, averaged over tokens and layers: ``experts_per_token``,
    ``routing_entropy`` (nats), ``experts_for_99``, ``positive_logits``, ``cardinality`` (the
    share of token-layer rows using 0..k experts) and, for kNN routers, ``confidence`` per
    domain (their mean confidence, 0 where a router fell back to its gate)."""
    knn = all(hasattr(block.router, "last_confidence") for block in model.blocks)
    losses, numbers, confidence = {}, {}, {}
    for domain, batches in held_out.items():
        taps = [RoutingStats(model.size.k) for _ in model.blocks] if domain == "prose" else []
        for block, tap in zip(model.blocks, taps):
            attach_tap(block.router, tap)
        parts, total = [], 0.0
        try:
            with torch.no_grad():  # the kNN routers' confidences need no graph either
                for context, target in batches:
                    parts.append(token_losses(model, (context, target)).double().cpu())
                    if knn:
                        total += float(torch.stack([b.router.last_confidence for b in model.blocks]).double().mean())
        finally:
            for block, tap in zip(model.blocks, taps):
                detach_tap(block.router, tap)
        losses[domain] = torch.cat(parts)
        numbers[f"loss_{domain}"] = float(losses[domain].mean())
        confidence[domain] = total / len(batches)
        if taps:
            numbers.update(_summary(taps))
    if knn:
        numbers["confidence"] = confidence
    return losses, numbers


def _summary(taps: list[RoutingStats]) -> dict:
    sums = sum(tap.sums for tap in taps)
    tokens = sum(tap.tokens for tap in taps)
    cardinality = sum(tap.cardinality for tap in taps)
    means = (sums / tokens).tolist()
    return {
        "experts_per_token": means[0],
        "routing_entropy": means[1],
        "experts_for_99": means[2],
        "positive_logits": means[3],
        "cardinality": (cardinality / cardinality.sum()).tolist(),
    }
