"""The fast CPU path of every op: what ``use_triton=False`` runs for CPU tensors.

The modules of :mod:`moe_kernels.reference` are readable oracles; this package computes the same
functions with fewer, cheaper PyTorch calls, tuned for a CPU (where an eager op costs 1-3 us of
dispatch before any work, and where ``torch.topk`` and small matmuls are slower than a vectorised
pass). Each function has its reference's signature and semantics (ids exactly, floats within
:data:`moe_kernels.testing.TOLERANCES`), and is tested against the float64 oracles like the
kernels are (``tests/test_cpu_path.py``).

- :mod:`~moe_kernels.cpu.select`: exact top-k selection (``torch.topk`` plus a tie check, on the
  host for a few keys, from the ``k + 1`` largest otherwise; rows with ties or NaN keys go to the
  reference's exact ranking);
- :mod:`~moe_kernels.cpu.routing`: ``softmax_topk`` forward and backward;
- :mod:`~moe_kernels.cpu.knn`: ``knn_mix`` and ``knn_route``;
- :mod:`~moe_kernels.cpu.probmoe`: the exact-k DP, vectorised over tokens, in preallocated tables;
- :mod:`~moe_kernels.cpu.experts`: ``fused_experts`` and ``grouped_mm`` on ``torch._grouped_mm``.

Host reads (``.tolist()``, ``bool(tensor)``, ``.nonzero()``) appear here and only here: on CPU
tensors they read memory the process already owns (no device sync), and they let the path skip
work (the slow exact ranking of the rare tied rows, the experts no token was routed to). The ops
call this package only for CPU tensors; CUDA tensors with ``backend="torch"`` keep the references,
which never read values on the host.

Nothing here is ``torch.compile``d: Inductor's C++ build costs seconds per shape on a small CPU
(more than any single eager call saves), and its compiled graphs still pay ~5-10 us of guards per
call at decode sizes.
"""

from moe_kernels.cpu import experts, knn, probmoe, routing, select

__all__ = ["experts", "knn", "probmoe", "routing", "select"]
