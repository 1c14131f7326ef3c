"""Public gate + top-k routing op."""

from __future__ import annotations

import torch

from moe_kernels.config import RENORM_EPS, RoutingConfig
from moe_kernels.functional import _checks as check
from moe_kernels.ops.routing import SOFTMAX_TOPK
from moe_kernels.utils import compute_dtype


def softmax_topk(
    logits: torch.Tensor,
    k: int,
    *,
    routing: RoutingConfig | None = None,
    bias: torch.Tensor | None = None,
    score_func: str | None = None,
    renormalize: bool | None = None,
    num_groups: int | None = None,
    topk_groups: int | None = None,
    group_score: str | None = None,
    scale: float | None = None,
    ids: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused gate scores + top-k expert selection (one kernel per direction).

    Args:
        logits: ``(..., E)`` float32 / float16 / bfloat16 router logits, any strides; 1 <= E.
            float64 is accepted by ``backend="torch"`` (computed in float64, for gradcheck).
        k: experts per token (an int, a numpy integer or a 0-d integer tensor), ``1 <= k <= E``
            (with groups: at most
            ``topk_groups * E // num_groups``, the experts left eligible).
        routing: a :class:`~moe_kernels.RoutingConfig` (score function, renormalisation, group
            limit, scale); default ``RoutingConfig()`` (softmax -> top-k).
        bias: ``(E,)`` float32 selection-only bias (DeepSeek-V3 ``e_score_correction_bias``, the
            Counterfactual Routing prior): added to the scores to rank experts, never to weights.
        score_func, renormalize, num_groups, topk_groups, group_score, scale: the fields of
            :class:`~moe_kernels.RoutingConfig` as keywords (sugar: each one given overrides
            ``routing``'s; None keeps it).
        ids: ``(..., k)`` int32 / int64 expert ids in ``[-1, E)`` to take instead of selecting
            (routing replay, :mod:`moe_kernels.replay`): the weights are the formula below for
            these ids (``-1`` slots weigh 0), computed in PyTorch ops on any device, no host
            sync for CUDA tensors; ``bias`` and the group limit, which only select, play no part.
        backend: ``"auto"`` (Triton for CUDA tensors, the PyTorch path otherwise: the fast CPU
            path for CPU tensors),
            ``"triton"`` (CPU tensors need ``TRITON_INTERPRET=1``) or ``"torch"``.

    Returns:
        ``weights (..., k)`` float32 and ``ids (..., k)`` int32, leading dims kept, ordered by
        selection key, descending; equal keys put the lower expert id first.

    Semantics, per token::

        s      = softmax(logits) | sigmoid(logits)          # float32
        key    = s + bias                                    # NaN keys become -inf
        groups : key of experts outside the topk_groups best groups := -inf
        ids    = the k largest keys (ties: lower id first)
        w      = s[ids];  w /= sum(w) + 1e-20 if renormalize;  weights = w * scale

    Routing styles by the names vLLM / SGLang / FlashInfer use (``RoutingMethodType``), each a
    :class:`~moe_kernels.RoutingConfig` preset (the keyword options spell the same):

    ==========================================  ===============================================
    Default (softmax -> top-k; OLMoE, Qwen1.5)   ``softmax_topk(l, k)``
    Renormalize (top-k -> softmax; Mixtral,      ``softmax_topk(l, k, routing=RoutingConfig
    Qwen3, GPT-OSS) and RenormalizeNaive         .renormalize())`` (the same function)
    DeepSeekV3 (noaux_tc, sigmoid + bias +       ``softmax_topk(l, 8, routing=RoutingConfig
    group top2_sum, renormalised, x2.5)          .deepseek_v3(), bias=b)``
    DeepSeek-V2 group-limited greedy             ``softmax_topk(l, 6, routing=RoutingConfig
    (softmax + group max, x16)                   .deepseek_v2())``
    Llama4 / SigmoidRenorm                       ``RoutingConfig.llama4()`` (k=1) /
                                                 ``RoutingConfig.sigmoid_renorm()``
    ==========================================  ===============================================

    Group masking uses -inf, as HF transformers' DeepSeek-V3 does from 5.12 on; the original
    DeepSeek code and transformers 5.0 used ``masked_fill(..., 0.0)``, with which, given a
    negative bias, an eligible key can be below 0 and an expert of a dropped group be picked.
    Here an expert of a dropped group is never chosen while an eligible one remains.

    Non-finite rows never yield an out-of-range or repeated id: NaN keys rank as -inf, so they are
    picked last, lowest id first. Their weights are what the formula gives: softmax rows holding
    a NaN or +inf logit (or only -inf) have NaN weights, as ``torch.softmax`` does; with sigmoid
    only the NaN experts' own weights are NaN (and all k after renormalisation).

    Gradient: ``weights`` is differentiable with respect to ``logits`` (a fused backward
    kernel); the bias gets no gradient and ``ids`` is not differentiable. Saved for backward:
    ``logits`` (no copy) and ``ids``.
    """
    k = check.count("softmax_topk", "k", k)
    options = (score_func, renormalize, num_groups, topk_groups, group_score, scale)
    routing, triton_path = check.routing_call("softmax_topk", logits, k, bias, routing, options, backend)
    if ids is not None:
        return _weights_of(logits, k, ids, routing)
    flat = logits.dim() == 2  # the common case: no reshape in or out (each costs a dispatch)
    rows = logits if flat else logits.reshape(-1, logits.shape[-1])
    weights, ids = SOFTMAX_TOPK(rows, k, bias, routing, triton_path)
    if flat:
        return weights, ids
    lead = logits.shape[:-1]
    return weights.reshape(*lead, k), ids.reshape(*lead, k)


def _weights_of(logits: torch.Tensor, k: int, ids: torch.Tensor, routing: RoutingConfig):
    """``softmax_topk``'s ``(weights, ids int32)`` for given ``ids (..., k)``, by the formula of
    its docstring (scores in the compute dtype, the kernels' sigmoid ``1 / (1 + exp(-x))``),
    differentiable with respect to ``logits`` by autograd."""
    op = "softmax_topk"
    check.given_ids(op, ids, logits, k)
    x = logits.to(compute_dtype(logits.dtype))
    scores = torch.softmax(x, dim=-1) if routing.score_func == "softmax" else 1.0 / (1.0 + torch.exp(-x))
    weights = scores.gather(-1, ids.long().clamp_min(0))
    weights = torch.where(ids >= 0, weights, torch.zeros_like(weights))
    if routing.renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + RENORM_EPS)
    if routing.scale != 1.0:
        weights = weights * routing.scale
    return weights, ids.to(torch.int32)
