"""Layer sensitivity with contrastive normalisation (CoR stage B): how much scaling one MoE layer's
output hurts the hard tokens relative to the easy ones."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from moe_kernels.cor._batches import CalibrationRun, calibration_run
from moe_kernels.cor.settings import DEFAULT_SETTINGS, CalibrationSettings, checked_settings
from moe_kernels.progress import Progress

RATIO_EPS = 1e-6
# The floor of the ratio's denominator, as a share of the layers' mean positive easy sensitivity.
# Without it a layer whose easy tokens do not get worse (easy <= 0, often a noise-level value)
# gets ratio hard / 1e-6 and takes the whole budget; floored, it counts as a layer whose easy
# tokens got worse by half the typical amount.
EASY_FLOOR = 0.5


class LayerSensitivity(NamedTuple):
    """``ratio (L,)``, ``hard (L,)``, ``easy (L,)`` float32: the mean loss increase of the hard /
    easy tokens when layer l's output is scaled by ``1 - delta``, and
    ``ratio`` the Relative Knowledge Intensity (:func:`knowledge_ratio`)."""

    ratio: torch.Tensor
    hard: torch.Tensor
    easy: torch.Tensor


def layer_sensitivity(
    model: nn.Module, batches, token_losses: Callable, settings: CalibrationSettings = DEFAULT_SETTINGS
) -> LayerSensitivity:
    """Per MoE layer ``l``: scale its whole block output (shared expert included) by ``1 - delta``
    and measure the mean loss increase over the hard tokens (``l_t > quantile(l, hard_quantile)``)
    and the easy ones (``l_t < quantile(l, easy_quantile)``), clean losses taken over all
    ``batches`` together. A set without tokens has mean increase 0.

    Batched: every sequence holding a hard or easy token is replicated once per layer in a batch
    of copies, copy ``(s, l)`` with layer ``l`` scaled on its rows only (a forward hook on the
    block, removed afterwards), ``tokens_per_forward // S`` copies per forward. Cost: one clean
    forward per batch, then ``ceil(L * B_used * S / tokens_per_forward)`` forwards of at most
    ``max(tokens_per_forward, S)`` tokens per batch (``B_used``: its sequences with a hard or easy
    token).

    Args:
        model: a model with MoE layers (see :mod:`moe_kernels.cor`), in the mode to analyse (eval).
        batches: an iterable of batches (one tensor or dict is one batch), see :mod:`moe_kernels.cor`.
        token_losses: ``token_losses(model, batch) -> (N,)`` per-token losses, a fixed number per
            sequence, sequence-major, NaN for tokens without a loss.
        settings: a :class:`~moe_kernels.cor.CalibrationSettings`, of which ``hard_quantile``,
            ``easy_quantile``, ``delta``, ``tokens_per_forward`` and ``progress`` are read.
    """
    op = "layer_sensitivity"
    settings = checked_settings(op, settings)
    return sensitivity_from_clean(calibration_run(op, model, batches, token_losses, settings))


def _scale_rows_hook(row_scale: torch.Tensor):
    """A forward hook multiplying the block output's rows by ``row_scale (rows,)`` (in at least
    float32; rows scaled by 1 stay bit-identical). GPT-OSS blocks return a tuple: its first item."""

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        flat = hidden.reshape(-1, hidden.shape[-1])
        if flat.shape[0] != row_scale.numel():
            raise ValueError(
                f"layer_sensitivity: the MoE block returned {flat.shape[0]} rows, expected {row_scale.numel()}"
            )
        compute = torch.promote_types(hidden.dtype, torch.float32)
        scale = row_scale.to(device=hidden.device, dtype=compute)
        scaled = (flat.to(compute) * scale[:, None]).to(hidden.dtype).reshape(hidden.shape)
        return (scaled, *output[1:]) if isinstance(output, tuple) else scaled

    return hook


def sensitivity_from_clean(run: CalibrationRun) -> LayerSensitivity:
    """:func:`layer_sensitivity` given the clean pass and the token masks (``calibrate`` shares them)."""
    op = "layer_sensitivity"
    layers, batches, clean = run.layers, run.batches, run.clean
    num_layers = len(layers)
    hard, easy = run.hard.cpu(), run.easy.cpu()
    sums = torch.zeros(2, num_layers, dtype=torch.float64)
    work, offset = [], 0
    for b in range(len(batches)):
        size, per_seq = clean.sizes[b], clean.losses_per_sequence(b)
        span = slice(offset, offset + size * per_seq)
        hard_b, easy_b = hard[span].view(size, per_seq), easy[span].view(size, per_seq)
        used = (hard_b | easy_b).any(1).nonzero().squeeze(1)  # offline: one host sync per batch
        seq = used.repeat(num_layers)
        layer_of = torch.arange(num_layers).repeat_interleave(used.numel())
        chunk = run.copies_per_forward(b)
        work += [(b, hard_b, easy_b, seq[i : i + chunk], layer_of[i : i + chunk]) for i in range(0, seq.numel(), chunk)]
        offset += size * per_seq
    with Progress(len(work), "CoR layer sensitivity", enabled=run.settings.progress) as bar, torch.no_grad():
        for b, hard_b, easy_b, seq, layer_of in work:
            rows, per_seq = clean.rows[b], clean.losses_per_sequence(b)
            hooks = []
            for layer in layers:
                perturbed = layer_of == layer.index
                if perturbed.any():
                    row_scale = torch.where(perturbed, 1.0 - run.settings.delta, 1.0).double().repeat_interleave(rows)
                    hooks.append((layer.block, _scale_rows_hook(row_scale)))
            losses = run.what_if_losses(b, seq, hooks, op)
            base = clean.losses[b].view(clean.sizes[b], per_seq)[seq]
            increase = losses.view(-1, per_seq) - base
            for row, mask in enumerate((hard_b[seq], easy_b[seq])):
                sums[row].index_add_(0, layer_of, torch.where(mask, increase, 0.0).sum(1))
            bar.update()
    counts = torch.stack([hard.sum(), easy.sum()]).double()
    means = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], 0.0)
    hard_mean, easy_mean = means[0], means[1]
    return LayerSensitivity(knowledge_ratio(hard_mean, easy_mean).float(), hard_mean.float(), easy_mean.float())


def knowledge_ratio(hard: torch.Tensor, easy: torch.Tensor) -> torch.Tensor:
    """The Relative Knowledge Intensity of each layer from its mean loss increases ``hard (L,)``
    and ``easy (L,)``: ``max(hard, 0) / (max(max(easy, 0), EASY_FLOOR * s) + 1e-6)``, ``s`` the
    mean of ``max(easy, 0)`` over the layers (of ``max(hard, 0)`` when no layer's easy tokens get
    worse). The floor keeps a layer whose easy tokens do not get worse from taking the whole
    budget on a noise-level denominator; 0 for every layer when no layer hurts any token (then
    the budget is uniform)."""
    hard_pos, easy_pos = hard.clamp_min(0), easy.clamp_min(0)
    scale = easy_pos.mean()
    scale = torch.where(scale > 0, scale, hard_pos.mean())
    return hard_pos / (torch.maximum(easy_pos, EASY_FLOOR * scale) + RATIO_EPS)
