"""Expert parallelism on ``torch.distributed`` (gloo on CPU, NCCL on CUDA).

- :func:`dispatch` / :func:`combine`: the all-to-all token exchange of an expert-parallel MoE
  layer, differentiable, with a :class:`DispatchHandle` that feeds :func:`moe_kernels.grouped_mm`.
- :class:`ExpertParallelMoE`: a :class:`moe_kernels.MoE` with its experts sharded over a group.
- :func:`run_group`: run a function on a local process group (tests, benchmarks).

Import it explicitly (``import moe_kernels.distributed``); ``import moe_kernels`` does not.
"""

from moe_kernels.distributed.exchange import combine, dispatch
from moe_kernels.distributed.launch import RankError, free_port, run_group
from moe_kernels.distributed.layout import DispatchHandle
from moe_kernels.distributed.moe import ExpertParallelMoE

__all__ = ["DispatchHandle", "ExpertParallelMoE", "RankError", "combine", "dispatch", "free_port", "run_group"]
