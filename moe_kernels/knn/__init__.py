"""kNN-MoE: the routing memory (faiss or exact torch search, safe save/load) and the gate that
mixes retrieved routing logits into a frozen router's."""

from moe_kernels.knn.memory import RoutingMemory, faiss_available
from moe_kernels.knn.router import KNNRouter

__all__ = ["KNNRouter", "RoutingMemory", "faiss_available"]
