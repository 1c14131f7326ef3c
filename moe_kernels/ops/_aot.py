"""What every op family's ahead-of-time compile cases (:mod:`moe_kernels.aot`) build: a kernel's
runtime signature and a :class:`~moe_kernels.aot.catalog.KernelCase` from a launcher's meta."""

from __future__ import annotations

from collections.abc import Iterable

from moe_kernels.aot.catalog import KernelCase


def runtime_signature(pointers: dict[str, str], ints: Iterable[str] = (), floats: Iterable[str] = ()) -> dict[str, str]:
    """A case's signature in the kernel's argument order (every kernel takes its pointers first,
    then its int scalars, then its float scalars): ``pointers`` (name -> ``"*fp32"``, ...), then
    ``ints`` as ``"i32"`` and ``floats`` as ``"fp32"``."""
    return {**pointers, **dict.fromkeys(ints, "i32"), **dict.fromkeys(floats, "fp32")}


def kernel_case(kernel_name: str, fn, signature: dict[str, str], meta: dict, label: str, divisible=()) -> KernelCase:
    """The case of ``fn`` for a launcher's ``meta`` (its constexprs and ``num_warps``, left as it is)."""
    constexprs = dict(meta)
    num_warps = constexprs.pop("num_warps")
    return KernelCase(kernel_name, fn, signature, constexprs, num_warps, label=label, divisible=tuple(divisible))
