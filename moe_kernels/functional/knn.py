"""Public kNN-MoE logit mixing op."""

from __future__ import annotations

import math

import torch

from moe_kernels.functional.routing import LOGIT_DTYPES
from moe_kernels.ops.knn import KnnMixFunction, knn_mix_op
from moe_kernels.utils import use_triton

WEIGHTINGS = ("similarity", "softmax")


def knn_mix(
    router_logits: torch.Tensor,
    neighbor_logits: torch.Tensor,
    neighbor_sims: torch.Tensor,
    *,
    weighting: str = "similarity",
    temperature: float = 0.1,
    min_confidence: float = 0.0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix a frozen router's logits with retrieved routing logits (kNN-MoE, logit space).

    Args:
        router_logits: ``(T, E)`` float32 / float16 / bfloat16 logits of the frozen router.
        neighbor_logits: ``(T, n, E)`` float logits of each token's ``n`` retrieved cases.
        neighbor_sims: ``(T, n)`` float similarities of those cases (cosine: at most 1).
        weighting: neighbour weights ``w``: ``"similarity"`` (``sims / sum(sims)``) or
            ``"softmax"`` (``softmax(sims / temperature)``, kNN-LM style).
        temperature: of the ``"softmax"`` weighting, > 0.
        min_confidence: confidences below this are set to 0 (hard fallback), in [0, 1].
        backend: ``"auto"``, ``"triton"`` or ``"torch"``, as for every op.

    Returns:
        ``mixed (T, E)`` float32 and ``conf (T,)`` float32 (float64 for float64 router logits
        with ``backend="torch"``), where per token::

            conf  = clamp(mean(sims), 0, 1), 0 if below min_confidence or NaN
            mixed = conf * sum_j w_j * neighbor_logits_j + (1 - conf) * router_logits

        With ``conf = 0`` (no relevant case, or a NaN similarity) ``mixed`` is bit-exactly the
        router's logits, whatever the neighbours hold.

    Gradients flow to ``router_logits`` and ``neighbor_logits`` (hence to a memory of logits
    they were gathered from); similarities come from a search and are treated as constants.
    Saved for backward: ``neighbor_sims`` only.
    """
    _check_args(router_logits, neighbor_logits, neighbor_sims, weighting, temperature, min_confidence)
    triton_path = use_triton(backend, router_logits.device, "knn_mix")
    if triton_path and router_logits.dtype == torch.float64:
        raise TypeError("knn_mix: backend='triton' takes float32/float16/bfloat16 router_logits, got torch.float64; "
                        "use backend='torch' for float64")
    mix = knn_mix_op if torch.compiler.is_compiling() else KnnMixFunction.apply
    return mix(router_logits, neighbor_logits, neighbor_sims, weighting, float(temperature),
               float(min_confidence), triton_path)


def _check_args(router_logits, neighbor_logits, neighbor_sims, weighting, temperature, min_confidence):
    for name, tensor, dims in (
        ("router_logits", router_logits, "(T, E)"),
        ("neighbor_logits", neighbor_logits, "(T, n, E)"),
        ("neighbor_sims", neighbor_sims, "(T, n)"),
    ):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"knn_mix: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype not in LOGIT_DTYPES:
            raise TypeError(f"knn_mix: {name} must be float32, float16 or bfloat16, got {tensor.dtype}")
        if tensor.dim() != dims.count(",") + 1:
            raise ValueError(f"knn_mix: {name} must have shape {dims}, got {tuple(tensor.shape)}")
        if tensor.device != router_logits.device:
            raise ValueError(f"knn_mix: {name} must be on router_logits' device {router_logits.device}, got {tensor.device}")
    num_tokens, num_experts = router_logits.shape
    if num_experts < 1:
        raise ValueError(f"knn_mix: router_logits must have E >= 1 experts, got shape {tuple(router_logits.shape)}")
    num_neighbors = neighbor_sims.shape[1] if neighbor_sims.dim() == 2 else 0
    if num_neighbors < 1 or tuple(neighbor_sims.shape) != (num_tokens, num_neighbors):
        raise ValueError(
            f"knn_mix: neighbor_sims must have shape (T, n) = ({num_tokens}, n) with n >= 1, got {tuple(neighbor_sims.shape)}"
        )
    if tuple(neighbor_logits.shape) != (num_tokens, num_neighbors, num_experts):
        raise ValueError(
            f"knn_mix: neighbor_logits must have shape (T, n, E) = ({num_tokens}, {num_neighbors}, {num_experts}), "
            f"got {tuple(neighbor_logits.shape)}"
        )
    if weighting not in WEIGHTINGS:
        raise ValueError(f"knn_mix: weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 < temperature < math.inf:
        raise ValueError(f"knn_mix: temperature must be a finite number > 0, got {temperature!r}")
    if not isinstance(min_confidence, (int, float)) or isinstance(min_confidence, bool) or not 0 <= min_confidence <= 1:
        raise ValueError(f"knn_mix: min_confidence must be a number in [0, 1], got {min_confidence!r}")
