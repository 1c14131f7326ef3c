"""Registry of real models' MoE shapes, shared by the benchmarks, ``moe-kernels validate`` and the
ahead-of-time compile check (which compiles every kernel configuration these shapes select).

Routing settings follow each model's released config and HF modelling code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moe_kernels.config import DEFAULT_ROUTING, RoutingConfig


@dataclass(frozen=True)
class RoutingShape:
    """One model's router: ``num_experts`` routed experts, ``k`` per token, the
    :class:`~moe_kernels.RoutingConfig` that reproduces its routing formula, and whether it has a
    selection bias (DeepSeek-V3's correction bias)."""

    model: str
    num_experts: int
    k: int
    routing: RoutingConfig = field(default=DEFAULT_ROUTING)
    has_bias: bool = False

    @property
    def label(self) -> str:
        return f"{self.model} E={self.num_experts} k={self.k}"


ROUTING_SHAPES: tuple[RoutingShape, ...] = (
    RoutingShape("Mixtral-8x7B", 8, 2, RoutingConfig.renormalize()),
    RoutingShape("Qwen1.5-MoE-A2.7B", 60, 4),
    RoutingShape("OLMoE-1B-7B", 64, 8),
    RoutingShape("Qwen3-30B-A3B", 128, 8, RoutingConfig.renormalize()),
    RoutingShape("DeepSeek-V2", 160, 6, RoutingConfig.deepseek_v2()),
    RoutingShape("DeepSeek-V3", 256, 8, RoutingConfig.deepseek_v3(), has_bias=True),
    RoutingShape("Kimi-K2", 384, 8, RoutingConfig.deepseek_v3(num_groups=1, topk_groups=1, scale=2.827), has_bias=True),
    RoutingShape("Qwen3-Next-80B-A3B", 512, 10, RoutingConfig.renormalize()),
)

# Token counts of the routing benchmarks: decode batches to long prefill / training steps.
ROUTING_TOKENS: tuple[int, ...] = (1, 8, 64, 512, 4096, 16384, 65536)

# ProbMoE benchmark problems: (E, k) from Mixtral-sized to Qwen3-Next-sized routers, and the
# token counts of one decode token, a decode batch, a prefill chunk and a training step.
PROBMOE_SHAPES: tuple[tuple[int, int], ...] = ((8, 2), (64, 8), (128, 8), (256, 8), (512, 10))
PROBMOE_TOKENS: tuple[int, ...] = (1, 64, 4096, 65536)


@dataclass(frozen=True)
class ExpertShape:
    """One model's routed experts: ``num_experts`` gated MLPs ``hidden -> intermediate ->
    hidden`` with ``k`` per token (public model configs)."""

    model: str
    num_experts: int
    k: int
    hidden: int
    intermediate: int
    activation: str = "silu"

    @property
    def label(self) -> str:
        return f"{self.model} E={self.num_experts} k={self.k} H={self.hidden} I={self.intermediate}"


EXPERT_SHAPES: tuple[ExpertShape, ...] = (
    ExpertShape("Mixtral-8x7B", 8, 2, 4096, 14336),
    ExpertShape("OLMoE-1B-7B", 64, 8, 2048, 1024),
    ExpertShape("Qwen3-30B-A3B", 128, 8, 2048, 768),
    ExpertShape("DeepSeek-V2-Lite", 64, 6, 2048, 1408),
    ExpertShape("GPT-OSS-120b", 128, 4, 2880, 2880, "gpt_oss"),
    ExpertShape("Qwen3-Next-style", 512, 10, 2048, 512),
    ExpertShape("DeepSeek-V3 (32 local experts)", 32, 8, 7168, 2048),
)
# Token counts of the experts benchmarks: decode (CUDA graph) and prefill / training.
EXPERT_DECODE_TOKENS: tuple[int, ...] = (1, 8, 64, 256)
EXPERT_PREFILL_TOKENS: tuple[int, ...] = (4096, 16384, 32768)
