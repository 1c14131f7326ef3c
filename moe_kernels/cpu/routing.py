"""``softmax_topk`` on the CPU: the function of :func:`moe_kernels.reference.routing.softmax_topk`
in fewer and cheaper calls.

- With numba installed, PyTorch computes the scores (so that they are the reference's) and
  :func:`moe_kernels.cpu.select_jit.route` the rest in one compiled pass per row. Otherwise
  PyTorch ops, with selection by :func:`moe_kernels.cpu.select.top_k`. Both rank rows with ties
  or NaN keys exactly (equal keys lower id first, NaN as -inf), so ids are always the
  reference's; rows whose answer the shortcuts below cannot give (a NaN or +inf logit under the
  top-k softmax, a NaN in a group score) are recomputed by the reference.
- Softmax + renormalise without bias or groups (Mixtral, Qwen3, GPT-OSS) selects on the logits
  and takes the softmax of the ``k`` selected logits: the same function (renormalised top-k of
  the softmax), one ``(T, k)`` softmax instead of a ``(T, E)`` one and three more ops. The
  softmax preserves the logits' order; in exact arithmetic it is strict, so the ranking is the
  reference's wherever float32 does not round two different logits to one score.
- Otherwise the keys are the reference's (float32 scores, plus the bias), so the selected
  scores are the reference's bit for bit (the compiled pass renormalises in float64).
- Group limits rank the group scores with the same selection (no sort), and compute DeepSeek-V3's
  top-2 sum with two row maxima at large sizes (``torch.topk(2)`` per group is a row each).
- The backward uses that only ``k`` of the ``E`` score gradients are non-zero: ``(T, k)`` work,
  then two ``(T, E)`` passes.
"""

from __future__ import annotations

import torch

from moe_kernels.config import RENORM_EPS, RoutingConfig
from moe_kernels.cpu import select, select_jit
from moe_kernels.reference import routing as reference
from moe_kernels.utils import compute_dtype

NEG_INF = float("-inf")
# Groups (T * G) from which DeepSeek's top-2 group score is computed by row maxima, not topk.
TOP2_BY_MAXIMA_MIN_ROWS = 2048
# Selected values (T * k) from which the top-k softmax is written out (see _softmax_of_descending).
MANUAL_SOFTMAX_MIN_VALUES = 512


def _softmax_of_descending(values: torch.Tensor) -> torch.Tensor:
    """``softmax(values, -1)`` of rows sorted in descending order. Past a few hundred values it is
    written out (the first value is the row max): torch.softmax over a short last dim costs per
    row (51 us at T = 1024, k = 2, one thread, against 28 for these four ops); below, its one
    call is cheaper (1 us at T = 1 against 7). Rows with a NaN or +inf first value come out NaN:
    the caller recomputes them."""
    if values.numel() < MANUAL_SOFTMAX_MIN_VALUES:
        return torch.softmax(values, dim=-1)
    weights = (values - values[:, :1]).exp_()
    weights /= weights.sum(dim=-1, keepdim=True)
    return weights


def softmax_topk(
    logits: torch.Tensor, k: int, routing: RoutingConfig, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`moe_kernels.reference.routing.softmax_topk` for ``logits (T, E)`` on the CPU
    (arguments assumed valid; no autograd). Returns fresh contiguous ``weights (T, k)`` float32
    (float64 for float64 logits) and ``ids (T, k)`` int32."""
    num_tokens = logits.shape[0]
    dtype = compute_dtype(logits.dtype)
    if num_tokens == 0:
        return logits.new_empty((0, k), dtype=dtype), logits.new_empty((0, k), dtype=torch.int32)
    if select_jit.usable(logits):
        weights, ids, bad = _route_compiled(logits, k, routing, bias, dtype)
    else:
        weights, ids, bad = _route_torch(logits, k, routing, bias, dtype)
    if bad is not None:
        rows = bad.nonzero().squeeze(1)
        exact_weights, exact_ids = reference.softmax_topk(logits[rows], k, routing=routing, bias=bias)
        weights[rows] = exact_weights
        ids[rows] = exact_ids
    return weights, ids


def _route_compiled(logits: torch.Tensor, k: int, routing: RoutingConfig, bias: torch.Tensor | None, dtype):
    """:func:`softmax_topk` by :func:`moe_kernels.cpu.select_jit.route`: PyTorch computes the
    scores (so that they are the reference's), one compiled pass the rest. Returns ``(weights,
    ids, bad)`` as ``route``."""
    if bias is None and not routing.num_groups and routing.renormalize and routing.score_func == "softmax":
        keys = logits.to(dtype)
        return select_jit.route(keys, keys, None, k, routing, select_jit.WEIGHTS_SOFTMAX)
    scores = _scores(logits, routing.score_func, dtype)
    weights_from = select_jit.WEIGHTS_RENORMALIZED if routing.renormalize else select_jit.WEIGHTS_SELECTED
    return select_jit.route(scores, scores, bias, k, routing, weights_from)


def _scores(logits: torch.Tensor, score_func: str, dtype: torch.dtype) -> torch.Tensor:
    """The gate scores as the reference computes them (its sigmoid, whose ties stay exact)."""
    if score_func == "softmax":
        return torch.softmax(logits, -1, dtype=dtype)
    return reference.gate_scores(logits, score_func)


def _route_torch(logits: torch.Tensor, k: int, routing: RoutingConfig, bias: torch.Tensor | None, dtype):
    """:func:`softmax_topk` in PyTorch ops. Returns contiguous ``weights (T, k)``, ``ids (T, k)``
    int32 and ``bad`` (see :func:`moe_kernels.cpu.select.top_k`)."""
    num_groups, score_func = routing.num_groups, routing.score_func
    plain = bias is None and not num_groups
    # Few distinct 16-bit logits: most rows tie (unless a float32 bias tells the keys apart).
    ties_likely = logits.dtype.itemsize == 2 and bias is None
    if plain and routing.renormalize and score_func == "softmax":
        values, ids, bad = select.top_k(
            logits.to(dtype), k, finite_first=True, ties_likely=ties_likely, id_dtype=torch.int32
        )
        weights = _softmax_of_descending(values)
    else:
        scores = _scores(logits, score_func, dtype)
        keys = scores if bias is None else scores + bias.to(dtype)
        group_bad = None
        if num_groups and routing.topk_groups < num_groups:
            keys, group_bad = limit_to_best_groups(
                keys, num_groups, routing.topk_groups, routing.group_score, ties_likely
            )
        # int32 ids straight from the selection, unless the bias's gather below needs int64.
        id_dtype = torch.int32 if bias is None else torch.int64
        values, ids, bad = select.top_k(keys, k, ties_likely=ties_likely, id_dtype=id_dtype)
        if group_bad is not None:
            bad = group_bad if bad is None else bad | group_bad
        # Without a bias the selected keys are the selected scores.
        weights = values if bias is None else scores.gather(1, ids)
        if routing.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + RENORM_EPS)
    if routing.scale != 1.0:
        weights = weights * routing.scale
    weights = weights.contiguous()  # the selection's values are a view
    ids = ids.int()  # no-op for int32 ids; .to(torch.int32) parses its arguments (+0.8 us)
    return weights, ids, bad


def limit_to_best_groups(
    keys: torch.Tensor, num_groups: int, topk_groups: int, group_score: str, ties_likely: bool = False
):
    """``keys (T, E)`` with every expert outside the ``topk_groups`` best of ``num_groups``
    contiguous groups set to -inf (equal group scores: the lower group first, as the reference),
    and the rows (a ``(T,)`` bool mask, or None) with a NaN or +inf group score, which the
    reference computes (it maps NaN keys to -inf before scoring the groups). ``ties_likely``: as
    :func:`moe_kernels.cpu.select.top_k`'s."""
    num_tokens, num_experts = keys.shape
    grouped = keys.view(num_tokens, num_groups, num_experts // num_groups)
    if group_score == "max":
        per_group = grouped.amax(-1)
    elif num_tokens * num_groups < TOP2_BY_MAXIMA_MIN_ROWS:
        per_group = grouped.topk(2, dim=-1).values.sum(-1)
    else:  # the two largest with multiplicity, by two vectorised maxima
        first = grouped.amax(-1, keepdim=True)
        at_first = grouped == first
        second = grouped.masked_fill(at_first, NEG_INF).amax(-1, keepdim=True)
        second = torch.where(at_first.sum(-1, keepdim=True) >= 2, first, second)
        per_group = (first + second).squeeze(-1)
    # A NaN key makes its group's score NaN here, where the reference scores the group without it:
    # the selection's finite_first check flags those rows (and +inf ones, as exact there).
    _, best, bad = select.top_k(per_group, topk_groups, finite_first=True, ties_likely=ties_likely)
    dropped = torch.ones((num_tokens, num_groups), dtype=torch.bool).scatter_(1, best, False)
    return grouped.masked_fill(dropped.unsqueeze(-1), NEG_INF).view(num_tokens, num_experts), bad


def softmax_topk_backward(
    grad_weights: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor, *, routing: RoutingConfig
) -> torch.Tensor:
    """:func:`moe_kernels.reference.routing.softmax_topk_backward` for ``(T, E)`` logits on the
    CPU: ``grad_weights (T, k)``, ``ids (T, k)`` int32 -> ``grad_logits (T, E)`` in logits'
    dtype, contiguous. The score gradient is non-zero at the ``k`` selected experts only, so the
    softmax's ``sum_j g_j s_j`` is a ``(T, k)`` sum."""
    score_func, scale = routing.score_func, routing.scale
    dtype = compute_dtype(logits.dtype)
    index = ids.long()
    if score_func == "softmax":
        scores = torch.softmax(logits, -1, dtype=dtype)
    else:
        scores = torch.sigmoid(logits.to(dtype))
    picked = scores.gather(1, index)
    grad = grad_weights.to(dtype)
    if scale != 1.0:
        grad = grad * scale
    if routing.renormalize:
        denom = picked.sum(dim=-1, keepdim=True) + RENORM_EPS
        grad = grad / denom - (grad * picked).sum(dim=-1, keepdim=True) / (denom * denom)
    if score_func == "softmax":
        # grad_logits = s * (g - sum_j g_j s_j), g non-zero at the selected experts only.
        weighted = grad * picked
        grad_logits = scores * weighted.sum(dim=-1, keepdim=True).neg_()
        grad_logits.scatter_add_(1, index, weighted)
    else:
        grad_logits = torch.zeros_like(scores).scatter_(1, index, grad * picked * (1.0 - picked))
    return grad_logits.to(logits.dtype)
