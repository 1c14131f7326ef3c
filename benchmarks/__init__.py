"""Benchmarks of moe_kernels' ops against the PyTorch baselines users run today.

Run one from the repository root, e.g. ``python -m benchmarks.bench_routing --quick``; results are
appended to ``benchmarks/results/<device>/<op>.csv`` (see :mod:`benchmarks.common`).
"""
