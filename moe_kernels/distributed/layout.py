"""The routing layout of an expert-parallel exchange: which rows go to which rank, and how the rows
a rank receives are grouped by its local experts (:class:`DispatchHandle`), built with one count
exchange after a header the ranks agree on (:func:`make_handle`).

Experts are split into ``W`` equal contiguous blocks (``W`` = the group's size): rank ``r`` owns
global experts ``[r * E / W, (r + 1) * E / W)``. Every rank checks its own arguments *before* the
header exchange but raises only *after* it, having told every peer (an error flag in the header,
:mod:`moe_kernels.distributed.agree`); so bad input on one rank, or ranks that disagree on E, H,
the dtype or ``requires_grad``, make every rank raise in the same call, before any row moves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe_kernels.distributed.agree import agree, raise_unless_agreed, wait_bounded
from moe_kernels.utils import slot_experts

# Dtypes the token rows may have, by their code in the exchanged header.
ROW_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True, eq=False)
class DispatchHandle:
    """What :func:`combine` and the local experts need from a :func:`dispatch`.

    On the sending side (this rank's ``T`` tokens, ``k`` slots each; ``S`` rows sent, the slots
    whose id is not -1), in send order (by destination rank, then global expert, then flat slot):

    - ``slots (S,)`` int64: the flat slot index ``t * k + j`` of each sent row;
    - ``tokens (S,)`` int64: its token ``t`` (``slots // k``);
    - ``sent (T, k)`` bool: which slots were sent (id in ``[0, E)``; the others are ignored);
    - ``input_splits``: rows sent to each rank of the group (``W`` ints, sum ``S``).

    On the receiving side (``R`` rows for this rank's ``E / W`` local experts):

    - ``output_splits``: rows received from each rank (``W`` ints, sum ``R``);
    - ``permutation (R,)`` int64: ``recv_x = received[permutation]``, from the order rows arrive
      in (by source rank, then local expert) to the experts' order (by local expert, then source
      rank, then the source's slot order);
    - ``counts (E/W,)`` int32: rows per local expert;
    - ``offsets (E/W,)`` int32: the cumulative end row of each local expert's group in
      ``recv_x``, the ``offsets`` argument of :func:`moe_kernels.grouped_mm`;
    - ``expert_ids (R,)`` int64: the local expert (``0 <= e < E/W``) of each row of ``recv_x``.

    Every tensor is on the device of the dispatched ``x``; the splits are Python ints (what
    ``all_to_all_single`` takes), read on the host once per :func:`dispatch`. A handle may be
    reused for any number of :func:`combine` calls with the same routing.
    """

    slots: torch.Tensor
    tokens: torch.Tensor
    sent: torch.Tensor
    input_splits: tuple[int, ...]
    output_splits: tuple[int, ...]
    permutation: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor
    expert_ids: torch.Tensor
    num_tokens: int
    top_k: int
    num_experts: int
    rank: int
    world_size: int
    group: object = None
    hidden_size: int = 0
    requires_grad: bool = False

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.world_size

    @property
    def first_expert(self) -> int:
        """The global id of this rank's local expert 0."""
        return self.rank * self.num_local_experts

    @property
    def num_sent(self) -> int:
        return sum(self.input_splits)

    @property
    def num_received(self) -> int:
        return sum(self.output_splits)


def group_rank_and_size(group, caller: str) -> tuple[int, int]:
    """``(rank, world_size)`` of this process in ``group`` (the default group when None)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"{caller}: torch.distributed has no process group; call torch.distributed.init_process_group "
            "first (gloo on CPU, nccl on CUDA)"
        )
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError(f"{caller}: this process (global rank {dist.get_rank()}) is not a member of group")
    return rank, world


def local_expert_count(num_experts, world_size: int, caller: str) -> int:
    """``E / W``; ``ValueError`` unless ``num_experts`` is a positive multiple of ``world_size``.
    The same on every rank (E and W are), so every rank raises together without talking."""
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts <= 0:
        raise ValueError(f"{caller}: num_experts must be a positive int, got {num_experts!r}")
    if num_experts % world_size:
        raise ValueError(
            f"{caller}: num_experts must be divisible by the group's size to split the experts into "
            f"equal blocks, got num_experts = {num_experts} and world size {world_size}"
        )
    return num_experts // world_size


def _check_local(x, ids) -> Exception | None:
    """The first problem with this rank's ``x`` and ``ids``, as an exception not yet raised."""
    if not isinstance(x, torch.Tensor):
        return TypeError(f"dispatch: x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(ids, torch.Tensor):
        return TypeError(f"dispatch: ids must be a torch.Tensor, got {type(ids).__name__}")
    if x.dtype not in ROW_DTYPES:
        return TypeError(f"dispatch: x must be float64, float32, float16 or bfloat16, got {x.dtype}")
    if ids.dtype not in (torch.int32, torch.int64):
        return TypeError(f"dispatch: ids must be int32 or int64, got {ids.dtype}")
    if x.dim() != 2:
        return ValueError(f"dispatch: x must have shape (T, H), got {tuple(x.shape)}")
    if ids.dim() != 2 or ids.shape[0] != x.shape[0]:
        return ValueError(
            f"dispatch: ids must have shape (T, k) with T = x.shape[0] = {x.shape[0]}, got {tuple(ids.shape)}"
        )
    if ids.device != x.device:
        return ValueError(f"dispatch: ids must be on x's device {x.device}, got {ids.device}")
    return None


def make_handle(x, ids, num_experts: int, group) -> DispatchHandle:
    """The layout of dispatching ``x (T, H)`` by ``ids (T, k)`` over ``group``.

    First the ranks agree on a header (:func:`~moe_kernels.distributed.agree.agree`: an error
    flag, an out-of-range-ids flag, E, H, the dtype and whether ``x`` requires grad), so that bad
    input or a disagreement raises on every rank before any row moves; then they exchange their
    row counts per destination expert (one ``all_to_all_single`` of ``(W, E/W)`` int64) and read
    them on the host (``all_to_all_single`` takes its split sizes as Python ints, as in
    torchtitan's expert_parallel). Two host synchronisations; each collective waits a bounded time.
    """
    rank, world = group_rank_and_size(group, "dispatch")
    problem = _check_local(x, ids)
    if problem is None:
        try:
            num_local = local_expert_count(num_experts, world, "dispatch")
        except ValueError as error:
            problem = error
    device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
    header = dict(error=problem is not None, bad_ids=False, experts=-1, hidden=-1, dtype=-1, grad=False)
    if problem is None:
        flat = ids.reshape(-1).to(torch.int64)
        header.update(
            bad_ids=((flat < -1) | (flat >= num_experts)).any(),  # exchanged on the device, not read first
            experts=num_experts,
            hidden=x.shape[1],
            dtype=ROW_DTYPES.index(x.dtype),
            grad=x.requires_grad and torch.is_grad_enabled(),
        )
    table = agree("dispatch", header, group, device)
    _raise_if_any_bad(table, rank, problem, ids, num_experts)

    key = slot_experts(ids, num_experts)  # empty and out-of-range slots sort last, into a dropped bin
    order = torch.argsort(key, stable=True)  # by global expert = by destination rank
    in_range = key < num_experts
    # scatter_add_, not bincount: CUDA's bincount reads the largest id on the host.
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts = counts.scatter_add_(0, key, torch.ones_like(key))[:num_experts].view(world, num_local)
    recv = torch.empty_like(counts)
    wait_bounded(
        "dispatch", lambda async_op: dist.all_to_all_single(recv, counts, group=group, async_op=async_op), device
    )
    # The second host synchronisation: the split sizes.
    host = torch.cat([recv.reshape(-1), counts.sum(1)]).tolist()
    table = [host[r * num_local : (r + 1) * num_local] for r in range(world)]
    input_splits = tuple(host[world * num_local :])
    output_splits = tuple(sum(row) for row in table)
    num_recv = sum(output_splits)
    top_k = ids.shape[1]
    slots = order[: sum(input_splits)]
    # Rows arrive by source rank, then local expert: label each with its local expert and sort
    # (stable) into expert-major order for the grouped GEMM.
    arrival_expert = torch.repeat_interleave(
        torch.arange(num_local, device=device).repeat(world), recv.reshape(-1), output_size=num_recv
    )
    permutation = torch.argsort(arrival_expert, stable=True)
    local_counts = recv.sum(0).to(torch.int32)
    return DispatchHandle(
        slots=slots,
        tokens=slots // max(top_k, 1),
        sent=in_range.view(ids.shape),
        input_splits=input_splits,
        output_splits=output_splits,
        permutation=permutation,
        counts=local_counts,
        offsets=local_counts.cumsum(0).to(torch.int32),
        expert_ids=arrival_expert[permutation],
        num_tokens=x.shape[0],
        top_k=top_k,
        num_experts=num_experts,
        rank=rank,
        world_size=world,
        group=group,
        hidden_size=x.shape[1],
        requires_grad=bool(header["grad"]),
    )


def _raise_if_any_bad(table: list[dict], rank: int, problem: Exception | None, ids, num_experts: int) -> None:
    """Raise, on every rank alike, when any rank's header reports a problem or the ranks disagree."""
    if any(row["bad_ids"] for row in table) and not any(row["error"] for row in table):
        if table[rank]["bad_ids"]:
            flat = ids.reshape(-1)
            bad = flat[(flat < -1) | (flat >= num_experts)]  # error path: a second sync is fine
            raise ValueError(
                f"dispatch: ids must be -1 (empty slot) or in [0, num_experts) = [0, {num_experts}), got "
                f"{bad.numel()} out of range on rank {rank}, e.g. {bad[:4].tolist()}"
            )
        failed = [r for r, row in enumerate(table) if row["bad_ids"]]
        raise RuntimeError(
            f"dispatch: rank(s) {failed} of the group got invalid arguments (they raise the details); "
            f"rank {rank} raises too, so that no rank waits in the exchange"
        )
    same = {
        "experts": ("num_experts", ValueError),
        "hidden": ("x's hidden size H", ValueError),
        "dtype": ("x's dtype", TypeError, ROW_DTYPES),
        "grad": ("x.requires_grad (with grad mode on), which decides whether a backward exchange runs,", ValueError),
    }
    raise_unless_agreed("dispatch", table, rank, problem, same)
