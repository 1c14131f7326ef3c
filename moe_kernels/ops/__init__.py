"""Launchers (validate bounds, allocate, pick the grid, launch; never sync the host) and the
``torch.library`` registration of every op in the ``moe_kernels::`` namespace."""

from moe_kernels.ops import experts, grouped_mm, knn, probmoe, routing  # noqa: F401  (register every moe_kernels:: op)
