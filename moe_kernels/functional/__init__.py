"""The public functional API: validates arguments, picks the backend, calls the registered op."""

from moe_kernels.functional.experts import expert_counts, fused_experts, moe_align
from moe_kernels.functional.grouped_mm import grouped_mm
from moe_kernels.functional.knn import knn_mix, knn_route, knn_route_assignments
from moe_kernels.functional.probmoe import exact_k_marginals, exact_k_sample, probmoe_route
from moe_kernels.functional.routing import softmax_topk

__all__ = [
    "exact_k_marginals",
    "exact_k_sample",
    "expert_counts",
    "fused_experts",
    "grouped_mm",
    "knn_mix",
    "knn_route",
    "knn_route_assignments",
    "moe_align",
    "probmoe_route",
    "softmax_topk",
]
