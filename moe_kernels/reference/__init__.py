"""Pure-PyTorch references, one module per op family.

They are the CPU fallback of every op, the oracles of the tests and the eager baselines of the
benchmarks: all three import them from here, so there is exactly one definition of each op.
"""

from moe_kernels.reference.experts import (
    ACTIVATIONS,
    expert_counts,
    fused_experts,
    fused_experts_backward,
    gated_activation,
    gated_activation_backward,
    grouped_mm,
    grouped_mm_backward,
)
from moe_kernels.reference.knn import knn_mix, knn_mix_backward, knn_route, knn_route_backward
from moe_kernels.reference.probmoe import exact_k_backward, exact_k_forward
from moe_kernels.reference.routing import softmax_topk, softmax_topk_backward

__all__ = [
    "ACTIVATIONS",
    "exact_k_backward",
    "exact_k_forward",
    "expert_counts",
    "fused_experts",
    "fused_experts_backward",
    "gated_activation",
    "gated_activation_backward",
    "grouped_mm",
    "grouped_mm_backward",
    "knn_mix",
    "knn_mix_backward",
    "knn_route",
    "knn_route_backward",
    "softmax_topk",
    "softmax_topk_backward",
]
