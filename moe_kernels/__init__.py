"""moe_kernels: fused Triton kernels for Mixture-of-Experts routing and expert compute.

Importing the package needs only torch: Triton is imported when a kernel first runs, and CPU
tensors run the pure-PyTorch references in ``moe_kernels.reference``.
"""

__version__ = "0.1.0"

# The submodules moe_kernels.balance, .cor, .dynamics, .functional and .replay (none imports
# transformers).
from moe_kernels import balance, cor, dynamics, functional, replay
from moe_kernels.config import Activation, RoutingConfig
from moe_kernels.functional import *  # noqa: F403 (the public functions; their names are functional.__all__)
from moe_kernels.nn import MoE, ProbMoERouter, TopKRouter
from moe_kernels.utils import batch_invariant, is_batch_invariant, set_batch_invariant

__all__ = [
    *functional.__all__,  # noqa: F405
    "Activation",
    "MoE",
    "ProbMoERouter",
    "RoutingConfig",
    "TopKRouter",
    "__version__",
    "balance",
    "batch_invariant",
    "cor",
    "dynamics",
    "is_batch_invariant",
    "replay",
    "set_batch_invariant",
]
