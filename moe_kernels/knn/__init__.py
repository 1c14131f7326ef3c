"""kNN-MoE: the routing memory (faiss or exact torch search, safe save/load) and the gate that
mixes retrieved routing logits into a frozen router's."""

from moe_kernels.knn.build import MemoryBuild, build_routing_memory
from moe_kernels.knn.memory import RoutingMemory, faiss_available
from moe_kernels.knn.router import KNNRouter

__all__ = ["KNNRouter", "MemoryBuild", "RoutingMemory", "build_routing_memory", "faiss_available"]
