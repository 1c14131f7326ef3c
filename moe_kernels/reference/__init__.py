"""Pure-PyTorch references, one module per op family: the readable oracles of the tests and of
``moe-kernels validate``, the ``backend="torch"`` path of every op off the CPU (CPU tensors run
:mod:`moe_kernels.cpu`), and the eager baselines of the benchmarks. Production code does not call
them otherwise, so an edit here changes what is checked, never what users compute.
"""

from moe_kernels.reference.experts import (
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
