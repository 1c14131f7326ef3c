"""Independent float64 oracles, written as plain per-row Python loops over floats.

They share no code with ``moe_kernels.reference`` (which is vectorised PyTorch), so an error in
one is not repeated in the other.
"""

from __future__ import annotations

import math

import torch


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _softmax(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(x - top) for x in row]
    total = sum(exps)
    return [e / total for e in exps]


def softmax_topk_oracle(
    logits: torch.Tensor,
    k: int,
    *,
    renormalize: bool = False,
    score_func: str = "softmax",
    bias: torch.Tensor | None = None,
    num_groups: int | None = None,
    topk_groups: int | None = None,
    group_score: str = "top2_sum",
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate + top-k of finite ``(T, E)`` logits: ``(T, k)`` float64 weights, int32 ids."""
    shape = (*logits.shape[:-1], k)
    rows = logits.double().reshape(-1, logits.shape[-1]).tolist()
    if not rows:
        return torch.empty(shape, dtype=torch.float64), torch.empty(shape, dtype=torch.int32)
    offsets = [0.0] * len(rows[0]) if bias is None else bias.double().tolist()
    all_weights, all_ids = [], []
    for row in rows:
        num_experts = len(row)
        scores = _softmax(row) if score_func == "softmax" else [_sigmoid(x) for x in row]
        keys = [s + b for s, b in zip(scores, offsets)]
        if num_groups:
            size = num_experts // num_groups
            group_keys = [sorted(keys[g * size : (g + 1) * size], reverse=True) for g in range(num_groups)]
            group_scores = [ks[0] if group_score == "max" else ks[0] + ks[1] for ks in group_keys]
            ranked = sorted(range(num_groups), key=lambda g: (-group_scores[g], g))
            kept = set(ranked[:topk_groups])
            keys = [key if e // size in kept else -math.inf for e, key in enumerate(keys)]
        chosen = sorted(range(num_experts), key=lambda e: (-keys[e], e))[:k]
        weights = [scores[e] for e in chosen]
        if renormalize:
            total = sum(weights) + 1e-20
            weights = [w / total for w in weights]
        all_weights.append([w * scale for w in weights])
        all_ids.append(chosen)
    weights = torch.tensor(all_weights, dtype=torch.float64).reshape(shape)
    ids = torch.tensor(all_ids, dtype=torch.int32).reshape(shape)
    return weights, ids
