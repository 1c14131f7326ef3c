"""Every float64 oracle of the tests, written from the formulas of the ops' docstrings.

They share no code with ``moe_kernels.reference`` (vectorised PyTorch, the CPU path of every
op), so an error in one is not repeated in the other: the routing oracles are per-row Python
loops over floats, the others per-token or per-expert loops in float64 (or, for the ProbMoE law,
an enumeration and a leave-one-out DP, where the reference runs an adjoint recursion).
Non-finite values follow each op's documented contract (NaN and +-inf in the routing, kNN and
ProbMoE oracles).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter

import torch

NAN = float("nan")
INF = float("inf")

# The options of the routing and kNN oracles, with the defaults the ops' docstrings state. The
# oracles take them as keyword options (``**routing``, ``mixing=``), as the tests draw them.
ROUTING_DEFAULTS = dict(
    renormalize=False, score_func="softmax", num_groups=None, topk_groups=None, group_score="top2_sum", scale=1.0
)
MIXING_DEFAULTS = dict(weighting="similarity", temperature=0.1, min_confidence=0.0)


def with_defaults(options: dict, defaults: dict, oracle: str) -> dict:
    """``options`` over ``defaults``; an unknown name is a mistake in a test, so it raises rather
    than being ignored."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise TypeError(f"{oracle}: unknown options {unknown}, expected some of {sorted(defaults)}")
    return {**defaults, **options}


# ------------------------------------------------------------------------------------------------
# Routing: softmax_topk


def _sigmoid(x: float) -> float:
    """sigmoid(NaN) = NaN, sigmoid(+inf) = 1, sigmoid(-inf) = 0."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _softmax(row: list[float]) -> list[float]:
    """As ``torch.softmax``: a row holding NaN or +inf, or only -inf, is all NaN."""
    if any(math.isnan(x) or x == INF for x in row) or all(x == -INF for x in row):
        return [NAN] * len(row)
    top = max(row)
    exps = [math.exp(x - top) for x in row]
    total = sum(exps)
    return [e / total for e in exps]


def routing_keys_oracle(
    row: list[float],
    offsets: list[float],
    score_func: str,
    num_groups: int | None,
    topk_groups: int | None,
    group_score: str,
) -> tuple[list[float], list[float], list[float]]:
    """One row's gate ``scores``, selection ``keys`` (``scores + bias``, NaN -> -inf, experts of
    dropped groups -> -inf) and ``group_scores`` (empty without groups), as Python floats."""
    num_experts = len(row)
    scores = _softmax(row) if score_func == "softmax" else [_sigmoid(x) for x in row]
    keys = [s + b for s, b in zip(scores, offsets)]
    keys = [-INF if math.isnan(key) else key for key in keys]
    group_scores: list[float] = []
    if num_groups:
        size = num_experts // num_groups
        group_keys = [sorted(keys[g * size : (g + 1) * size], reverse=True) for g in range(num_groups)]
        group_scores = [ks[0] if group_score == "max" else ks[0] + ks[1] for ks in group_keys]
        group_scores = [-INF if math.isnan(s) else s for s in group_scores]
        ranked = sorted(range(num_groups), key=lambda g: (-group_scores[g], g))
        kept = set(ranked[:topk_groups])
        keys = [key if e // size in kept else -INF for e, key in enumerate(keys)]
    return scores, keys, group_scores


def softmax_topk_oracle(
    logits: torch.Tensor, k: int, *, bias: torch.Tensor | None = None, **routing
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate + top-k of ``(..., E)`` logits: ``(..., k)`` float64 weights and int32 ids. The k
    largest keys, equal keys lower id first (-inf keys too); ``w = s[ids]``, renormalised over
    the k (``+ 1e-20``) when asked, times ``scale``. ``routing``: keyword options as
    :data:`ROUTING_DEFAULTS` names them, ``bias (E,)`` the selection offsets."""
    options = with_defaults(routing, ROUTING_DEFAULTS, "softmax_topk_oracle")
    groups = (options["num_groups"], options["topk_groups"], options["group_score"])
    shape = (*logits.shape[:-1], k)
    rows = logits.double().reshape(-1, logits.shape[-1]).tolist()
    if not rows:
        return torch.empty(shape, dtype=torch.float64), torch.empty(shape, dtype=torch.int32)
    offsets = [0.0] * len(rows[0]) if bias is None else bias.double().tolist()
    all_weights, all_ids = [], []
    for row in rows:
        scores, keys, _ = routing_keys_oracle(row, offsets, options["score_func"], *groups)
        chosen = sorted(range(len(row)), key=lambda e: (-keys[e], e))[:k]
        weights = [scores[e] for e in chosen]
        if options["renormalize"]:
            total = sum(weights) + 1e-20
            weights = [w / total for w in weights]
        all_weights.append([w * options["scale"] for w in weights])
        all_ids.append(chosen)
    weights = torch.tensor(all_weights, dtype=torch.float64).reshape(shape)
    ids = torch.tensor(all_ids, dtype=torch.int32).reshape(shape)
    return weights, ids


# ------------------------------------------------------------------------------------------------
# kNN-MoE: knn_mix, knn_route, knn_route_assignments


def knn_confidence_oracle(sims: list[float], min_confidence: float) -> float:
    """``clamp(mean(sims), 0, 1)``, 0 for a NaN mean or one below ``min_confidence``."""
    mean = sum(sims) / len(sims)
    conf = 0.0 if math.isnan(mean) else min(max(mean, 0.0), 1.0)
    return 0.0 if conf < min_confidence else conf


def _neighbour_weights(sims: list[float], weighting: str, temperature: float) -> list[float]:
    if weighting == "similarity":
        total = sum(sims)
        return [s / total for s in sims]
    return _softmax([s / temperature for s in sims])


def knn_mix_oracle(
    router: torch.Tensor, neighbors: torch.Tensor, sims: torch.Tensor, **mixing
) -> tuple[torch.Tensor, torch.Tensor]:
    """``mixed (T, E)``, ``conf (T,)`` float64 of ``router (T, E)``, ``neighbors (T, n, E)`` and
    ``sims (T, n)``, per token: ``mixed = conf * sum_j w_j n_j + (1 - conf) * z`` where
    ``conf > 0``, else ``z`` itself (whatever the neighbours hold). ``mixing``: keyword options
    as :data:`MIXING_DEFAULTS` names them."""
    options = with_defaults(mixing, MIXING_DEFAULTS, "knn_mix_oracle")
    mixed, confs = [], []
    for z, values, s in zip(router.double(), neighbors.double(), sims.double().tolist()):
        conf = knn_confidence_oracle(s, options["min_confidence"])
        if conf > 0:
            w = _neighbour_weights(s, options["weighting"], options["temperature"])
            retrieved = sum(w[j] * values[j] for j in range(len(s)))
            mixed.append(conf * retrieved + (1 - conf) * z)
        else:
            mixed.append(z.clone())
        confs.append(conf)
    if not mixed:
        return router.double().clone(), torch.zeros(0, dtype=torch.float64)
    return torch.stack(mixed), torch.tensor(confs, dtype=torch.float64)


def knn_route_oracle(router, ids, sims, memory, k, *, bias=None, mixing=None, **routing):
    """``knn_route``: the mixed logits of the retrieved memory rows, then gate + top-k:
    ``(weights (T, k) float64, ids (T, k) int32, conf (T,) float64, mixed (T, E) float64)``."""
    mixed, conf = knn_mix_oracle(router, memory.double()[ids.long()], sims, **(mixing or {}))
    weights, chosen = softmax_topk_oracle(mixed, k, bias=bias, **routing)
    return weights, chosen, conf, mixed


def knn_route_assignments_oracle(router, ids, sims, memory, k, *, mixing=None, **routing):
    """Dense ``(T, E)`` float64 assignment ``(1 - conf) G(z) + conf sum_j w_j G(memory[ids_j])``
    with ``G`` the gate + top-k written as a dense vector, and ``conf (T,)``."""
    options = with_defaults(mixing or {}, MIXING_DEFAULTS, "knn_route_assignments_oracle")
    num_tokens, num_experts = router.shape
    dense = torch.zeros(num_tokens, num_experts, dtype=torch.float64)
    confs = []

    def gate(row):
        weights, experts = softmax_topk_oracle(row[None], k, **routing)
        out = torch.zeros(num_experts, dtype=torch.float64)
        out[experts[0].long()] = weights[0]
        return out

    for t in range(num_tokens):
        s = sims[t].double().tolist()
        conf = knn_confidence_oracle(s, options["min_confidence"])
        confs.append(conf)
        dense[t] = (1 - conf) * gate(router[t])
        if conf > 0:
            w = _neighbour_weights(s, options["weighting"], options["temperature"])
            for j, row_id in enumerate(ids[t].tolist()):
                dense[t] += conf * w[j] * gate(memory[row_id])
    return dense, torch.tensor(confs, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------
# ProbMoE: P(S) ∝ exp(sum_{i in S} r_i) over k_min <= |S| <= k


def subset_law_oracle(logits: torch.Tensor, k: int, k_min: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Brute-force ProbMoE law of one ``(E,)`` logit row in float64, by enumerating every subset
    with ``k_min <= |S| <= k``: ``(marginals (E,), log_z (), {subset tuple: probability})``."""
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


def _log_elementary(r: torch.Tensor, k: int, skip: torch.Tensor | None = None) -> torch.Tensor:
    """``log e_c`` for c = 0..k of the exponentiated logits ``r (..., E)`` (float64), leaving out
    expert ``i`` in row ``i`` of the second-to-last dim when ``skip`` (an ``(E, E)`` identity) is
    given: ``(..., k+1)``."""
    shape = (*r.shape[:-1], k + 1) if skip is None else (*r.shape[:-1], r.shape[-1], k + 1)
    table = torch.full(shape, -INF, dtype=torch.float64)
    table[..., 0] = 0.0
    for i in range(r.shape[-1]):
        term = r[..., i, None] if skip is None else torch.where(skip[:, i, None], -INF, r[..., None, i, None])
        shifted = torch.cat([torch.full_like(table[..., :1], -INF), table[..., :-1] + term], -1)
        table = torch.logaddexp(table, shifted)
    return table


def exact_k_marginals_oracle(logits: torch.Tensor, k: int, k_min: int) -> torch.Tensor:
    """``(T, E)`` float64 marginals by leave-one-out elementary symmetric polynomials:
    ``m_i = sum_{c in band} exp(r_i) e_{c-1}(r without i) / Z``. Rows holding NaN or +inf, or
    with fewer than ``k_min`` experts above -inf, are NaN (the documented contract)."""
    r = logits.double()
    num_tokens, num_experts = r.shape
    log_z = torch.logsumexp(_log_elementary(r, k)[:, k_min:], -1)  # (T,)
    without = _log_elementary(r, k, torch.eye(num_experts, dtype=torch.bool))  # (T, E, k+1)
    sizes = torch.arange(1, k + 1)
    in_band = (sizes >= max(k_min, 1))[None, None]
    terms = torch.where(in_band, without[..., :-1], -INF)  # e_{c-1} for c = 1..k
    marginals = torch.exp(r + torch.logsumexp(terms, -1) - log_z[:, None])
    marginals = torch.where(r == -INF, torch.zeros_like(marginals), marginals)
    invalid = torch.isnan(r).any(-1) | (r == INF).any(-1) | ((r > -INF).sum(-1) < k_min)
    return torch.where(invalid[:, None], NAN, marginals)


def band_mode_oracle(row: list[float], k: int, k_min: int) -> list[int]:
    """The most probable subset of the band for one row: the top ``c`` logits, ``c`` in
    ``[k_min, k]`` maximising their sum (the smaller ``c`` on a tie), largest logit first."""
    order = sorted(range(len(row)), key=lambda e: (-row[e], e))
    prefix = [0.0] + list(itertools.accumulate(row[e] for e in order))
    best = max(range(k_min, k + 1), key=lambda c: (prefix[c], -c))
    return order[:best]


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


def route_gradient_paths_oracle(logits, ids, upstream, k):
    """The two parts of ``probmoe_route``'s training weights' gradient (exact-k), by autograd in
    float64: the softmax path of the sampled experts and the covariance path ``Cov(z) @ (G *
    softmax(r))`` through :func:`log_partition_dp`; returns ``(softmax_path, cov_path, z)``."""
    z = torch.zeros_like(logits).scatter_(1, ids.long(), 1.0)
    g_full = torch.zeros_like(logits).scatter_(1, ids.long(), upstream)
    x = logits.clone().requires_grad_()
    probs = torch.softmax(x, -1)
    (softmax_path,) = torch.autograd.grad((probs * g_full * z).sum(), x)
    log_z = log_partition_dp(x, k, k)
    (m,) = torch.autograd.grad(log_z.sum(), x, create_graph=True)
    (cov_path,) = torch.autograd.grad((m * g_full * probs.detach()).sum(), x)
    return softmax_path, cov_path, z


def _logaddexp(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # torch.logaddexp's double backward is NaN here; any constant shift gives the same value and
    # derivatives, so shift by the detached max.
    shift = torch.maximum(x, y).detach()
    return shift + torch.log(torch.exp(x - shift) + torch.exp(y - shift))


# ------------------------------------------------------------------------------------------------
# Experts: grouped_mm, fused_experts, moe_align, expert_counts


def grouped_mm_oracle(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``(M, N)`` float64: rows ``offsets[g-1]:offsets[g]`` are ``a[rows] @ b[g]``, the rest 0."""
    out = torch.zeros(a.shape[0], b.shape[-1], dtype=torch.float64)
    start = 0
    for g, end in enumerate(offsets.tolist()):
        out[start:end] = a[start:end].double().cpu() @ b[g].double().cpu()
        start = end
    return out


def gathered_grouped_mm_oracle(a, b, offsets, grad, rows, scale, grad_dtype):
    """The gathering, row-scaling grouped GEMM launchers' results in float64: output row ``r`` of
    group ``g`` (rows before ``offsets[-1]``) is ``scale[r] * a[rows[r]] @ b[g]``, and ``grad_b[g]``
    sums ``outer(a[rows[r]], scale[r] * grad[r])`` over the group's rows, the scaled gradient row
    rounded to ``grad_dtype`` first (as the kernel does). Returns ``(out (M_out, N), grad_b)``."""
    ends = offsets.tolist()
    m_out = rows.shape[0]
    a64, b64, grad64, s64 = a.double().cpu(), b.double().cpu(), grad.double().cpu(), scale.double().cpu()
    out = torch.zeros(m_out, b.shape[2], dtype=torch.float64)
    grad_b = torch.zeros(b.shape, dtype=torch.float64)
    start = 0
    for g, end in enumerate(ends):
        for r in range(start, end):
            out[r] = s64[r] * (a64[rows[r]] @ b64[g])
            grad_b[g] += torch.outer(a64[rows[r]], (s64[r] * grad64[r]).to(grad_dtype).double())
        start = end
    return out, grad_b


def gated_activation_oracle(h: torch.Tensor, activation: str) -> torch.Tensor:
    """``act(h)`` of ``(R, 2I)`` pre-activations: gate rows then up rows (GPT-OSS: interleaved,
    clamped at 7, ``(up + 1) * gate * sigmoid(1.702 gate)``) -> ``(R, I)``."""
    if activation == "gpt_oss":
        gate, up = h[:, 0::2].clamp(max=7.0), h[:, 1::2].clamp(-7.0, 7.0)
        return (up + 1.0) * gate * torch.sigmoid(1.702 * gate)
    gate, up = h[:, : h.shape[1] // 2], h[:, h.shape[1] // 2 :]
    if activation == "silu":
        return gate * torch.sigmoid(gate) * up
    if activation == "gelu":
        return 0.5 * gate * (1.0 + torch.erf(gate / math.sqrt(2.0))) * up
    inner = math.sqrt(2.0 / math.pi) * (gate + 0.044715 * gate**3)
    return 0.5 * gate * (1.0 + torch.tanh(inner)) * up


def fused_experts_oracle(
    hidden, gate_up_proj, down_proj, weights, ids, activation="silu", gate_up_bias=None, down_bias=None
) -> torch.Tensor:
    """``(T, H)`` float64 by a loop over experts: ``out[t] = sum_j weights[t, j] * (down[e] @
    act(gate_up[e] @ hidden[t] + gate_up_bias[e]) + down_bias[e])`` over the slots ``e = ids[t, j]
    != -1``."""
    x = hidden.double().cpu()
    ids, weights = ids.long().cpu(), weights.double().cpu()
    out = torch.zeros(x.shape, dtype=torch.float64)
    for e in range(gate_up_proj.shape[0]):
        tokens, slots = (ids == e).nonzero(as_tuple=True)
        h = x[tokens] @ gate_up_proj[e].double().cpu().T
        if gate_up_bias is not None:
            h = h + gate_up_bias[e].double().cpu()
        y = gated_activation_oracle(h, activation) @ down_proj[e].double().cpu().T
        if down_bias is not None:
            y = y + down_bias[e].double().cpu()
        out.index_add_(0, tokens, weights[tokens, slots].unsqueeze(1) * y)
    return out


def expert_counts_oracle(ids: torch.Tensor, num_experts: int) -> list[int]:
    """Slots per expert, -1 not counted."""
    counted = Counter(ids.reshape(-1).tolist())
    return [counted[e] for e in range(num_experts)]


def moe_align_oracle(ids: torch.Tensor, num_experts: int) -> dict[str, list[int]]:
    """The slots ``t * k + j`` sorted by expert (empty slots, id -1, last as expert E), stable:
    ``order``, ``tokens``, ``experts``, ``positions`` (the inverse of order), ``counts``,
    ``offsets`` (their running sums), as lists."""
    k = ids.shape[1]
    keys = [num_experts if e < 0 else e for e in ids.reshape(-1).tolist()]
    order = sorted(range(len(keys)), key=lambda slot: (keys[slot], slot))
    positions = [0] * len(order)
    for position, slot in enumerate(order):
        positions[slot] = position
    counts = expert_counts_oracle(ids, num_experts)
    return dict(
        order=order,
        tokens=[slot // k for slot in order],
        experts=[keys[slot] for slot in order],
        positions=positions,
        counts=counts,
        offsets=list(itertools.accumulate(counts)),
    )
