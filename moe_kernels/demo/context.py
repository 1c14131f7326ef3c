"""What the demo's stages share: the output folder, the device, the mode, the base seed, the corpus,
the seeds' runs (set by the experiments stage) and seed ``base``'s language model (set by the
language-model stage, read by the load-dynamics stage)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moe_kernels.demo.data import Corpus, even_batches, load_corpus
from moe_kernels.demo.model import CharMoELM
from moe_kernels.demo.protocol import PROTOCOLS, Protocol

# Windows per evaluation set of the router statistics, by mode.
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
    def corpus(self) -> Corpus:
        if self._corpus is None:
            self._corpus = load_corpus(PROTOCOLS[self.mode].corpus_chars)
        return self._corpus

    def require_runs(self) -> tuple[list[dict], Protocol]:
        """The seeds' results and the protocol; RuntimeError when the experiments stage did not run."""
        if "runs" not in self.results:
            raise RuntimeError("this stage needs the seeds' runs, whose stage (experiments) did not run or failed")
        return self.results["runs"], self.results["protocol"]

    def eval_batches(self, data: torch.Tensor) -> list:
        batches = even_batches(data, PROTOCOLS[self.mode].size.context, 512, EVAL_WINDOWS[self.mode])
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
