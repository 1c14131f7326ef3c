"""kNN-MoE: the routing memory (faiss or exact torch search, safe save/load)."""

from moe_kernels.knn.memory import RoutingMemory, faiss_available

__all__ = ["RoutingMemory", "faiss_available"]
