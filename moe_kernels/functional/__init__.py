"""The public functional API: validates arguments, picks the backend, calls the registered op."""

from moe_kernels.functional.knn import knn_mix
from moe_kernels.functional.probmoe import exact_k_marginals, exact_k_sample, probmoe_route
from moe_kernels.functional.routing import softmax_topk

__all__ = ["exact_k_marginals", "exact_k_sample", "knn_mix", "probmoe_route", "softmax_topk"]
