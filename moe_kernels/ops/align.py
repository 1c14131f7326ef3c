"""Token alignment: the routing slots sorted by expert, on the device, with fixed shapes.

:func:`moe_align` is the torch path (a stable argsort and a scatter-add count); for decode-sized
routings :func:`launch_moe_align` runs one Triton program that also gathers the routing weights
in sorted order and checks the ids (one flag, asserted asynchronously by the caller).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from moe_kernels.utils import new_output, next_power_of_2, slot_experts


class MoEAlignment(NamedTuple):
    """The T*k routing slots (slot ``t * k + j``) sorted by expert, stable; empty slots (id -1)
    last. Every tensor has a fixed size: R = T*k rows or E experts.

    - ``order (R,) int64``: slot at each sorted position.
    - ``tokens (R,) int32``: its token, the row the first GEMM gathers.
    - ``experts (R,) int32``: its expert, E for an empty slot.
    - ``positions (R,) int32``: the inverse: sorted position of each slot.
    - ``counts (E,) int32``: slots per expert; ``offsets (E,) int32``: their cumulative sums, the
      grouped GEMM's group ends (rows from ``offsets[-1]`` on are the empty slots).
    """

    order: torch.Tensor
    tokens: torch.Tensor
    experts: torch.Tensor
    positions: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor


def key_counts(key: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``(E + 1,)`` int32 slots per key of :func:`~moe_kernels.utils.slot_experts` (the last bin:
    the empty slots), by a scatter-add (``bincount`` on CUDA reads its maximum back to the host)."""
    counts = torch.zeros(num_experts + 1, dtype=torch.int32, device=key.device)
    return counts.scatter_add_(0, key, torch.ones_like(key, dtype=torch.int32))


def moe_align(ids: torch.Tensor, num_experts: int) -> MoEAlignment:
    """Sort the slots of ``ids (T, k)`` (int32/int64, -1 = empty) by expert, on the device and
    without a host sync (CUDA-graph safe): a stable argsort and a scatter-add count."""
    k = ids.shape[1]
    key = slot_experts(ids, num_experts)
    order = torch.argsort(key, stable=True)
    counts = key_counts(key, num_experts)
    num_slots = key.numel()
    positions = torch.empty(num_slots, dtype=torch.int32, device=ids.device)
    positions.scatter_(0, order, torch.arange(num_slots, dtype=torch.int32, device=ids.device))
    return MoEAlignment(
        order=order,
        tokens=(order // max(k, 1)).to(torch.int32),
        experts=key[order].to(torch.int32),
        positions=positions,
        counts=counts[:num_experts],
        offsets=counts[:num_experts].cumsum(0, dtype=torch.int32),
    )


# The one-program alignment kernel sorts all slots in registers: it takes R = T*k up to this
# (decode batches, where launch counts matter) and E + 2 bins up to ALIGN_KERNEL_MAX_BINS; larger
# routings take moe_align's torch path, a device sort spread over many SMs.
ALIGN_KERNEL_MAX_SLOTS = 1024
ALIGN_KERNEL_MAX_BINS = 1024


def align_meta(num_slots: int, num_experts: int) -> dict | None:
    """Constexprs and ``num_warps`` of the alignment kernel (shared with the AOT cases below), or
    None where it does not apply."""
    bins = next_power_of_2(num_experts + 2)
    if not 0 < num_slots <= ALIGN_KERNEL_MAX_SLOTS or bins > ALIGN_KERNEL_MAX_BINS:
        return None
    block = max(16, next_power_of_2(num_slots))
    return dict(BLOCK_R=block, NUM_BINS=bins, num_warps=4 if block <= 256 else 8)


def launch_moe_align(ids: torch.Tensor, num_experts: int, weights: torch.Tensor):
    """The Triton path's alignment: ``(MoEAlignment, row_weight (R,) float32, valid () int32)``,
    where ``row_weight`` is ``weights (T, k)`` in sorted order and ``valid`` is nonzero iff every
    id is in [-1, E). One kernel launch for decode-sized routings (:func:`align_meta`), else
    :func:`moe_align` and two torch ops. No host sync either way."""
    from moe_kernels.kernels._experts import _moe_align_kernel

    num_tokens, k = ids.shape
    num_slots = num_tokens * k
    meta = align_meta(num_slots, num_experts)
    if meta is None:
        align = moe_align(ids, num_experts)
        row_weight = weights.reshape(-1).to(torch.float32)[align.order]
        valid = ((ids >= -1) & (ids < num_experts)).all()
        return align, row_weight, valid
    device = ids.device
    order = new_output((num_slots,), torch.int64, device)
    tokens, experts, positions = (new_output((num_slots,), torch.int32, device) for _ in range(3))
    row_weight = new_output((num_slots,), torch.float32, device)
    counts, offsets = (new_output((num_experts,), torch.int32, device) for _ in range(2))
    valid = new_output((), torch.int32, device)
    _moe_align_kernel[(1,)](
        ids_ptr=ids.contiguous(),
        weights_ptr=weights.contiguous(),
        order_ptr=order,
        tokens_ptr=tokens,
        experts_ptr=experts,
        positions_ptr=positions,
        row_weight_ptr=row_weight,
        counts_ptr=counts,
        offsets_ptr=offsets,
        valid_ptr=valid,
        R=num_slots,
        E=num_experts,
        K=k,
        **meta,
    )
    align = MoEAlignment(
        order=order, tokens=tokens, experts=experts, positions=positions, counts=counts, offsets=offsets
    )
    return align, row_weight, valid
