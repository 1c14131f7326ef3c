"""moe_kernels: fused Triton kernels for Mixture-of-Experts routing and expert compute.

Importing the package needs only torch: Triton is imported when a kernel first runs, and CPU
tensors run the pure-PyTorch references in ``moe_kernels.reference``.
"""

__version__ = "0.1.0"

from moe_kernels import cor  # Counterfactual Routing, a submodule (imports no transformers)
from moe_kernels.config import Activation, RoutingConfig
from moe_kernels.functional import (
    exact_k_marginals,
    exact_k_sample,
    expert_counts,
    fused_experts,
    grouped_mm,
    knn_mix,
    knn_route,
    knn_route_assignments,
    moe_align,
    probmoe_route,
    softmax_topk,
)
from moe_kernels.nn import MoE, ProbMoERouter, TopKRouter

__all__ = [
    "Activation",
    "RoutingConfig",
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
    "MoE",
    "ProbMoERouter",
    "TopKRouter",
    "__version__",
    "cor",
]
