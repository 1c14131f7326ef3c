"""Benchmarks of moe_kernels' ops against the PyTorch baselines users run today.

Run one from the repository root, e.g. ``python -m benchmarks.bench_routing --quick``; results are
appended to ``benchmarks/results/<device>/<op>.csv`` (see :mod:`benchmarks.common`). Every
benchmark's command line comes from :mod:`benchmarks.command` (``main_for``), and the rows of one
point, each provider timed in turn, from :mod:`benchmarks.points`.
"""
