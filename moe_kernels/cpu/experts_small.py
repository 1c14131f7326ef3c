"""``fused_experts`` for a handful of slots with small experts (a decode step of a small model):
each slot's expert weights gathered, the two GEMVs as batched products, the token sum as one
more batched product.

A decode step routes ``T*k`` slots, often a few. Sorting them and running ``torch._grouped_mm``
(which visits every one of the ``E`` groups, empty or not, reading its offset on the host) costs
a dozen ops and ``2 * E`` group visits for a few tiny GEMVs; HF's per-expert loop costs ten ops
per routed expert. Here the whole layer is about ten ops whatever ``E`` and ``k``, at the price of
copying each slot's weights: so it runs only where those copies are small
(:data:`MAX_GATHER_BYTES`; at HF's mid sizes the weights are read once by the grouped path
instead). Same function and dtype rules as :mod:`moe_kernels.cpu.experts`.
"""

from __future__ import annotations

import torch

from moe_kernels.activations import gated_activation, gated_activation_backward
from moe_kernels.utils import slot_experts

# Slots and gathered weight bytes up to which this path runs.
MAX_SLOTS = 64
MAX_GATHER_BYTES = 1 << 20


def applies(gate_up_proj: torch.Tensor, down_proj: torch.Tensor, ids: torch.Tensor) -> bool:
    """Whether ``ids (T, k)``'s slots are few and the experts small enough to gather."""
    slots = ids.numel()
    per_slot = (gate_up_proj[0].numel() + down_proj[0].numel()) * gate_up_proj.element_size()
    return slots <= MAX_SLOTS and slots * per_slot <= MAX_GATHER_BYTES


def _slots(ids: torch.Tensor, weights: torch.Tensor):
    """``(expert per slot (n,), weight per slot (n,), empty mask or None)``: empty slots (-1)
    read expert 0 with weight 0 (their rows are computed and multiplied away)."""
    flat = ids.reshape(-1)
    slot_weights = weights.reshape(-1)
    if not flat.numel() or min(flat.tolist()) >= 0:  # a few ints: one host read, no tensor op
        return flat, slot_weights, None
    empty = flat < 0
    return flat.clamp(min=0), torch.where(empty, 0.0, slot_weights), empty


def _rows(hidden, gate_up_proj, down_proj, experts, activation, gate_up_bias, down_bias, k):
    """Per slot: ``x (n, H)``, ``h (n, 2I)``, ``act (n, I)``, unweighted output ``y (n, H)``."""
    num_tokens, width = hidden.shape
    x = hidden.unsqueeze(1).expand(num_tokens, k, width).reshape(num_tokens * k, width)
    up = gate_up_proj[experts]  # (n, 2I, H)
    h = torch.bmm(up, x.unsqueeze(-1)).squeeze(-1)
    if gate_up_bias is not None:
        h += gate_up_bias[experts]
    act = gated_activation(h, activation)
    down = down_proj[experts]  # (n, H, I)
    y = torch.bmm(down, act.unsqueeze(-1)).squeeze(-1)
    if down_bias is not None:
        y += down_bias[experts]
    return x, up, h, act, down, y


def _per_expert_sum(like: torch.Tensor, experts: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``rows`` (one per slot) summed by expert into zeros shaped like ``like``, in float32 (one
    rounding to ``like``'s dtype at the end)."""
    return torch.zeros(like.shape, dtype=torch.float32).index_add_(0, experts, rows.float()).to(like.dtype)


def forward(hidden, gate_up_proj, down_proj, weights, ids, activation, gate_up_bias, down_bias, save_h):
    """``(out (T, H), h)`` as :func:`moe_kernels.cpu.experts.fused_experts_forward` returns them
    (``h`` in its expert-sorted layout when ``save_h``)."""
    num_tokens, k = ids.shape
    experts, slot_weights, empty = _slots(ids, weights)
    _, _, h, act, _, y = _rows(hidden, gate_up_proj, down_proj, experts, activation, gate_up_bias, down_bias, k)
    # The token sum of the weighted slot outputs in float32: (T, 1, k) @ (T, k, H).
    hidden_size = hidden.shape[1]
    rows = y.float().view(num_tokens, k, hidden_size)
    out = torch.bmm(slot_weights.view(num_tokens, 1, k), rows).view(num_tokens, hidden_size).to(hidden.dtype)
    width = gate_up_proj.shape[1]
    if not save_h:
        return out, hidden.new_empty((0, width))
    # The saved rows' layout: non-empty slots sorted by expert (stable), then zero rows.
    num_experts = gate_up_proj.shape[0]
    key = slot_experts(ids, num_experts)
    order = torch.argsort(key, stable=True)
    saved = h[order]
    if empty is not None:
        saved[key[order] == num_experts] = 0.0
    return out, saved


def backward(grad_out, hidden, gate_up_proj, down_proj, weights, ids, activation, gate_up_bias, down_bias):
    """The six gradients of :func:`forward`, as
    :func:`moe_kernels.cpu.experts.fused_experts_backward` returns them (the slot rows are
    recomputed: they are few)."""
    num_tokens, k = ids.shape
    experts, slot_weights, empty = _slots(ids, weights)
    x, up, h, act, down, y = _rows(hidden, gate_up_proj, down_proj, experts, activation, gate_up_bias, down_bias, k)
    hidden_size = hidden.shape[1]
    grad_rows = grad_out.to(hidden.dtype).unsqueeze(1).expand(num_tokens, k, hidden_size)
    grad_rows = grad_rows.reshape(num_tokens * k, hidden_size)
    grad_weights = (grad_rows.float() * y).sum(-1)  # float32 products and sum
    if empty is not None:
        grad_weights = torch.where(empty, 0.0, grad_weights)
    grad_y = (grad_rows * slot_weights[:, None]).to(hidden.dtype)
    grad_act = torch.bmm(down.transpose(1, 2), grad_y.unsqueeze(-1)).squeeze(-1)  # (n, I)
    grad_h = gated_activation_backward(grad_act, h, activation)
    grad_x = torch.bmm(up.transpose(1, 2), grad_h.unsqueeze(-1)).squeeze(-1)  # (n, H)
    grad_hidden = grad_x.view(num_tokens, k, hidden_size).sum(1)
    # Weight gradients: each slot's outer product, added into its expert (empty slots add 0).
    grad_down = _per_expert_sum(down_proj, experts, torch.bmm(grad_y.unsqueeze(-1), act.unsqueeze(1)))
    grad_gate_up = _per_expert_sum(gate_up_proj, experts, torch.bmm(grad_h.unsqueeze(-1), x.unsqueeze(1)))
    grad_gate_up_bias = None if gate_up_bias is None else _per_expert_sum(gate_up_bias, experts, grad_h)
    grad_down_bias = None if down_bias is None else _per_expert_sum(down_bias, experts, grad_y)
    return (
        grad_hidden,
        grad_gate_up,
        grad_down,
        grad_weights.view(weights.shape).to(weights.dtype),
        grad_gate_up_bias,
        grad_down_bias,
    )
