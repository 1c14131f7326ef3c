"""The routing layout of an expert-parallel exchange: which rows go to which rank, and how the rows
a rank receives are grouped by its local experts (:class:`DispatchHandle`), built with one count
exchange and one host synchronisation (:func:`make_handle`).

Experts are split into ``W`` equal contiguous blocks (``W`` = the group's size): rank ``r`` owns
global experts ``[r * E / W, (r + 1) * E / W)``. Every rank checks its own arguments *before* the
count exchange but raises only *after* it, having told every peer (an error code in the exchanged
header); so bad input on one rank makes every rank raise in the same call, and none is left
waiting in a collective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe_kernels.utils import slot_experts

# Dtypes the token rows may have, by their code in the exchanged header.
ROW_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# Header columns sent to every peer before the per-expert counts.
_ERROR, _BAD_IDS, _HIDDEN, _DTYPE = range(4)
_HEADER = 4


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

    Exchanges, with one ``all_to_all_single`` of a ``(W, 4 + E/W)`` int64 tensor, each rank's
    header (an error code, an out-of-range-ids flag, H and the dtype) and its row count per
    destination expert; then reads the received counts on the host (the one host synchronisation,
    as in torchtitan's expert_parallel: ``all_to_all_single`` takes its split sizes as Python
    ints). Raises on every rank together when any rank's input is bad.
    """
    rank, world = group_rank_and_size(group, "dispatch")
    num_local = local_expert_count(num_experts, world, "dispatch")
    problem = _check_local(x, ids)
    device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
    if problem is None:
        flat = ids.reshape(-1).to(torch.int64)
        bad_ids = ((flat < -1) | (flat >= num_experts)).any()
        # Empty and out-of-range slots sort last, into a bin that is dropped: no masking by value.
        key = slot_experts(ids, num_experts)
        order = torch.argsort(key, stable=True)  # by global expert = by destination rank
        in_range = key < num_experts
        # scatter_add_, not bincount: CUDA's bincount reads the largest id on the host.
        counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
        counts = counts.scatter_add_(0, key, torch.ones_like(key))[:num_experts]
    else:
        counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    # Filled on the device (torch.tensor(list, device=...) would wait for a host-to-device copy).
    header = torch.zeros(_HEADER, dtype=torch.int64, device=device)
    if problem is None:
        header[_BAD_IDS] = bad_ids
        header[_HIDDEN] = x.shape[1]
        header[_DTYPE] = ROW_DTYPES.index(x.dtype)
    else:
        header[_ERROR] = 1
    send = torch.cat([header.expand(world, _HEADER), counts.view(world, num_local)], dim=1)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    # The one host synchronisation of dispatch: the split sizes (and the peers' headers).
    host = torch.cat([recv.reshape(-1), counts.view(world, num_local).sum(1)]).tolist()
    table = [host[r * (_HEADER + num_local) : (r + 1) * (_HEADER + num_local)] for r in range(world)]
    _raise_if_any_bad(table, rank, problem, ids, num_experts)

    input_splits = tuple(host[world * (_HEADER + num_local) :])
    output_splits = tuple(sum(row[_HEADER:]) for row in table)
    num_recv = sum(output_splits)
    top_k = ids.shape[1]
    slots = order[: sum(input_splits)]
    # Rows arrive by source rank, then local expert: label each with its local expert and sort
    # (stable) into expert-major order for the grouped GEMM.
    recv_counts = recv[:, _HEADER:]  # (W, E/W), still on the device
    arrival_expert = torch.repeat_interleave(
        torch.arange(num_local, device=device).repeat(world), recv_counts.reshape(-1), output_size=num_recv
    )
    permutation = torch.argsort(arrival_expert, stable=True)
    local_counts = recv_counts.sum(0).to(torch.int32)
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
    )


def _raise_if_any_bad(table: list[list[int]], rank: int, problem: Exception | None, ids, num_experts: int) -> None:
    """Raise, on every rank alike, when any rank's header reports a problem."""
    failed = [r for r, row in enumerate(table) if row[_ERROR] or row[_BAD_IDS]]
    if failed:
        if problem is not None:
            raise problem
        if table[rank][_BAD_IDS]:
            flat = ids.reshape(-1)
            bad = flat[(flat < -1) | (flat >= num_experts)]  # error path: a second sync is fine
            raise ValueError(
                f"dispatch: ids must be -1 (empty slot) or in [0, num_experts) = [0, {num_experts}), got "
                f"{bad.numel()} out of range on rank {rank}, e.g. {bad[:4].tolist()}"
            )
        raise RuntimeError(
            f"dispatch: rank(s) {failed} of the group got invalid arguments (they raise the details); "
            f"rank {rank} raises too, so that no rank waits in the exchange"
        )
    hidden = [row[_HIDDEN] for row in table]
    if len(set(hidden)) > 1:
        raise ValueError(f"dispatch: x must have the same hidden size H on every rank, got H = {hidden} by rank")
    dtypes = [ROW_DTYPES[row[_DTYPE]] for row in table]
    if len(set(dtypes)) > 1:
        raise TypeError(f"dispatch: x must have the same dtype on every rank, got {dtypes} by rank")
