"""Counterfactual Expert Impact (CoR stage C), batched: many (token, layer, expert) what-ifs per
forward pass through an override of the routing weights the MoE blocks use."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from moe_kernels.cor._batches import CalibrationRun, calibration_run
from moe_kernels.cor._layers import MoELayer, uniform_num_experts
from moe_kernels.cor.settings import DEFAULT_SETTINGS, CalibrationSettings, checked_settings
from moe_kernels.progress import Progress


def expert_impact(
    model: nn.Module, batches, token_losses: Callable, settings: CalibrationSettings = DEFAULT_SETTINGS
) -> torch.Tensor:
    """The raw counterfactual expert impact ``CEI (L, E)`` float32.

    For every hard token ``t`` (``l_t > quantile(l, hard_quantile)`` over all ``batches``), layer
    ``l`` and expert ``e`` that ``t`` selected at ``l`` in the clean run: the loss of ``t`` when
    only ``t``'s routing at ``l`` changes, ``e``'s weight set to 0 and every other selected
    expert's weight ``g_i`` multiplied by ``sum_S g / sum_{S \\ e} g`` (the token's routed output
    at ``l`` is zero when no other selected expert has weight); later layers route as usual from
    the changed hidden state. ``CEI[l, e]`` is the mean of ``ablated - clean`` loss over those
    tokens, 0 where no hard token selected ``e``.

    Batched: each what-if runs in its own copy of the token's sequence, and a batch of copies
    (``tokens_per_forward // S`` of them) goes through one forward, a forward hook on each router
    rewriting the weights of the one ablated row of each copy (hooks removed afterwards). A copy
    carries one what-if because an ablation at position ``t`` changes the later positions of its
    sequence; copies of one sequence never interact. ``token_losses`` must return one loss per
    routed row (loss ``t`` = row ``t``, as :func:`causal_lm_token_losses` does).

    Cost: ``W = sum_t sum_l k_l`` what-ifs (``H * sum_l k_l`` for ``H`` hard tokens); one clean
    forward per batch, then per batch ``ceil(W_b / (tokens_per_forward // S_b))`` forwards of
    ``tokens_per_forward // S_b`` sequence copies, i.e. at most ``max(tokens_per_forward, S_b)``
    tokens per forward and ``W * S`` tokens in all, against ``W`` forwards of ``B * S`` tokens for
    one forward per what-if on the whole batch.

    Args:
        model, batches, token_losses: as for :func:`layer_sensitivity` (one loss per routed row).
        settings: a :class:`~moe_kernels.cor.CalibrationSettings`, of which ``hard_quantile``,
            ``tokens_per_forward`` and ``progress`` are read.
    """
    op = "expert_impact"
    settings = checked_settings(op, settings)
    run = calibration_run(op, model, batches, token_losses, settings, lambda layers: uniform_num_experts(layers, op))
    return impact_from_clean(run)


def ablate_weights(weights: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """A copy of ``weights (T, k)`` where, in each row ``rows[i]``, the slot holding expert
    ``experts[i]`` (``ids (T, k)``) gets weight 0 and the others are scaled by
    ``total / rest`` (``rest`` = the sum of the others; all zero when ``rest == 0``). Computed in
    at least float32, returned in ``weights``' dtype; rows not listed are untouched."""
    compute = torch.promote_types(weights.dtype, torch.float32)
    gates = weights[rows].to(compute)
    hit = ids[rows].long() == experts[:, None]
    total = gates.sum(-1, keepdim=True)
    rest = gates.masked_fill(hit, 0).sum(-1, keepdim=True)
    factor = torch.where(rest != 0, total / torch.where(rest != 0, rest, 1), 0)
    out = weights.clone()
    out[rows] = torch.where(hit, 0, gates * factor).to(weights.dtype)
    return out


def _ablation_hook(weights_at: int, rows: torch.Tensor, experts: torch.Tensor):
    """A router forward hook applying :func:`ablate_weights` to its output's weights."""

    def hook(module, args, output):
        weights, ids = output[weights_at], output[weights_at + 1]
        changed = list(output)
        changed[weights_at] = ablate_weights(weights, ids, rows.to(weights.device), experts.to(ids.device))
        return tuple(changed)

    return hook


def _what_ifs(layers: list[MoELayer], ids: list[torch.Tensor], hard_rows: torch.Tensor):
    """Every (row, layer, expert) to ablate: ``rows (W,)``, ``layer_of (W,)``, ``experts (W,)``
    int64, row-major (all of a token's what-ifs together), empty slots (id -1) left out."""
    slot_layer = torch.cat([torch.full((ids[layer.index].shape[1],), layer.index) for layer in layers])
    slot = torch.cat([torch.arange(ids[layer.index].shape[1]) for layer in layers])
    rows = hard_rows.repeat_interleave(slot_layer.numel())
    layer_of = slot_layer.repeat(hard_rows.numel())
    slot_of = slot.repeat(hard_rows.numel())
    experts = torch.empty_like(rows)
    for layer in layers:
        mine = layer_of == layer.index
        experts[mine] = ids[layer.index][rows[mine], slot_of[mine]]
    keep = experts >= 0
    return rows[keep], layer_of[keep], experts[keep]


def impact_from_clean(run: CalibrationRun) -> torch.Tensor:
    """:func:`expert_impact` given the clean pass and the hard-token mask (``calibrate`` shares them)."""
    op = "expert_impact"
    layers, batches, clean = run.layers, run.batches, run.clean
    num_experts = uniform_num_experts(layers, op)
    hard = run.hard.cpu()
    sums = torch.zeros(len(layers), num_experts, dtype=torch.float64)
    counts = torch.zeros(len(layers), num_experts, dtype=torch.float64)
    work, offset = [], 0
    for b in range(len(batches)):
        size, rows_per_seq, per_seq = clean.sizes[b], clean.rows[b], clean.losses_per_sequence(b)
        if per_seq != rows_per_seq:
            raise ValueError(
                f"{op}: token_losses returned {per_seq} losses per sequence but the MoE layers route {rows_per_seq} "
                "rows per sequence; expert_impact needs one loss per routed row (loss t = row t, NaN for none)"
            )
        hard_rows = hard[offset : offset + size * per_seq].nonzero().squeeze(1)
        rows, layer_of, experts = _what_ifs(layers, clean.ids[b], hard_rows)
        chunk = run.copies_per_forward(b)
        for i in range(0, rows.numel(), chunk):
            work.append((b, rows[i : i + chunk], layer_of[i : i + chunk], experts[i : i + chunk]))
        offset += size * per_seq
    with Progress(len(work), "CoR expert impact", enabled=run.settings.progress) as bar, torch.no_grad():
        for b, rows, layer_of, experts in work:
            rows_per_seq = clean.rows[b]
            seq, pos = rows // rows_per_seq, rows % rows_per_seq
            copy_rows = torch.arange(rows.numel()) * rows_per_seq + pos  # the ablated row of each copy
            hooks = []
            for layer in layers:
                mine = layer_of == layer.index
                if mine.any():
                    hooks.append((layer.router, _ablation_hook(layer.weights_at, copy_rows[mine], experts[mine])))
            losses = run.what_if_losses(b, seq, hooks, op)
            increase = losses[copy_rows] - clean.losses[b][rows]
            sums.index_put_((layer_of, experts), increase, accumulate=True)
            counts.index_put_((layer_of, experts), torch.ones_like(increase), accumulate=True)
            bar.update()
    return torch.where(counts > 0, sums / counts.clamp_min(1), 0.0).float()
