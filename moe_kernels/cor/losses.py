"""Per-token losses and the hard / easy split of the calibration tokens."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from moe_kernels.config import is_finite_number

IGNORE_INDEX = -100


def causal_lm_token_losses(model: nn.Module, batch) -> torch.Tensor:
    """Next-token cross-entropy of a causal LM, one loss per input position.

    ``batch``: ``input_ids (B, S)`` int, or a dict with ``input_ids``, optional ``attention_mask
    (B, S)`` (0 = padding) and optional ``labels (B, S)`` (default ``input_ids``; -100 = no
    loss); the other entries are passed to ``model`` as keywords, ``labels`` is not (so the model
    does not compute its own loss). ``model(...)`` returns logits ``(B, S, V)`` or an object with
    ``.logits`` (HF) or a tuple whose first item they are.

    Returns ``(B * S,)``, float32 (float64 for a float64 model): position ``i`` of sequence ``b``
    holds ``-log p(labels[b, i + 1] | ..., i)``, so loss ``t`` belongs to routed row ``t`` (what
    :func:`moe_kernels.cor.expert_impact` needs). Positions without a loss are NaN: the last of
    each sequence, those whose next label is -100, and those where either the position or the next
    one is padding; CoR leaves NaN losses out of every statistic.
    """
    if isinstance(batch, torch.Tensor):
        inputs, labels, mask = {"input_ids": batch}, batch, None
    elif isinstance(batch, Mapping) and "input_ids" in batch:
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        labels, mask = batch.get("labels", batch["input_ids"]), batch.get("attention_mask")
    else:
        raise TypeError(
            "causal_lm_token_losses: batch must be input_ids (B, S) or a dict with 'input_ids', "
            f"got {type(batch).__name__}"
        )
    output = model(**inputs)
    logits = getattr(output, "logits", None)
    if logits is None:
        logits = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[:2] != labels.shape:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(
            f"causal_lm_token_losses: expected logits (B, S, V) with (B, S) = {tuple(labels.shape)}, got {got}"
        )
    compute = torch.promote_types(logits.dtype, torch.float32)
    num_seqs, seq_len, vocab = logits.shape
    target = labels[:, 1:].long()
    valid = target != IGNORE_INDEX
    if mask is not None:
        valid &= (mask[:, 1:] != 0) & (mask[:, :-1] != 0)
    losses = F.cross_entropy(
        logits[:, :-1].to(compute).reshape(-1, vocab), target.clamp_min(0).reshape(-1), reduction="none"
    ).reshape(num_seqs, seq_len - 1)
    losses = torch.where(valid, losses, torch.full_like(losses, float("nan")))
    last = torch.full((num_seqs, 1), float("nan"), dtype=compute, device=logits.device)
    return torch.cat([losses, last], dim=1).reshape(-1)


def check_quantiles(op: str, hard_quantile, easy_quantile=None) -> None:
    """``ValueError`` unless the quantiles are numbers in (0, 1) with ``easy <= hard``."""
    for name, value in (("hard_quantile", hard_quantile), ("easy_quantile", easy_quantile)):
        if value is None and name == "easy_quantile":
            continue
        if not is_finite_number(value) or not 0 < value < 1:
            raise ValueError(f"{op}: {name} must be a number in (0, 1), got {value!r}")
    if easy_quantile is not None and easy_quantile > hard_quantile:
        raise ValueError(f"{op}: easy_quantile must be <= hard_quantile={hard_quantile}, got {easy_quantile}")


def stratify(losses: torch.Tensor, hard_quantile: float, easy_quantile: float | None, op: str):
    """Hard and easy token masks ``(N,)`` bool over ``losses (N,)``: ``l > quantile(l, hard)`` and
    ``l < quantile(l, easy)``, quantiles (``torch.quantile``, linear) over the finite losses
    (NaN losses are in neither set). ``easy`` is None when ``easy_quantile`` is."""
    finite = torch.isfinite(losses)
    values = losses[finite].double()
    if values.numel() == 0:
        raise ValueError(f"{op}: token_losses returned no finite loss over the calibration batches")
    hard = finite & (losses.double() > torch.quantile(values, hard_quantile))
    if easy_quantile is None:
        return hard, None
    easy = finite & (losses.double() < torch.quantile(values, easy_quantile))
    return hard, easy
