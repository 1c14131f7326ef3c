"""Ahead-of-time compile check of every kernel configuration for real GPU targets (no GPU needed).

- :mod:`moe_kernels.aot.catalog`: :class:`KernelCase`, :func:`register_kernel` (each op family
  declares its cases beside its launcher) and :func:`all_cases`;
- :mod:`moe_kernels.aot.compile`: :func:`compile_case`, :func:`compile_all` and the resource
  table of ``moe-kernels info --kernels``.

Importing this package imports neither Triton nor any kernel.
"""

from moe_kernels.aot.catalog import KernelCase, all_cases, cases, register_kernel
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
