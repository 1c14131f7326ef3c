"""Expert-parallel token exchange: :func:`dispatch` sends each (token, slot) row to the rank that owns
its expert, :func:`combine` brings the expert outputs back and sums each token's slots with its
routing weights. Both run on ``torch.distributed``'s ``all_to_all_single`` (gloo on CPU, NCCL on
CUDA) and are differentiable: the backward of dispatch is a combine (unweighted) and the backward
of combine is a dispatch (of the weighted output gradient).

Before any row moves, the ranks agree on a small header (:mod:`moe_kernels.distributed.agree`):
bad input on one rank, or ranks that disagree on E, H, the dtype, the expert output's width or
``requires_grad``, raise a named error on every rank; every collective waits a bounded time for
its peers (gloo). Host synchronisations: two per :func:`dispatch` (its header, then the exchanged
split sizes, see :func:`moe_kernels.distributed.layout.make_handle`), one per :func:`combine` (its
header); none in either backward, which reuse the handle's splits.

Summation order: the ``k`` slots of a token are summed by one reduction over a ``(T, k, H)``
buffer (slot ``j`` in position ``j``), never by atomics or an ``index_add`` over tokens; so
:func:`combine` and the backward of :func:`dispatch` give the same bits run to run, whatever order
the rows travelled in.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe_kernels.distributed.agree import agree, raise_unless_agreed, wait_bounded
from moe_kernels.distributed.layout import ROW_DTYPES, DispatchHandle, make_handle
from moe_kernels.utils import compute_dtype


def dispatch(x: torch.Tensor, ids: torch.Tensor, num_experts: int, group=None) -> tuple[torch.Tensor, DispatchHandle]:
    """Send each (token, slot) row of ``x`` to the rank that owns the slot's expert.

    Args:
        x: ``(T, H)`` float64 / float32 / float16 / bfloat16, this rank's tokens (``T`` may differ
            between ranks, 0 included; ``H`` and the dtype may not).
        ids: ``(T, k)`` int32 / int64 global expert ids; ``-1`` marks an empty slot, not sent.
        num_experts: ``E``, the same on every rank, divisible by the group's size ``W``; rank
            ``r`` owns experts ``[r * E / W, (r + 1) * E / W)``.
        group: the process group (default: the default group).

    Returns:
        ``recv_x (R, H)`` in ``x.dtype``: the rows this rank's experts must process, grouped by
        local expert (the groups :attr:`DispatchHandle.offsets` ends; within an expert by source
        rank, then the source's flat slot index), and the :class:`DispatchHandle` of the exchange.

    Differentiable with respect to ``x``: its gradient is the :func:`combine` of ``recv_x``'s
    gradient with unit weights. Collective: every rank of ``group`` must call it (and run its
    backward) in the same order. Bad arguments or out-of-range ids on any rank make *every* rank
    raise (the rank that has them a ``TypeError`` / ``ValueError`` naming them, the others a
    ``RuntimeError`` naming that rank); an E, hidden size, dtype or ``requires_grad`` that differs
    between ranks makes every rank raise ``ValueError`` / ``TypeError``. A peer that never joins
    (it failed since the last exchange) makes this rank raise ``RuntimeError`` after
    :func:`~moe_kernels.distributed.agree.exchange_timeout` seconds (gloo).
    """
    handle = make_handle(x, ids, num_experts, group)
    return _Dispatch.apply(x, handle), handle


def combine(expert_out: torch.Tensor, handle: DispatchHandle, weights: torch.Tensor) -> torch.Tensor:
    """Bring the expert outputs back to their tokens and sum each token's slots with its weights.

    Args:
        expert_out: ``(R, H)`` float, one row per row of the dispatch's ``recv_x`` (same order).
        handle: the :class:`DispatchHandle` of that :func:`dispatch`.
        weights: ``(T, k)`` float routing weights of this rank's tokens (empty slots ignored).

    Returns:
        ``(T, H)`` in ``expert_out.dtype``: ``out[t] = sum_j weights[t, j] * expert_out[row of
        (t, j)]`` over the slots that were sent, summed in float32 (float64 for float64) in slot
        order ``j = 0 .. k-1``; zero for a token with no sent slot.

    Differentiable with respect to ``expert_out`` (a :func:`dispatch` of the weighted output
    gradient, no new host synchronisation) and ``weights`` (``<grad_out[t], expert_out[row]>``,
    zero at empty slots). Collective, as :func:`dispatch`: bad arguments on one rank, or an
    expert output width, dtype or ``requires_grad`` that differs between ranks, raise on every
    rank before any row moves (one header exchange, read on the host); a handle that is not a
    :class:`DispatchHandle` raises here only, and the peers' wait is bounded.
    """
    if not isinstance(handle, DispatchHandle):  # no group to tell: the peers' wait is bounded
        raise TypeError(f"combine: handle must be the DispatchHandle dispatch returned, got {type(handle).__name__}")
    problem = _check_combine(expert_out, handle, weights)
    header = dict(error=problem is not None, width=-1, dtype=-1, grad_out=False, grad_weights=False)
    if problem is None:
        grad = torch.is_grad_enabled()
        header.update(
            width=expert_out.shape[1],
            dtype=ROW_DTYPES.index(expert_out.dtype) if expert_out.dtype in ROW_DTYPES else len(ROW_DTYPES),
            grad_out=grad and expert_out.requires_grad,
            grad_weights=grad and weights.requires_grad,
        )
    table = agree("combine", header, handle.group, handle.offsets.device)
    same = {
        "width": ("expert_out's width", ValueError),
        "dtype": ("expert_out's dtype", TypeError, (*ROW_DTYPES, "another dtype")),
        "grad_out": ("expert_out.requires_grad (with grad mode on)", ValueError),
        "grad_weights": ("weights.requires_grad (with grad mode on)", ValueError),
    }
    raise_unless_agreed("combine", table, handle.rank, problem, same)
    return _Combine.apply(expert_out, weights, handle)


def _check_combine(expert_out, handle: DispatchHandle, weights) -> Exception | None:
    """The first problem with this rank's :func:`combine` arguments, not yet raised."""
    if not isinstance(expert_out, torch.Tensor) or not expert_out.is_floating_point():
        return TypeError(f"combine: expert_out must be a float tensor, got {_describe(expert_out)}")
    if expert_out.dim() != 2 or expert_out.shape[0] != handle.num_received:
        return ValueError(
            f"combine: expert_out must have shape (R, H) with R = {handle.num_received} rows received by "
            f"dispatch, got {tuple(expert_out.shape)}"
        )
    if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
        return TypeError(f"combine: weights must be a float tensor, got {_describe(weights)}")
    if tuple(weights.shape) != (handle.num_tokens, handle.top_k):
        return ValueError(
            f"combine: weights must have shape (T, k) = ({handle.num_tokens}, {handle.top_k}), "
            f"got {tuple(weights.shape)}"
        )
    for name, tensor in (("expert_out", expert_out), ("weights", weights)):
        if tensor.device != handle.offsets.device:
            return ValueError(
                f"combine: {name} must be on the dispatch's device {handle.offsets.device}, got {tensor.device}"
            )
    return None


def _describe(value) -> str:
    return f"{value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__


def _to_experts(rows: torch.Tensor, handle: DispatchHandle, op: str) -> torch.Tensor:
    """Rows in send order ``(S, H)`` -> the receivers' expert-major rows ``(R, H)``."""
    received = rows.new_empty(handle.num_received, rows.shape[1])
    splits = list(handle.output_splits), list(handle.input_splits)
    sending = rows.contiguous()

    def launch(async_op):
        return dist.all_to_all_single(received, sending, *splits, group=handle.group, async_op=async_op)

    wait_bounded(op, launch, rows.device)
    return received.index_select(0, handle.permutation)


def _from_experts(rows: torch.Tensor, handle: DispatchHandle, op: str) -> torch.Tensor:
    """The inverse of :func:`_to_experts`: expert-major rows ``(R, H)`` -> send order ``(S, H)``."""
    arrival = torch.empty_like(rows).index_copy_(0, handle.permutation, rows)  # a permutation: no sums
    returned = rows.new_empty(handle.num_sent, rows.shape[1])
    splits = list(handle.input_splits), list(handle.output_splits)

    def launch(async_op):
        return dist.all_to_all_single(returned, arrival, *splits, group=handle.group, async_op=async_op)

    wait_bounded(op, launch, rows.device)
    return returned


def _per_slot(rows: torch.Tensor, handle: DispatchHandle, dtype: torch.dtype) -> torch.Tensor:
    """Sent rows ``(S, H)`` placed at their slots of a zero ``(T, k, H)`` buffer in ``dtype``."""
    buffer = rows.new_zeros(handle.num_tokens * handle.top_k, rows.shape[1], dtype=dtype)
    buffer.index_copy_(0, handle.slots, rows.to(dtype))  # each slot once: a copy, not a sum
    return buffer.view(handle.num_tokens, handle.top_k, rows.shape[1])


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        ctx.handle = handle
        ctx.x_dtype = x.dtype
        return _to_experts(x.index_select(0, handle.tokens), handle, "dispatch")

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_recv: torch.Tensor):
        handle = ctx.handle
        rows = _from_experts(grad_recv.to(ctx.x_dtype), handle, "dispatch (backward)")
        # The gradient of x[t] sums its slots' rows: a fixed-order reduction over k.
        grad_x = _per_slot(rows, handle, compute_dtype(ctx.x_dtype)).sum(1)
        return grad_x.to(ctx.x_dtype), None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, expert_out: torch.Tensor, weights: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        dtype = compute_dtype(expert_out.dtype)
        per_slot = _per_slot(_from_experts(expert_out, handle, "combine"), handle, dtype)  # (T, k, H)
        # Weights of empty slots are ignored, as by fused_experts (0 * NaN would not be).
        weights = torch.where(handle.sent, weights, torch.zeros_like(weights))
        out = (per_slot * weights.to(dtype).unsqueeze(-1)).sum(1)
        ctx.handle = handle
        ctx.out_dtype = expert_out.dtype
        ctx.save_for_backward(per_slot if ctx.needs_input_grad[1] else None, weights)
        return out.to(expert_out.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        per_slot, weights = ctx.saved_tensors
        handle = ctx.handle
        dtype = compute_dtype(ctx.out_dtype)
        grad = grad_out.to(dtype).unsqueeze(1)  # (T, 1, H)
        grad_weights = None
        if ctx.needs_input_grad[1]:
            grad_weights = (per_slot * grad).sum(-1).to(weights.dtype)  # zero at empty slots
        grad_expert_out = None
        if ctx.needs_input_grad[0]:
            weighted = (grad * weights.to(dtype).unsqueeze(-1)).reshape(-1, grad_out.shape[-1])
            rows = weighted.index_select(0, handle.slots).to(ctx.out_dtype)
            grad_expert_out = _to_experts(rows, handle, "combine (backward)")
        return grad_expert_out, grad_weights, None
