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


def subset_law_oracle(logits: torch.Tensor, k: int, k_min: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Brute-force ProbMoE law of one ``(E,)`` logit row in float64, by enumerating every subset
    with ``k_min <= |S| <= k``: ``(marginals (E,), log_z (), {subset tuple: probability})``."""
    import itertools

    r = logits.double()
    num_experts = r.shape[0]
    subsets = [s for c in range(k_min, k + 1) for s in itertools.combinations(range(num_experts), c)]
    scores = torch.stack([r[list(s)].sum() if s else r.new_zeros(()) for s in subsets])
    log_z = torch.logsumexp(scores, 0)
    probs = torch.exp(scores - log_z)
    marginals = torch.zeros(num_experts, dtype=torch.float64)
    for s, p in zip(subsets, probs):
        marginals[list(s)] += p
    return marginals, log_z, {s: p.item() for s, p in zip(subsets, probs)}


def log_partition_dp(logits: torch.Tensor, k: int, k_min: int) -> torch.Tensor:
    """``(T,)`` band log normaliser by the plain, unshifted log-space prefix DP with autograd
    (the official ProbMoE code's route): its gradient is the marginals, its Hessian-vector
    product ``Cov @ v``. Independent of the reference's shares and adjoint recursion."""
    num_tokens, num_experts = logits.shape
    # A finite "impossible" sentinel (e^-1000 is 0 next to any real term): autograd through
    # logaddexp(-inf, -inf) gives NaN.
    alpha = [logits.new_zeros(num_tokens)] + [logits.new_full((num_tokens,), -1000.0)] * k
    for i in range(num_experts):
        alpha = [alpha[0]] + [_logaddexp(alpha[j], alpha[j - 1] + logits[:, i]) for j in range(1, k + 1)]
    return torch.logsumexp(torch.stack(alpha[k_min:], -1), -1)


def _logaddexp(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # torch.logaddexp's double backward is NaN here; any constant shift gives the same value and
    # derivatives, so shift by the detached max.
    shift = torch.maximum(x, y).detach()
    return shift + torch.log(torch.exp(x - shift) + torch.exp(y - shift))
