"""The public functional API: validates arguments, picks the backend, calls the registered op."""

from moe_kernels.functional.knn import knn_mix
from moe_kernels.functional.routing import softmax_topk

__all__ = ["knn_mix", "softmax_topk"]
