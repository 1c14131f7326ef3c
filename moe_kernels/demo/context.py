"""What the demo's stages share: the output folder, the device, the mode, the seed, the corpus and
the trained language model (set by the language-model stage, read by the later ones)."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moe_kernels.demo.data import Corpus, even_batches, load_corpus, random_batches
from moe_kernels.demo.model import SIZES, CharMoELM, ModelSize

# Characters of each corpus, and windows per evaluation set, by mode.
CORPUS_CHARS = {"quick": 120_000, "full": 400_000}
EVAL_WINDOWS = {"quick": 2048, "full": 8192}


@dataclass
class DemoContext:
    out: Path
    device: torch.device
    quick: bool
    seed: int
    thread_count: int = 0
    model: CharMoELM | None = None
    results: dict = field(default_factory=dict)  # numbers a later stage needs (e.g. the claims)
    _corpus: Corpus | None = None

    @property
    def mode(self) -> str:
        return "quick" if self.quick else "full"

    @property
    def size(self) -> ModelSize:
        return SIZES["quick" if self.quick else self.device.type]

    @property
    def corpus(self) -> Corpus:
        if self._corpus is None:
            self._corpus = load_corpus(CORPUS_CHARS[self.mode])
        return self._corpus

    def trained_model(self) -> CharMoELM:
        """A fresh copy of the trained LM (each method changes its own copy)."""
        if self.model is None:
            raise RuntimeError("this stage needs the language model, whose stage did not run or failed")
        return copy.deepcopy(self.model)

    def train_batches(self, data: torch.Tensor, count: int, seed_offset: int) -> list:
        batches = random_batches(data, self.size.context, self.size.batch, count, self.seed * 1000 + seed_offset)
        return [tuple(t.to(self.device) for t in batch) for batch in batches]

    def eval_batches(self, data: torch.Tensor) -> list:
        batches = even_batches(data, self.size.context, 512, EVAL_WINDOWS[self.mode])
        return [tuple(t.to(self.device) for t in batch) for batch in batches]

    @contextlib.contextmanager
    def threads(self):
        """On a CPU, one thread for the whole demo: the models are small (a few-hundred-wide matmuls
        gain nothing from more), and one thread makes torch's CPU kernels deterministic and free
        of the scheduler stalls a shared host gives to parallel regions. Restored afterwards."""
        previous = torch.get_num_threads()
        if self.device.type == "cpu":
            torch.set_num_threads(1)
        self.thread_count = torch.get_num_threads()
        try:
            yield
        finally:
            torch.set_num_threads(previous)
