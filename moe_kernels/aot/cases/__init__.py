"""The ahead-of-time compile cases of every op family (importing this package registers them in
:mod:`moe_kernels.aot.catalog`): a module per family, built from the launchers' own meta
functions (``moe_kernels.ops``), which import nothing of :mod:`moe_kernels.aot`."""

from moe_kernels.aot.cases import experts, knn, probmoe, routing

__all__ = ["experts", "knn", "probmoe", "routing"]
