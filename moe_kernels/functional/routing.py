"""Public gate + top-k routing op."""

from __future__ import annotations

import math

import torch

from moe_kernels.ops.routing import MAX_TRITON_EXPERTS, MAX_TRITON_GROUPS, SoftmaxTopkFunction, softmax_topk_op
from moe_kernels.utils import use_triton

LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SCORE_FUNCS = ("softmax", "sigmoid")
GROUP_SCORES = ("top2_sum", "max")


def softmax_topk(
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
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused gate scores + top-k expert selection (one kernel per direction).

    Args:
        logits: ``(..., E)`` float32 / float16 / bfloat16 router logits, any strides; 1 <= E.
            float64 is accepted by ``backend="torch"`` (computed in float64, for gradcheck).
        k: experts per token, ``1 <= k <= E`` (with groups: at most
            ``topk_groups * E // num_groups``, the experts left eligible).
        renormalize: divide the k weights by their sum (+1e-20).
        score_func: ``"softmax"`` or ``"sigmoid"``, computed in float32.
        bias: ``(E,)`` float32 selection-only bias (DeepSeek-V3 ``e_score_correction_bias``, the
            Counterfactual Routing prior): added to the scores to rank experts, never to weights.
        num_groups: split the experts into this many contiguous groups (must divide E) ...
        topk_groups: ... and keep only the best ``topk_groups`` of them eligible.
        group_score: a group's score: ``"top2_sum"`` (sum of its two largest keys, DeepSeek-V3)
            or ``"max"`` (its largest key, DeepSeek-V2).
        scale: multiplies the final weights (DeepSeek's ``routed_scaling_factor``).
        backend: ``"auto"`` (Triton for CUDA tensors, the PyTorch reference otherwise),
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

    Routing styles by the names vLLM / SGLang / FlashInfer use (``RoutingMethodType``):

    ==========================================  ===============================================
    Default (softmax -> top-k; OLMoE, Qwen1.5)   ``softmax_topk(l, k)``
    Renormalize (top-k -> softmax; Mixtral,      ``softmax_topk(l, k, renormalize=True)``
    Qwen3, GPT-OSS) and RenormalizeNaive         (the two are the same function)
    DeepSeekV3 (noaux_tc, sigmoid + bias +       ``softmax_topk(l, 8, score_func="sigmoid",
    group top2_sum)                              bias=b, num_groups=8, topk_groups=4,
                                                 renormalize=True, scale=2.5)``
    DeepSeek-V2 group-limited greedy             ``softmax_topk(l, 6, num_groups=8,
    (softmax + group max)                        topk_groups=3, group_score="max", scale=16.0)``
    Llama4 / SigmoidRenorm                       ``score_func="sigmoid"`` (Llama4: k=1), with
                                                 ``renormalize=True`` for SigmoidRenorm
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
    _check_args(logits, k, renormalize, score_func, bias, num_groups, topk_groups, group_score, scale)
    triton_path = use_triton(backend, logits.device, "softmax_topk")
    num_experts = logits.shape[-1]
    if triton_path:
        _check_triton_limits(logits, num_experts, num_groups)
    flat = logits.reshape(-1, num_experts)
    # torch.compile traces the registered op (fake kernel, opaque to graph breaks); eager calls
    # skip the dispatcher's per-call cost through the equivalent autograd.Function.
    route = softmax_topk_op if torch.compiler.is_compiling() else SoftmaxTopkFunction.apply
    weights, ids = route(
        flat,
        k,
        renormalize,
        score_func,
        bias,
        num_groups or 0,
        topk_groups or 0,
        group_score,
        float(scale),
        triton_path,
    )
    lead = logits.shape[:-1]
    return weights.reshape(*lead, k), ids.reshape(*lead, k)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_args(logits, k, renormalize, score_func, bias, num_groups, topk_groups, group_score, scale):
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"softmax_topk: logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in LOGIT_DTYPES:
        raise TypeError(
            f"softmax_topk: logits must be float32, float16 or bfloat16 (float64 for the torch "
            f"backend), got {logits.dtype}"
        )
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"softmax_topk: logits must have shape (..., E) with E >= 1, got {tuple(logits.shape)}")
    num_experts = logits.shape[-1]
    if not isinstance(renormalize, bool):
        raise TypeError(f"softmax_topk: renormalize must be a bool, got {type(renormalize).__name__}")
    if score_func not in SCORE_FUNCS:
        raise ValueError(f"softmax_topk: score_func must be one of {SCORE_FUNCS}, got {score_func!r}")
    if group_score not in GROUP_SCORES:
        raise ValueError(f"softmax_topk: group_score must be one of {GROUP_SCORES}, got {group_score!r}")
    # ``abs(scale) < inf`` rather than math.isfinite: it also holds for the symbolic floats
    # torch.compile(dynamic=True) passes, and is False for NaN.
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not abs(scale) < math.inf:
        raise ValueError(f"softmax_topk: scale must be a finite number, got {scale!r}")
    if bias is not None:
        _check_bias(bias, logits)
    eligible = num_experts
    if num_groups is None:
        if topk_groups is not None:
            raise ValueError(f"softmax_topk: topk_groups={topk_groups} needs num_groups, got num_groups=None")
    else:
        if not _is_int(num_groups) or not 1 <= num_groups <= num_experts or num_experts % num_groups:
            raise ValueError(
                f"softmax_topk: num_groups must be a positive int dividing E={num_experts}, got {num_groups!r}"
            )
        if not _is_int(topk_groups) or not 1 <= topk_groups <= num_groups:
            raise ValueError(
                f"softmax_topk: topk_groups must be an int in [1, num_groups={num_groups}], got {topk_groups!r}"
            )
        group_size = num_experts // num_groups
        if group_score == "top2_sum" and group_size < 2:
            raise ValueError(
                f"softmax_topk: group_score='top2_sum' needs at least 2 experts per group, got "
                f"E={num_experts} / num_groups={num_groups} = {group_size}; use group_score='max'"
            )
        eligible = topk_groups * group_size
    if not _is_int(k) or not 1 <= k <= eligible:
        where = f"E={num_experts}" if num_groups is None else f"the {eligible} experts of the kept groups"
        raise ValueError(f"softmax_topk: k must be an int in [1, {eligible}] ({where}), got {k!r}")


def _check_bias(bias, logits):
    num_experts = logits.shape[-1]
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"softmax_topk: bias must be a torch.Tensor or None, got {type(bias).__name__}")
    allowed = (torch.float32, torch.float64) if logits.dtype == torch.float64 else (torch.float32,)
    if bias.dtype not in allowed:
        raise TypeError(f"softmax_topk: bias must be float32, got {bias.dtype}")
    if tuple(bias.shape) != (num_experts,):
        raise ValueError(f"softmax_topk: bias must have shape (E,) = ({num_experts},), got {tuple(bias.shape)}")
    if bias.device != logits.device:
        raise ValueError(f"softmax_topk: bias must be on logits' device {logits.device}, got {bias.device}")


def _check_triton_limits(logits, num_experts, num_groups):
    if logits.dtype == torch.float64:
        raise TypeError("softmax_topk: backend='triton' takes float32/float16/bfloat16 logits, got torch.float64; "
                        "use backend='torch' for float64")
    if num_experts > MAX_TRITON_EXPERTS:
        raise ValueError(f"softmax_topk: backend='triton' takes E <= {MAX_TRITON_EXPERTS}, got E={num_experts}")
    if num_groups is not None and num_groups > MAX_TRITON_GROUPS:
        raise ValueError(
            f"softmax_topk: backend='triton' takes num_groups <= {MAX_TRITON_GROUPS}, got {num_groups}"
        )
