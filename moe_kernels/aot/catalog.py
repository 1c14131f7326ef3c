"""The ahead-of-time compile catalogue: every ``@triton.jit`` kernel of the package with the
configurations its launchers can choose.

Each op family declares its cases in ``moe_kernels/aot/cases/<family>.py``, with the launcher's
own pure meta function (imported from ``moe_kernels.ops``, never re-derived)::

    @register_kernel("my_kernel")
    def _my_kernel_cases():
        from moe_kernels.kernels._mine import _my_kernel
        for ... in ...:  # every configuration the launcher can pick over moe_kernels.shapes
            meta = my_meta(...)  # constexprs and num_warps
            yield kernel_case("my_kernel", _my_kernel, {"x_ptr": "*bf16", ...}, meta, label)

Importing :mod:`moe_kernels.aot.cases` registers every family; its :func:`~moe_kernels.aot.cases.all_cases`
collects the cases; :mod:`moe_kernels.aot.compile` compiles them for real GPU targets (no GPU needed) and
reports registers, spills and shared memory; ``tests/test_aot_compile.py`` fails if a ``*_kernel``
of a ``moe_kernels.kernels._*`` module is not registered. ``moe_kernels.ops`` imports nothing of
this package.

A case's ``signature`` holds the runtime arguments only (name -> Triton type), derived from the
kernel's own argument list by :func:`runtime_signature`: every argument the meta does not make a
constexpr, a pointer (``*_ptr``) typed by the case (``"*fp32"``, ``"*bf16"``, ``"*i32"``, ...),
a float scalar (:data:`FLOAT_SCALARS`) ``"fp32"``, any other scalar ``"i32"``; runtime values are
not specialised (one case covers every size, stride and scale). ``constexprs`` holds the
``tl.constexpr`` arguments by name, taken from the launcher's meta function, with ``num_warps``
split out.

Registering a generator costs nothing; generating cases imports the kernels, so it needs Triton.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

# Triton pointer element type of each logits dtype the Triton path accepts.
TRITON_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
}


@dataclass(frozen=True, eq=False)
class KernelCase:
    """One compilation of one kernel: ``fn`` specialised on ``signature`` and ``constexprs``.

    Identity (for deduplication) is :meth:`key`; ``label`` is only a short description of the
    configuration for reports, derived from the configuration itself (not from the model shape
    that chose it, since one case usually serves several shapes and token counts).
    """

    kernel_name: str
    fn: Any  # triton.runtime.jit.JITFunction
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    label: str = ""
    # Integer arguments that are multiples of 16 for this configuration, which the JIT
    # specialises on (pointers always are): they decide whether loads can be vectorised.
    divisible: tuple[str, ...] = ()

    def key(self) -> tuple:
        """Identity of the compiled binary: two cases with equal keys compile identically."""
        return (
            fn_path(self.fn),
            tuple(sorted(self.signature.items())),
            tuple(sorted((k, repr(v)) for k, v in self.constexprs.items())),
            self.num_warps,
            tuple(sorted(self.divisible)),
        )


CaseGenerator = Callable[[], Iterable[KernelCase]]

# kernel name -> generator of its cases. Extended by :func:`register_kernel`.
KERNELS: dict[str, CaseGenerator] = {}


def register_kernel(name: str) -> Callable[[CaseGenerator], CaseGenerator]:
    """Decorator registering ``gen`` as the case generator of kernel ``name``."""

    def deco(gen: CaseGenerator) -> CaseGenerator:
        if name in KERNELS:
            raise ValueError(f"kernel {name!r} is already registered")
        KERNELS[name] = gen
        return gen

    return deco


def fn_path(fn: Any) -> str:
    """``"module:name"`` of a JIT function (picklable, importable again in a worker process)."""
    inner = getattr(fn, "fn", fn)
    return f"{inner.__module__}:{inner.__qualname__}"


def dedupe(items: Iterable[KernelCase]) -> list[KernelCase]:
    """``items`` with identical compilations (equal :meth:`KernelCase.key`) listed once, in order."""
    seen: dict[tuple, KernelCase] = {}
    for case in items:
        seen.setdefault(case.key(), case)
    return list(seen.values())


def pointer(dtype: torch.dtype) -> str:
    """The Triton pointer type of a tensor of ``dtype`` (``"*bf16"``)."""
    return "*" + TRITON_DTYPES[dtype]


# The kernels' float scalar arguments, by name (every other scalar runtime argument is an int).
FLOAT_SCALARS = frozenset({"scale", "inv_temperature", "min_confidence", "limit", "alpha"})


def runtime_signature(fn: Any, pointers: dict[str, str], constexprs: dict) -> dict[str, str]:
    """The runtime arguments of kernel ``fn`` in its own order, typed: each argument not in
    ``constexprs`` is a pointer (name ending in ``_ptr``) of the type ``pointers`` gives, a float
    scalar (:data:`FLOAT_SCALARS`) or an int. Raises ``KeyError`` for a pointer ``pointers`` does
    not type, a name of ``pointers`` that is no runtime argument, or a ``tl.constexpr`` argument
    missing from ``constexprs``."""
    signature = {}
    for param in fn.params:
        name = param.name
        if name in constexprs:
            continue
        if param.is_constexpr:
            raise KeyError(f"{fn.__name__}: constexpr argument {name!r} is missing from the case's meta")
        if name.endswith("_ptr"):
            if name not in pointers:
                raise KeyError(f"{fn.__name__}: the case gives no type for pointer {name!r}")
            signature[name] = pointers[name]
        else:
            signature[name] = "fp32" if name in FLOAT_SCALARS else "i32"
    unknown = set(pointers) - set(signature)
    if unknown:
        raise KeyError(f"{fn.__name__}: the case types pointers that are no runtime arguments: {sorted(unknown)}")
    return signature


def kernel_case(
    kernel_name: str, fn: Any, pointers: dict[str, str], meta: dict, label: str, divisible: tuple[str, ...] = ()
) -> KernelCase:
    """The case of ``fn`` for a launcher's ``meta`` (its constexprs and ``num_warps``), with the
    signature :func:`runtime_signature` derives and ``pointers`` types."""
    constexprs = dict(meta)
    num_warps = constexprs.pop("num_warps")
    signature = runtime_signature(fn, pointers, constexprs)
    return KernelCase(kernel_name, fn, signature, constexprs, num_warps, label=label, divisible=tuple(divisible))
