"""Pure-PyTorch reference of the gate + top-k op: the test oracle, the ``backend="torch"`` path off
the CPU and the benchmarks' eager baseline. Semantics are documented on :func:`moe_kernels.softmax_topk`.

Every function works on ``(..., E)`` tensors and computes in float32 (float64 for float64 logits,
so that ``gradcheck`` can run on it). Selection never relies on ``torch.topk``'s order among equal
values, which is unspecified: the op promises "equal keys -> lower expert id first".
"""

from __future__ import annotations

import torch

from moe_kernels.config import DEFAULT_ROUTING, RENORM_EPS, RoutingConfig
from moe_kernels.utils import compute_dtype


def gate_scores(logits: torch.Tensor, score_func: str) -> torch.Tensor:
    """``softmax(logits)`` or ``sigmoid(logits)`` over the last dim, in the compute dtype."""
    x = logits.to(compute_dtype(logits.dtype))
    if score_func == "softmax":
        return torch.softmax(x, dim=-1)
    if score_func == "sigmoid":
        # As the kernels compute it. Not torch.sigmoid: on CPU its vectorised and scalar paths
        # round differently, so equal logits at different positions of a tensor could get scores
        # 1 ulp apart, and the higher expert id could win a tie.
        return 1.0 / (1.0 + torch.exp(-x))
    raise ValueError(f"score_func must be 'softmax' or 'sigmoid', got {score_func!r}")


def _nan_to_neg_inf(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isnan(x), torch.full_like(x, float("-inf")), x)


def selection_keys(scores, bias=None, num_groups=None, topk_groups=None, group_score="top2_sum"):
    """The key experts are ranked by: ``scores + bias``, NaN replaced by -inf, and with groups,
    every expert outside the best ``topk_groups`` groups set to -inf.

    Groups are contiguous blocks of ``E // num_groups`` experts, scored by the max key
    (``"max"``) or the sum of the two largest keys (``"top2_sum"``); equal group scores keep the
    lower group index first.
    """
    keys = scores if bias is None else scores + bias.to(scores.dtype)
    keys = _nan_to_neg_inf(keys)
    if not num_groups:
        return keys
    num_experts = keys.shape[-1]
    grouped = keys.unflatten(-1, (num_groups, num_experts // num_groups))
    if group_score == "max":
        per_group = grouped.amax(dim=-1)
    elif group_score == "top2_sum":
        per_group = grouped.topk(2, dim=-1).values.sum(dim=-1)
    else:
        raise ValueError(f"group_score must be 'top2_sum' or 'max', got {group_score!r}")
    per_group = _nan_to_neg_inf(per_group)
    best = torch.sort(per_group, dim=-1, descending=True, stable=True).indices[..., :topk_groups]
    keep = torch.zeros_like(per_group, dtype=torch.bool).scatter_(-1, best, True)
    keep = keep.repeat_interleave(num_experts // num_groups, dim=-1)
    return keys.masked_fill(~keep, float("-inf"))


def top_k_lowest_id_first(keys: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``(..., k)`` int64 of the ``k`` largest ``keys`` (no NaN), largest first, equal keys
    in increasing index order (-0.0 ranks equal to +0.0).

    float32 keys: each key's order-preserving int32 image and its index are packed into
    one int64, so ``torch.topk`` on the packed values is exact and breaks ties the same way
    (2-2.4x faster on CPU than a stable sort of the row at E = 64-256). float64 keys (gradcheck) use a
    stable sort.
    """
    if keys.dtype == torch.float64:
        return torch.sort(keys, dim=-1, descending=True, stable=True).indices[..., :k]
    bits = (keys + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # flip the magnitude bits of negative keys
    # key * 2^32 - id: ordered by key, then the lower id first; -packed's low 32 bits are the id.
    packed = (ordered.to(torch.int64) << 32) - torch.arange(keys.shape[-1], device=keys.device)
    return packed.topk(k, dim=-1).values.neg_().bitwise_and_(0xFFFFFFFF)


def softmax_topk(
    logits: torch.Tensor, k: int, *, routing: RoutingConfig = DEFAULT_ROUTING, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`moe_kernels.softmax_topk` (arguments assumed valid).

    ``logits (..., E)``, ``k`` int, ``routing`` a :class:`~moe_kernels.RoutingConfig`, ``bias (E,)``
    the selection bias or None. Returns ``weights (..., k)`` float32 (float64 for float64 logits),
    differentiable with respect to ``logits``, and ``ids (..., k)`` int32.
    """
    scores = gate_scores(logits, routing.score_func)
    keys = selection_keys(scores, bias, routing.num_groups, routing.topk_groups, routing.group_score)
    ids = top_k_lowest_id_first(keys, k)
    weights = scores.gather(-1, ids)
    if routing.renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + RENORM_EPS)
    return weights * routing.scale, ids.to(torch.int32)


def softmax_topk_backward(
    grad_weights: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor, *, routing: RoutingConfig
) -> torch.Tensor:
    """Gradient of ``softmax_topk``'s weights with respect to ``logits``, written out.

    ``grad_weights (..., k)``, ``logits (..., E)``, ``ids (..., k)`` int32 -> ``(..., E)`` in
    ``logits.dtype``. The bias and the group mask only choose ``ids``, so they take no part (of
    ``routing``, only ``score_func``, ``renormalize`` and ``scale`` do).
    """
    scores = gate_scores(logits, routing.score_func)
    index = ids.long()
    grad = grad_weights.to(scores.dtype) * routing.scale
    if routing.renormalize:
        picked = scores.gather(-1, index)
        denom = picked.sum(dim=-1, keepdim=True) + RENORM_EPS
        grad = grad / denom - (grad * picked).sum(dim=-1, keepdim=True) / (denom * denom)
    grad_scores = torch.zeros_like(scores).scatter_(-1, index, grad)
    if routing.score_func == "softmax":
        grad_logits = scores * (grad_scores - (grad_scores * scores).sum(dim=-1, keepdim=True))
    else:
        grad_logits = grad_scores * scores * (1.0 - scores)
    return grad_logits.to(logits.dtype)
