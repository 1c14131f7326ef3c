"""Public kNN-MoE logit mixing op."""

from __future__ import annotations

import torch

from moe_kernels.config import KnnMixing
from moe_kernels.functional import _validate as check
from moe_kernels.ops.knn import KNN_MIX
from moe_kernels.utils import use_triton


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
    check.mix_args("knn_mix", router_logits, neighbor_sims, weighting, temperature, min_confidence)
    check.on_router_device(
        "knn_mix",
        "neighbor_logits",
        neighbor_logits,
        router_logits,
        dtypes=check.FLOAT_DTYPES,
        dims=3,
        shape="(T, n, E)",
    )
    num_tokens, num_experts = router_logits.shape
    check.shape_is(
        "knn_mix",
        "neighbor_logits",
        neighbor_logits,
        (num_tokens, neighbor_sims.shape[1], num_experts),
        lambda: f"(T, n, E) = ({num_tokens}, {neighbor_sims.shape[1]}, {num_experts})",
    )
    triton_path = use_triton(backend, router_logits.device, "knn_mix")
    check.not_float64_on_triton("knn_mix", "router_logits", router_logits, triton_path)
    mixing = KnnMixing.from_op_args(weighting, float(temperature), float(min_confidence))
    return KNN_MIX(router_logits, neighbor_logits, neighbor_sims, mixing, triton_path)
