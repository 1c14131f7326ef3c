"""The plain-PyTorch code each op replaces: the baselines of ``bench_cpu``, of the pytest-benchmark
groups (``benchmarks/test_cpu_benchmarks.py``) and ``bench_routing``'s ``torch_topk_chain``.

Each baseline computes the same result as the op on the inputs the benchmarks draw (tie-free
random floats; no NaN handling, no tie rule, int64 ids): what model code writes today.

- routing: the chains HF transformers' routers run: ``softmax | sigmoid (+ bias) -> topk ->
  renormalise -> scale`` (Mixtral / Qwen / OLMoE / DeepSeek without groups), ``topk -> softmax``
  (GPT-OSS; the same function as softmax -> topk -> renormalise), and DeepSeek-V3's group-limited
  chain (group scores, ``topk`` of groups, mask, ``topk``);
- kNN: gather the memory rows, mix (similarity weights, mean-similarity confidence), route;
- ProbMoE: the official code's DP (``log p`` / ``log q`` recursion with a ``-300`` sentinel,
  ``logaddexp`` as ``max + softplus(-|d|)``) with the marginals from
  ``autograd.grad(..., create_graph=True)`` on a zero probe, as ProbMoE's release computes
  them;
- experts: transformers' own experts modules (``OlmoeExperts`` / ``Qwen3MoeExperts``) with
  ``experts_implementation="eager"`` (the per-expert loop) and ``"grouped_mm"``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------------
# Routing


def topk_chain(logits, bias=None, *, k, renormalize=False, score_func="softmax", scale=1.0):
    """``softmax | sigmoid`` in float32 (+ bias) -> ``torch.topk`` -> renormalise -> scale."""
    scores = logits.float().softmax(dim=-1) if score_func == "softmax" else logits.float().sigmoid()
    keys = scores if bias is None else scores + bias
    values, ids = torch.topk(keys, k, dim=-1)
    weights = values if bias is None else scores.gather(-1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return (weights * scale if scale != 1.0 else weights), ids


def topk_softmax_chain(logits, bias=None, *, k, scale=1.0):
    """GPT-OSS: ``torch.topk`` on the logits, softmax over the k values (renormalised top-k)."""
    values, ids = torch.topk(logits, k, dim=-1)
    weights = torch.softmax(values.float(), dim=-1)
    return (weights * scale if scale != 1.0 else weights), ids


def group_limited_chain(logits, bias=None, *, k, num_groups, topk_groups, group_score, score_func, renormalize, scale):
    """HF DeepSeek-V2/V3 routing: group scores (top-2 sum or max), the best groups by
    ``torch.topk``, the others masked with -inf, ``torch.topk`` of the keys, unbiased weights."""
    scores = logits.float().softmax(dim=-1) if score_func == "softmax" else logits.float().sigmoid()
    keys = scores if bias is None else scores + bias
    num_tokens = keys.shape[0]
    grouped = keys.view(num_tokens, num_groups, -1)
    if group_score == "max":
        per_group = grouped.amax(dim=-1)
    else:
        per_group = grouped.topk(2, dim=-1)[0].sum(dim=-1)
    group_ids = torch.topk(per_group, topk_groups, dim=-1)[1]
    group_mask = torch.zeros_like(per_group).scatter_(1, group_ids, 1)
    score_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(num_tokens, -1)
    masked = keys.masked_fill(~score_mask.bool(), float("-inf"))
    ids = torch.topk(masked, k, dim=-1)[1]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scale, ids


# The RoutingConfig fields group_limited_chain takes (beside k), under the same names.
GROUP_CHAIN_OPTIONS = ("num_groups", "topk_groups", "group_score", "score_func", "renormalize", "scale")


def routing_chains(shape) -> dict:
    """name -> chain ``(logits, bias) -> (weights, ids)`` computing ``shape``'s routing."""
    routing, k = shape.routing, shape.k
    if routing.num_groups and routing.topk_groups < routing.num_groups:
        group_options = {name: getattr(routing, name) for name in GROUP_CHAIN_OPTIONS}
        return {"hf_group_chain": lambda x, b: group_limited_chain(x, b, k=k, **group_options)}
    options = dict(k=k, renormalize=routing.renormalize, score_func=routing.score_func, scale=routing.scale)
    chains = {"hf_chain": lambda x, b: topk_chain(x, b, **options)}
    if routing.renormalize and routing.score_func == "softmax" and not shape.has_bias:
        chains["topk_softmax_chain"] = lambda x, b: topk_softmax_chain(x, b, k=k, scale=routing.scale)
    return chains


# ------------------------------------------------------------------------------------------------
# kNN


def knn_mix_chain(router_logits, neighbor_logits, neighbor_sims):
    """Similarity weights, mean-similarity confidence, one mixed logit tensor."""
    weights = neighbor_sims / neighbor_sims.sum(dim=-1, keepdim=True)
    conf = neighbor_sims.mean(dim=-1, keepdim=True).clamp(0.0, 1.0)
    retrieved = (weights.unsqueeze(-1) * neighbor_logits).sum(dim=1)
    return conf * retrieved + (1.0 - conf) * router_logits, conf.squeeze(-1)


def knn_route_chain(router_logits, neighbor_ids, neighbor_sims, memory_logits, route):
    """Gather the memory rows, :func:`knn_mix_chain`, then ``route`` (a routing chain)."""
    mixed, conf = knn_mix_chain(router_logits, memory_logits[neighbor_ids], neighbor_sims)
    weights, ids = route(mixed, None)
    return weights, ids, conf


# ------------------------------------------------------------------------------------------------
# ProbMoE

PROBMOE_NEG_INF = -300.0


def _official_logaddexp(a, b):
    return torch.maximum(a, b) + F.softplus(-(a - b).abs())


def probmoe_autograd_marginals(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Exact-k marginals ``(T, E)`` as ProbMoE's release computes them: the DP over ``log p`` /
    ``log q`` (column ``j + 1`` = count ``j``, a ``-300`` pad column), ``log P(|S| = k)``, and its
    gradient with respect to a zero probe added to ``log p``, with ``create_graph=True`` so that
    the marginals are differentiable (the backward is autograd's double backward)."""
    with torch.enable_grad():
        log_p = torch.clamp(F.logsigmoid(logits), max=-1e-7)
        log_q = F.logsigmoid(-logits)
        probe = torch.zeros_like(log_p, requires_grad=True)
        log_p = log_p + probe
        num_tokens, num_experts = logits.shape
        alpha = torch.full((num_tokens, k + 2), PROBMOE_NEG_INF, dtype=logits.dtype)
        alpha[:, 1] = 0.0
        pad = alpha[:, :1]
        for i in range(num_experts):
            grown = _official_logaddexp(alpha[:, 1:] + log_q[:, i : i + 1], alpha[:, :-1] + log_p[:, i : i + 1])
            alpha = torch.cat([pad, grown], dim=1)
        (marginals,) = torch.autograd.grad(alpha[:, k + 1].sum(), probe, create_graph=True)
    return marginals


# ------------------------------------------------------------------------------------------------
# Experts

EXPERT_FAMILIES = {"OLMoE-like": "olmoe", "Qwen3-like": "qwen3_moe"}


def hf_experts_module(family: str, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, implementation: str):
    """transformers' experts module of ``family`` (``"olmoe"`` or ``"qwen3_moe"``) holding the
    given ``(E, 2I, H)`` / ``(E, H, I)`` weights as its parameters (shared, not copied), running
    ``implementation`` (``"eager"``: the per-expert loop; ``"grouped_mm"``)."""
    num_experts, width, hidden = gate_up_proj.shape
    if family == "olmoe":
        from transformers.models.olmoe.modeling_olmoe import OlmoeConfig, OlmoeExperts

        config = OlmoeConfig(hidden_size=hidden, intermediate_size=width // 2, num_experts=num_experts)
        module = OlmoeExperts(config)
    else:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeConfig, Qwen3MoeExperts

        config = Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=width // 2, num_experts=num_experts)
        module = Qwen3MoeExperts(config)
    config._experts_implementation = implementation
    module.gate_up_proj = torch.nn.Parameter(gate_up_proj, requires_grad=gate_up_proj.requires_grad)
    module.down_proj = torch.nn.Parameter(down_proj, requires_grad=down_proj.requires_grad)
    return module
