"""The demo's data: text that ships with Python, as byte-level next-character windows.

- **code** (the original domain): the source of a fixed list of standard-library modules;
- **prose** (the shifted domain): the English reference topics of ``pydoc_data.topics``.

Each corpus is split into contiguous parts (no window crosses a split): code into train and
held-out; prose into a pretraining part (the rare prose of the pretraining mix), a reference part
(the new domain's training data: kNN memories and fine-tuning), a calibration part (every choice
a method makes, and Counterfactual Routing's calibration) and held-out. Windows are drawn with a
seeded generator, so a seed fixes every batch.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

import torch

VOCAB = 128  # bytes above 127 map to 127
CODE_MODULES = (
    "argparse",
    "json.decoder",
    "textwrap",
    "string",
    "dataclasses",
    "fractions",
    "functools",
    "heapq",
    "bisect",
    "shlex",
    "calendar",
    "difflib",
)


def encode(text: str) -> torch.Tensor:
    """``(len,)`` int64 character codes, clipped to the vocabulary."""
    data = torch.frombuffer(bytearray(text.encode("ascii", "replace")), dtype=torch.uint8).long()
    return data.clamp_max(VOCAB - 1)


def code_text(max_chars: int) -> str:
    parts = [inspect.getsource(importlib.import_module(name)) for name in CODE_MODULES]
    return "\n".join(parts)[:max_chars]


def prose_text(max_chars: int) -> str:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return "\n".join(topics[key] for key in sorted(topics))[:max_chars]


@dataclass(frozen=True)
class Corpus:
    """Every split as a ``(len,)`` int64 tensor of character codes."""

    code_train: torch.Tensor
    code_held_out: torch.Tensor
    prose_pretrain: torch.Tensor
    prose_reference: torch.Tensor
    prose_calibration: torch.Tensor
    prose_held_out: torch.Tensor

    def sizes(self) -> dict:
        return {name: int(getattr(self, name).numel()) for name in self.__dataclass_fields__}


def load_corpus(max_chars: int) -> Corpus:
    """Both corpora, at most ``max_chars`` characters each, split 90/10 (code) and 5/55/15/25
    (prose: pretraining, reference, calibration, held-out)."""
    code = encode(code_text(max_chars))
    prose = encode(prose_text(max_chars))
    code_cut = int(0.9 * code.numel())
    cuts = [int(share * prose.numel()) for share in (0.05, 0.6, 0.75)]
    parts = torch.tensor_split(prose, cuts)
    return Corpus(code[:code_cut], code[code_cut:], *parts)


def windows(data: torch.Tensor, context: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(contexts (B, context) int64, targets (B,) int64)``: the ``context`` characters before each
    position's target character."""
    chunk = data[positions[:, None] + torch.arange(context + 1)]
    return chunk[:, :context], chunk[:, context]


def random_batches(data: torch.Tensor, context: int, batch: int, count: int, seed: int) -> list:
    """``count`` batches of ``batch`` windows at seeded random positions."""
    generator = torch.Generator().manual_seed(seed)
    high = data.numel() - context - 1
    return [windows(data, context, torch.randint(0, high, (batch,), generator=generator)) for _ in range(count)]


def mixed_batches(
    main: torch.Tensor, rare: torch.Tensor, rare_share: float, context: int, batch: int, count: int, seed: int
) -> list:
    """``count`` batches of ``batch`` windows at seeded random positions, ``round(rare_share *
    batch)`` of each from ``rare`` (the last rows) and the rest from ``main``."""
    rare_rows = round(rare_share * batch)
    main_batches = random_batches(main, context, batch - rare_rows, count, seed)
    if rare_rows == 0:
        return main_batches
    rare_batches = random_batches(rare, context, rare_rows, count, seed + 1)
    return [tuple(torch.cat(parts) for parts in zip(a, b)) for a, b in zip(main_batches, rare_batches)]


def all_batches(data: torch.Tensor, context: int, batch: int) -> list:
    """Every window of the split (each position's target once), in order, in batches of ``batch``:
    the held-out evaluation sets."""
    positions = torch.arange(data.numel() - context)
    return [windows(data, context, positions[i : i + batch]) for i in range(0, positions.numel(), batch)]


def even_batches(data: torch.Tensor, context: int, batch: int, max_windows: int) -> list:
    """Windows at evenly spaced positions over the whole split (at most ``max_windows``), in
    batches of ``batch``: the evaluation sets."""
    high = data.numel() - context - 1
    positions = torch.linspace(0, high - 1, min(max_windows, high)).long()
    return [windows(data, context, positions[i : i + batch]) for i in range(0, positions.numel(), batch)]
