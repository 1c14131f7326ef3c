"""The ahead-of-time compile cases of every op family: a module per family, built from the
launchers' own meta functions (``moe_kernels.ops``, which imports nothing of :mod:`moe_kernels.aot`);
importing this package registers them in :data:`moe_kernels.aot.catalog.KERNELS`."""

from __future__ import annotations

from moe_kernels.aot.cases import experts, knn, probmoe, routing
from moe_kernels.aot.catalog import KERNELS, KernelCase, dedupe

__all__ = ["all_cases", "cases", "experts", "knn", "probmoe", "routing"]


def cases(name: str) -> list[KernelCase]:
    """The distinct cases of one registered kernel, in generation order."""
    return dedupe(KERNELS[name]())


def all_cases() -> list[KernelCase]:
    """The distinct cases of every registered kernel (identical compilations listed once)."""
    return dedupe(case for name in KERNELS for case in cases(name))
