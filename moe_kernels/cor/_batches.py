"""Calibration batches and the forwards CoR runs on them: selecting sequence rows of an opaque
batch (to replicate it with a different intervention in each copy), the clean pass, temporary
forward hooks, and the what-if forwards.

A *batch* is a tensor, or a (nested) dict / list / tuple of tensors, whose tensors with the
batch's leading size are indexed along their first dimension (the sequences); anything else is
passed through unchanged. The batch's leading size ``B`` is that of its first tensor. The MoE
blocks see the ``B * S`` rows of a batch flattened batch-major (sequence ``b``'s rows are
``b * S ... b * S + S - 1``), and ``token_losses(model, batch)`` returns ``B * n`` losses, also
sequence-major. Sequences of one batch must not interact (true of every language model), which is
what lets each copy of a sequence carry its own intervention.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from moe_kernels.cor._layers import MoELayer, find_moe_layers
from moe_kernels.cor.losses import stratify
from moe_kernels.cor.settings import CalibrationSettings


def as_batch_list(batches, op: str) -> list:
    """``batches`` as a non-empty list (one tensor or dict is one batch)."""
    if isinstance(batches, (torch.Tensor, Mapping)):
        return [batches]
    try:
        batch_list = list(batches)
    except TypeError:
        raise TypeError(f"{op}: batches must be an iterable of batches, got {type(batches).__name__}") from None
    if not batch_list:
        raise ValueError(f"{op}: batches is empty")
    return batch_list


def _first_tensor(batch) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        found = _first_tensor(value)
        if found is not None:
            return found
    return None


def batch_size(batch, op: str) -> int:
    """The leading size (sequences) of ``batch``."""
    first = _first_tensor(batch)
    if first is None or first.dim() == 0:
        raise TypeError(f"{op}: a batch must be a tensor or a dict/list/tuple holding tensors, got {type(batch)}")
    return first.shape[0]


def select_rows(batch, index: torch.Tensor, size: int):
    """``batch`` with every tensor whose leading size is ``size`` indexed by ``index (n,)`` int64
    along dim 0 (repeats allowed: that is how a sequence is replicated)."""
    if isinstance(batch, torch.Tensor):
        if batch.dim() > 0 and batch.shape[0] == size:
            return batch.index_select(0, index.to(batch.device))
        return batch
    if isinstance(batch, Mapping):
        return {key: select_rows(value, index, size) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(select_rows(value, index, size) for value in batch)
    return batch


@contextlib.contextmanager
def forward_hooks(hooks: Iterable[tuple[nn.Module, Callable]]):
    """Register ``(module, hook)`` forward hooks for the block; removed in any case."""
    handles = []
    try:
        for module, hook in hooks:
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def call_losses(model: nn.Module, batch, token_losses: Callable, expected: int | None, op: str) -> torch.Tensor:
    """``token_losses(model, batch)`` as a float64 ``(N,)`` CPU tensor, checked (``expected``: N).
    The copy to the host is a sync per forward: calibration is offline work, and the bookkeeping
    of what-ifs is done on the host."""
    losses = token_losses(model, batch)
    if not isinstance(losses, torch.Tensor) or losses.dim() != 1 or not losses.is_floating_point():
        got = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise TypeError(f"{op}: token_losses must return a 1-D floating tensor (N,), got {got}")
    if expected is not None and losses.numel() != expected:
        raise ValueError(
            f"{op}: token_losses returned {losses.numel()} losses for a batch of replicated sequences, expected "
            f"{expected} (a fixed number of losses per sequence, sequence-major)"
        )
    return losses.detach().double().cpu()


@dataclass
class CleanPass:
    """The unmodified model on every batch: ``losses[b] (N_b,)`` float64 (NaN: no loss),
    ``ids[b][l] (T_b, k_l)`` int64 (the experts each routed row selected at layer l, when
    recorded), ``sizes[b]`` = B_b, ``rows[b]`` = S_b (routed rows per sequence)."""

    losses: list[torch.Tensor]
    ids: list[list[torch.Tensor]]
    sizes: list[int]
    rows: list[int]

    def losses_per_sequence(self, b: int) -> int:
        return self.losses[b].numel() // self.sizes[b]

    def all_losses(self) -> torch.Tensor:
        return torch.cat(self.losses)


def clean_pass(model: nn.Module, layers: list[MoELayer], batches: list, token_losses: Callable, op: str) -> CleanPass:
    """One forward per batch with hooks recording each layer's ids (one host sync per batch, to
    read the row counts: calibration is offline work)."""
    result = CleanPass([], [], [], [])
    for batch in batches:
        size = batch_size(batch, op)
        recorded: list[torch.Tensor | None] = [None] * len(layers)

        def record(layer: MoELayer, recorded=recorded):
            def hook(module, args, output):
                recorded[layer.index] = output[layer.weights_at + 1].detach().long().cpu()

            return hook

        with torch.no_grad(), forward_hooks((layer.router, record(layer)) for layer in layers):
            losses = call_losses(model, batch, token_losses, None, op)
        if any(ids is None for ids in recorded):
            missing = [layers[i].name for i, ids in enumerate(recorded) if ids is None]
            raise ValueError(f"{op}: token_losses did not run the MoE layers {missing} (does it call the model?)")
        num_rows = {ids.shape[0] for ids in recorded}
        if len(num_rows) != 1 or next(iter(num_rows)) % size or losses.numel() % size:
            raise ValueError(
                f"{op}: a batch of {size} sequences was routed as {sorted(num_rows)} rows per layer with "
                f"{losses.numel()} losses; each layer must route the same B * S rows and token_losses return B * n"
            )
        result.losses.append(losses)
        result.ids.append(recorded)
        result.sizes.append(size)
        result.rows.append(next(iter(num_rows)) // size)
    return result


def copies_per_forward(rows_per_sequence: int, tokens_per_forward: int) -> int:
    """How many sequence copies one forward holds: ``tokens_per_forward // S``, at least 1."""
    return max(1, tokens_per_forward // rows_per_sequence)


class CalibrationRun(NamedTuple):
    """What the calibration stages share: the ``model``, its MoE ``layers``, the ``batches`` (a
    list), ``token_losses``, the ``settings``, the ``clean`` pass over the batches and the ``hard``
    / ``easy`` token masks ``(N,)`` bool over all their clean losses."""

    model: nn.Module
    layers: list[MoELayer]
    batches: list
    token_losses: Callable
    settings: CalibrationSettings
    clean: CleanPass
    hard: torch.Tensor
    easy: torch.Tensor

    def copies_per_forward(self, b: int) -> int:
        """How many sequence copies of batch ``b`` one what-if forward holds: ``tokens_per_forward
        // S_b``, at least 1."""
        return copies_per_forward(self.clean.rows[b], self.settings.tokens_per_forward)

    def what_if_losses(self, b: int, sequences: torch.Tensor, hooks, op: str) -> torch.Tensor:
        """One forward of batch ``b``'s ``sequences (n,)`` int64 (repeats allowed: each copy
        carries its own intervention) with the forward ``hooks`` in place: ``(n * losses per
        sequence,)`` float64 on the host (:func:`call_losses`)."""
        sub = select_rows(self.batches[b], sequences, self.clean.sizes[b])
        expected = sequences.numel() * self.clean.losses_per_sequence(b)
        with forward_hooks(hooks):
            return call_losses(self.model, sub, self.token_losses, expected, op)


def calibration_run(
    op: str, model: nn.Module, batches, token_losses: Callable, settings: CalibrationSettings, check_layers=None
) -> CalibrationRun:
    """The start of every calibration stage: ``batches`` as a list, the model's MoE layers
    (``check_layers(layers)``, when given, refuses what the stage cannot take before any forward),
    the clean pass and the token split by the settings' quantiles
    (:func:`~moe_kernels.cor.losses.stratify`)."""
    batches = as_batch_list(batches, op)
    layers = find_moe_layers(model, op)
    if check_layers is not None:
        check_layers(layers)
    clean = clean_pass(model, layers, batches, token_losses, op)
    hard, easy = stratify(clean.all_losses(), settings.hard_quantile, settings.easy_quantile, op)
    return CalibrationRun(model, layers, batches, token_losses, settings, clean, hard, easy)
