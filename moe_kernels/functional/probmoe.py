"""Public ProbMoE ops: exact-k / dynamic-k marginals, exact sampling, and the router built on
them (paper: ProbMoE; math in the reference module ``moe_kernels.reference.probmoe``)."""

from __future__ import annotations

import torch

from moe_kernels.config import RENORM_EPS, is_int
from moe_kernels.functional import _checks as check
from moe_kernels.functional.routing import softmax_topk
from moe_kernels.ops.probmoe import EXACT_K, MAX_TRITON_K
from moe_kernels.utils import compute_dtype, use_triton

_LAW = """
    The law, per token with logits ``r``: every expert is an independent Bernoulli with
    ``p_i = sigmoid(r_i)``, conditioned on ``k_min <= |S| <= k`` (exact-k: ``k_min = k``), so
    ``P(S) ∝ exp(sum_{i in S} r_i)`` (conditional Poisson; not Gumbel-top-k). Exact-k is
    invariant to a constant shift of the logits; the band is not (``sigmoid`` pins the scale).

    Numerics: a log-space DP over experts in float32 (float64 for float64 logits with
    ``backend="torch"``), on logits shifted by their row max; log space because the elementary
    symmetric polynomials of one row span far more than float32's range for logits in
    [-80, 80]. Error against float64 grows about linearly with E (measured ~2e-5 on marginals at
    E = 512, k = 32, logits ~ N(0, 2)). Logits must be finite or -inf (an excluded expert); a
    row holding NaN or +inf, or with fewer than ``k_min`` experts above -inf, has NaN marginals
    and samples no expert (ids all -1).
"""


def exact_k_marginals(logits: torch.Tensor, k: int, *, k_min: int | None = None, backend: str = "auto") -> torch.Tensor:
    """Exact inclusion marginals ``m_i = P(i in S)`` of the ProbMoE routing law.

    Args:
        logits: ``(..., E)`` float32 / float16 / bfloat16 router logits (float64 with
            ``backend="torch"``).
        k: subset size (exact-k), or the band's upper end, ``1 <= k <= E``.
        k_min: ``None`` for exact-k, else the band's lower end, ``0 <= k_min <= k``.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``, as for every op.

    Returns:
        ``(..., E)`` float32 (float64 for float64 logits), summing to k per token (exact-k).
        Differentiable: the gradient is ``Cov(z) @ grad`` (``dm/dr`` is the law's covariance),
        by a fused dual-number kernel, O(E k) per token. Saved for backward: ``logits``.
    """
    marginals, _ = _forward(logits, k, k_min, None, False, backend, "exact_k_marginals")
    return marginals


exact_k_marginals.__doc__ += _LAW


def exact_k_sample(
    logits: torch.Tensor, k: int, *, k_min: int | None = None, seed: int | None = None, backend: str = "auto"
) -> torch.Tensor:
    """One exact sample of the ProbMoE routing law per token.

    Args:
        logits, k, k_min, backend: as for :func:`exact_k_marginals`.
        seed: ``None`` draws a seed from torch's random generator of the logits' device (so
            ``torch.manual_seed`` makes runs reproducible, and each call draws afresh); an int
            makes the draw reproducible on a given device and backend (the Triton kernels and the
            reference use different random streams).

    Returns:
        ``ids (..., k)`` int32: the sampled experts in increasing id order; with a band, the
        slots after the sampled size hold ``-1``. Not differentiable.
    """
    _, ids = _forward(logits, k, k_min, seed, True, backend, "exact_k_sample")
    return ids


exact_k_sample.__doc__ += _LAW


def probmoe_route(
    logits: torch.Tensor,
    k: int,
    *,
    k_min: int | None = None,
    renormalize: bool = False,
    training: bool = True,
    seed: int | None = None,
    ids: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """ProbMoE routing: sample in training, most probable subset in inference.

    Args:
        logits, k, k_min, seed, backend: as for :func:`exact_k_sample`.
        renormalize: divide the weights by their sum over the token's selected experts.
        training: True samples ``S`` exactly; False takes the most probable subset: the top k
            (exact-k), or with a band the top ``c*`` where ``c*`` is the number of positive
            logits clamped to ``[k_min, k]``.
        ids: ``(..., k)`` int32 / int64 expert ids in ``[-1, E)`` to take instead of sampling
            or selecting (routing replay, :mod:`moe_kernels.replay`); the weights are those of
            the mode for these ids (training: the straight-through weights below, so the router
            still gets the marginals' gradient; inference: ``softmax(r)[ids]``), ``-1`` slots 0.

    Returns:
        ``weights (..., k)`` float32 (float64 for float64 logits) and ``ids (..., k)`` int32,
        ``-1`` with weight 0 in empty slots (understood by ``fused_experts``). Training: ``ids``
        in increasing id order, ``weights = softmax(r)[ids] * g`` with the straight-through mask
        ``g`` (value 1, gradient that of the marginals ``m[ids]``), so the router gets the softmax
        gradient of the sampled experts plus ``Cov(z) @ (grad ⊙ softmax(r))``, which also reaches
        unselected experts. Inference: ``softmax_topk``'s order (descending), ``softmax(r)``
        weights.
    """
    check.boolean("probmoe_route", "training", training)
    check.boolean("probmoe_route", "renormalize", renormalize)
    if ids is not None:
        return _weights_of(logits, k, k_min, ids, renormalize, training, backend)
    if training:
        marginals, ids = _forward(logits, k, k_min, seed, True, backend, "probmoe_route")
        weights = _straight_through_weights(logits, marginals, ids, renormalize)
        return weights, ids
    k, k_min = _check_args(logits, k, k_min, seed, "probmoe_route")
    if k_min is None or k_min == k:
        weights, ids = softmax_topk(logits, k, renormalize=renormalize, backend=backend)
        return _no_expert_where_undefined(logits, weights, ids, k)
    weights, ids = softmax_topk(logits, k, backend=backend)
    size = _band_map_size(logits, k, k_min)
    keep = torch.arange(k, device=ids.device) < size[..., None]
    ids = torch.where(keep, ids, -1)
    weights = torch.where(keep, weights, 0.0)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(RENORM_EPS)
    return _no_expert_where_undefined(logits, weights, ids, k_min)


def _no_expert_where_undefined(logits, weights, ids, need: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The law's contract in inference as in training: a row whose law is undefined (a NaN or
    +inf logit, which the softmax turns into NaN weights, or fewer than ``need`` experts above
    -inf) selects no expert: ids -1, weights 0."""
    undefined = weights.isnan().any(-1) | ((logits > float("-inf")).sum(-1) < need)
    undefined = undefined[..., None]
    return torch.where(undefined, 0.0, weights), torch.where(undefined, -1, ids)


probmoe_route.__doc__ += _LAW


def _weights_of(logits, k, k_min, ids, renormalize, training, backend) -> tuple[torch.Tensor, torch.Tensor]:
    """``probmoe_route``'s ``(weights, ids int32)`` for given ``ids (..., k)``."""
    op = "probmoe_route"
    k, k_min = _check_args(logits, k, k_min, None, op)
    check.given_ids(op, ids, logits, k)
    if training:
        marginals = exact_k_marginals(logits, k, k_min=k_min, backend=backend)
    else:  # the mode's weights have no marginal factor: a constant 1 keeps one formula
        marginals = torch.ones_like(logits, dtype=compute_dtype(logits.dtype))
    return _straight_through_weights(logits, marginals, ids, renormalize), ids.to(torch.int32)


def _forward(logits, k, k_min, seed, sample, backend, op_name):
    """Validate, dispatch and run the ``exact_k`` op on ``(T, E)`` rows; returns ``marginals``
    and ``ids`` with the leading dims restored."""
    k, k_min = _check_args(logits, k, k_min, seed, op_name)
    triton_path = use_triton(backend, logits.device, op_name)
    check.not_float64_on_triton(op_name, "logits", logits, triton_path)
    if triton_path and k > MAX_TRITON_K:
        raise ValueError(f"{op_name}: backend='triton' takes k <= {MAX_TRITON_K}, got k={k}")
    num_experts = logits.shape[-1]
    flat = logits.dim() == 2  # the common case: no reshape in or out (each costs a dispatch)
    seed_tensor = _seed_tensor(seed, logits.device) if sample else _unused_seed(logits.device)
    marginals, _, ids = EXACT_K(
        logits if flat else logits.reshape(-1, num_experts),
        k,
        k if k_min is None else k_min,
        seed_tensor,
        sample,
        triton_path,
    )
    if flat:
        return marginals, ids
    lead = logits.shape[:-1]
    return marginals.reshape(*lead, num_experts), ids.reshape(*lead, ids.shape[-1])


def _seed_tensor(seed, device) -> torch.Tensor:
    """``(1,)`` int64 seed on ``device``, made without a host sync (a fill, not a copy)."""
    if seed is None:
        return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)
    return torch.full((1,), seed, dtype=torch.int64, device=device)


_UNUSED_SEEDS: dict[torch.device, torch.Tensor] = {}


def _unused_seed(device) -> torch.Tensor:
    """The seed argument of a call that samples nothing (never read): one cached ``(1,)`` tensor
    per device instead of a fresh random draw per call. Made afresh under ``torch.compile``."""
    if torch.compiler.is_compiling():
        return torch.zeros((1,), dtype=torch.int64, device=device)
    seed = _UNUSED_SEEDS.get(device)
    if seed is None:
        seed = _UNUSED_SEEDS[device] = torch.zeros((1,), dtype=torch.int64, device=device)
    return seed


def _check_args(logits, k, k_min, seed, op_name) -> tuple[int, int | None]:
    """Check the arguments; returns ``(k, k_min)`` as Python ints (integer-like accepted)."""
    k = check.count(op_name, "k", k)
    k_min = k_min if k_min is None else check.count(op_name, "k_min", k_min)
    check.tensor(op_name, "logits", logits, dtypes=check.FLOAT_DTYPES)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{op_name}: logits must have shape (..., E) with E >= 1, got {tuple(logits.shape)}")
    num_experts = logits.shape[-1]
    if not is_int(k) or not 1 <= k <= num_experts:
        raise ValueError(f"{op_name}: k must be an int in [1, E={num_experts}], got {k!r}")
    if k_min is not None and (not is_int(k_min) or not 0 <= k_min <= k):
        raise ValueError(f"{op_name}: k_min must be None or an int in [0, k={k}], got {k_min!r}")
    if seed is not None and (not is_int(seed) or not 0 <= seed < 2**63):
        raise ValueError(f"{op_name}: seed must be None or an int in [0, 2**63), got {seed!r}")
    return k, k_min


def _band_map_size(logits: torch.Tensor, k: int, k_min: int) -> torch.Tensor:
    """Size of the most probable subset in the band, ``(T,)`` int64: ``argmax_c`` of the sum of
    the c largest logits over ``c in [k_min, k]``, i.e. the number of positive logits clamped to
    the band (ties: the smaller size)."""
    positive = (logits.to(compute_dtype(logits.dtype)) > 0).sum(-1)
    return positive.clamp(k_min, k)


def _straight_through_weights(
    logits: torch.Tensor, marginals: torch.Tensor, ids: torch.Tensor, renormalize: bool
) -> torch.Tensor:
    """ProbMoE training weights of the sampled slots, ``(T, k)`` float32 (float64 for float64
    logits): ``softmax(r)_j * g_j`` with the straight-through mask ``g = z + m - stopgrad(m)``
    (value 1 on a sampled expert, gradient that of ``m_j``), 0 on ``-1`` slots."""
    probs = torch.softmax(logits.to(compute_dtype(logits.dtype)), dim=-1)
    valid = ids >= 0
    slots = ids.long().clamp(min=0)
    m = marginals.gather(-1, slots)
    weights = probs.gather(-1, slots) * (1.0 + (m - m.detach()))
    weights = torch.where(valid, weights, torch.zeros_like(weights))
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(RENORM_EPS)
    return weights
