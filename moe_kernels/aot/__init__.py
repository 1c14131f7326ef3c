"""Ahead-of-time compile check of every kernel configuration for real GPU targets (no GPU needed).

- :mod:`moe_kernels.aot.catalog`: :class:`KernelCase`, :func:`register_kernel` and the derived
  runtime signatures;
- :mod:`moe_kernels.aot.cases`: every op family's cases (a module each), :func:`all_cases` and
  :func:`cases`;
- :mod:`moe_kernels.aot.compile`: :func:`compile_case`, :func:`compile_all` and the resource
  table of ``moe-kernels info --kernels``.

Importing this package imports neither Triton nor any kernel.
"""

from moe_kernels.aot.cases import all_cases, cases
from moe_kernels.aot.catalog import KernelCase, register_kernel
from moe_kernels.aot.compile import DEFAULT_ARCHS, compile_all, compile_case, format_table, res_usage, summary

__all__ = [
    "DEFAULT_ARCHS",
    "KernelCase",
    "all_cases",
    "cases",
    "compile_all",
    "compile_case",
    "format_table",
    "register_kernel",
    "res_usage",
    "summary",
]
