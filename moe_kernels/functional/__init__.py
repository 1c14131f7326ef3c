"""The public functional API: validates arguments, picks the backend, calls the registered op."""

from moe_kernels.functional.routing import softmax_topk

__all__ = ["softmax_topk"]
