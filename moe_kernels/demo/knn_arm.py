"""kNN-MoE in a seed's run: one routing memory per layer built on the fixed prose set (the windows
fine-tuning sees), ``KNNRouter`` settings picked on the calibration windows over the protocol's
grid, then the chosen model.

The memories search exactly with torch (``index="torch"``): at one thread, 1,024 queries over
12,288 keys of dimension 96 took 60-70 ms against faiss ``IndexFlatIP``'s 167-172 ms on this
project's CPU, and the searches were 40% of a seed's time."""

from __future__ import annotations

import copy
import itertools
import time

from moe_kernels.demo.model import CharMoELM, batch_loss, mean_loss
from moe_kernels.demo.protocol import Protocol
from moe_kernels.knn import KNNRouter, build_routing_memory


def _with_knn(pretrained: CharMoELM, memories: dict, n: int, weighting: str, min_confidence: float) -> CharMoELM:
    model = copy.deepcopy(pretrained)
    for name, memory in memories.items():
        block = model.get_submodule(name)
        block.router = KNNRouter(
            block.router.weight,
            memory,
            model.size.k,
            n_neighbors=n,
            routing=block.router.routing,
            weighting=weighting,
            min_confidence=min_confidence,
        )
    return model


def knn_arm(pretrained: CharMoELM, data: list, calibration: list, protocol: Protocol) -> tuple[CharMoELM, dict]:
    """The chosen kNN-MoE model and ``{"entries", "index", "neighbors", "weighting",
    "min_confidence", "calibration_loss", "grid": [...], "reference_loss_before" / "_after",
    "seconds"}`` (seconds: the memory's build)."""
    start = time.perf_counter()
    built = build_routing_memory(
        pretrained,
        data,
        batch_loss,
        steps=protocol.memory_steps,
        lr=protocol.memory_lr,
        index=protocol.memory_index,
        progress=False,
    )
    seconds = time.perf_counter() - start
    grid = []
    best = None
    for n, weighting, floor in itertools.product(
        protocol.knn_neighbors, protocol.knn_weightings, protocol.knn_min_confidence
    ):
        model = _with_knn(pretrained, built.memories, n, weighting, floor)
        row = {"neighbors": n, "weighting": weighting, "min_confidence": floor}
        row["calibration_loss"] = mean_loss(model, calibration)
        grid.append(row)
        if best is None or row["calibration_loss"] < best[1]["calibration_loss"]:
            best = (model, row)
    model, chosen = best
    memory = next(iter(built.memories.values()))
    return model, {
        **chosen,
        "entries": memory.num_entries,
        "index": memory.index_kind,
        "grid": grid,
        "reference_loss_before": built.loss_before,
        "reference_loss_after": built.loss_after,
        "seconds": seconds,
    }
