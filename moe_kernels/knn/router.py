"""``KNNRouter``: a frozen router's gate with kNN-MoE retrieval mixed into its logits."""

from __future__ import annotations

import torch
from torch import nn

from moe_kernels.config import KnnMixing, RoutingConfig, check_mixing, integer, routing_or_default
from moe_kernels.functional import knn_mix, knn_route, softmax_topk
from moe_kernels.knn.memory import RoutingMemory
from moe_kernels.layers import RUNS_TAPS, run_taps
from moe_kernels.utils import check_backend


class KNNRouter(nn.Module):
    """Drop-in gate: ``forward(hidden (..., H)) -> (weights (..., k) float32, ids (..., k) int32)``.

    Per token: the frozen router's logits ``z = hidden @ weight.T``; the ``n_neighbors`` most
    similar cases of ``memory`` (searched with ``hidden`` as the query); their stored logits mixed
    into ``z`` (confidence = mean similarity, 0 below ``min_confidence``, where the frozen router
    is used unchanged; ``weighting``, ``temperature``, ``min_confidence``: the
    :class:`~moe_kernels.config.KnnMixing`, held as ``mixing``) and routed with ``routing`` (a
    :class:`~moe_kernels.RoutingConfig`), all in one fused op, :func:`moe_kernels.knn_route`.

    ``weight (E, H)`` is the frozen router's weight (shared, not copied; no gradient is asked of
    it). The search runs where the memory's index lives: with CPU faiss a CUDA forward copies the
    queries to the host and waits for them; a GPU build of faiss searches a copy of the index on
    the queries' GPU (:meth:`RoutingMemory.search`). Either way faiss allocates per search, so
    this gate is not CUDA-graph capturable; the exact torch search (``index="torch"``) stays on
    the device. ``last_confidence (...)`` float32 holds the last forward's per-token confidence
    (0 where the frozen router decided alone).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        memory: RoutingMemory,
        k: int,
        *,
        n_neighbors: int = 8,
        routing: RoutingConfig | None = None,
        weighting: str = "similarity",
        temperature: float = 0.1,
        min_confidence: float = 0.0,
        backend: str = "auto",
    ):
        super().__init__()
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
            got = f"{weight.dtype} {tuple(weight.shape)}" if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise TypeError(f"KNNRouter: weight must be a float (E, H) tensor, got {got}")
        if not isinstance(memory, RoutingMemory):
            raise TypeError(f"KNNRouter: memory must be a moe_kernels.knn.RoutingMemory, got {type(memory).__name__}")
        k, n_neighbors = integer("KNNRouter", "k", k), integer("KNNRouter", "n_neighbors", n_neighbors)
        if n_neighbors < 1:
            raise ValueError(f"KNNRouter: n_neighbors must be an int >= 1, got {n_neighbors}")
        check_backend("KNNRouter", backend)
        num_experts, hidden_size = weight.shape
        if memory.key_dim != hidden_size or memory.num_experts != num_experts:
            raise ValueError(
                f"KNNRouter: the memory holds keys of dim {memory.key_dim} and logits over {memory.num_experts} "
                f"experts; the router weight (E, H) = {tuple(weight.shape)} needs {hidden_size} and {num_experts}"
            )
        self.weight = weight
        self.memory = memory
        self.k = k
        self.n_neighbors = n_neighbors
        check_mixing("KNNRouter", weighting, temperature, min_confidence)
        self.mixing = KnnMixing(weighting, temperature, min_confidence)
        self.routing = routing_or_default("KNNRouter", routing)
        self.routing.check(num_experts, k, "KNNRouter")
        self.backend = backend
        self.register_buffer("memory_logits", memory.values.to(weight.device), persistent=False)
        self.last_confidence: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, ids, _ = self.route(hidden)
        return weights, ids

    def route(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``forward`` with the frozen router's logits ``(..., E)`` (after any tap of
        :mod:`moe_kernels.layers`) as a third output. Forced ids (routing replay) take the
        weights of :func:`moe_kernels.knn_mix`'s mixed logits for those ids."""
        lead, hidden_size = hidden.shape[:-1], hidden.shape[-1]
        flat = hidden.reshape(-1, hidden_size)
        neighbors, sims = self.memory.search(flat, self.n_neighbors)
        # An approximate index may find fewer than n neighbours (faiss id -1): such a slot counts
        # as similarity 0, which lowers the confidence, and points at a valid row it never weighs.
        missing = neighbors < 0
        device = self.weight.device
        neighbors = torch.where(missing, torch.zeros_like(neighbors), neighbors).to(device)
        sims = torch.where(missing, torch.zeros_like(sims), sims).to(device)
        mixing = dict(
            weighting=self.mixing.weighting,
            temperature=self.mixing.temperature,
            min_confidence=self.mixing.min_confidence,
            backend=self.backend,
        )

        def select(logits, forced):
            if forced is None:
                options = dict(routing=self.routing, **mixing)
                weights, ids, conf = knn_route(logits, neighbors, sims, self.memory_logits, self.k, **options)
            else:
                mixed, conf = knn_mix(logits, self.memory_logits[neighbors.long()], sims, **mixing)
                weights, ids = softmax_topk(mixed, self.k, routing=self.routing, ids=forced, backend=self.backend)
            self.last_confidence = conf.detach().reshape(lead)
            return weights, ids

        weights, ids, logits = run_taps(self, nn.functional.linear(flat, self.weight), self.k, select)
        return weights.reshape(*lead, self.k), ids.reshape(*lead, self.k), logits.reshape(*lead, -1)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.weight.shape[0]}, k={self.k}, n_neighbors={self.n_neighbors}, "
            f"memory_entries={self.memory.num_entries}, {self.mixing}, routing={self.routing}"
        )


setattr(KNNRouter, RUNS_TAPS, True)
