"""The one registry of the transformers MoE families this integration patches: where each family's
MoE blocks and routers are, how its router is patched and routes, and the sizes its tests and
benchmarks build it at (a tiny 2-3 layer model, and the public model's MoE layer). The
integration (:func:`~moe_kernels.integrations.transformers.apply_moe_kernels`), its tests
(``moe_kernels.testing.tiny_hf_config``) and the benchmarks (``bench_hf``, ``bench_hf_generate``)
all read it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from moe_kernels.integrations.transformers import routers


@dataclass(frozen=True)
class Family:
    """One transformers MoE family (``model_type``).

    ``config_class``: its transformers config class; ``block``: the MoE block class in
    ``transformers.models.<model_type>.modeling_<model_type>``; ``router_attr``: the block's router
    attribute; ``router_forward``: the router's patched forward; ``routing``: router -> the
    family's :class:`~moe_kernels.RoutingConfig`, read from the model's config;
    ``router_attrs``: what that forward reads of the router besides ``top_k`` and ``weight``;
    ``tiny_sizes``: the config fields of a 2-3 layer test model (on top of
    ``moe_kernels.testing.TINY_HF_SIZES``); ``public_sizes``: the config fields of the public
    model's MoE layer (random weights, for the benchmarks).
    """

    model_type: str
    config_class: str
    block: str
    router_attr: str
    router_forward: Callable
    routing: Callable
    router_attrs: tuple[str, ...]
    tiny_sizes: dict = field(repr=False)
    public_sizes: dict = field(repr=False)

    @property
    def module(self) -> str:
        """The transformers module defining the block: ``transformers.models.<t>.modeling_<t>``."""
        return f"transformers.models.{self.model_type}.modeling_{self.model_type}"


_SOFTMAX_ATTRS = ("hidden_dim", "norm_topk_prob")
_DEEPSEEK_ATTRS = ("hidden_dim", "e_score_correction_bias", "num_group", "topk_group", "norm_topk_prob")

# Qwen3-MoE renormalises and has a dense first layer; DeepSeek-V3 keeps 2 of 4 groups with scale
# 2.5 and a shared expert after a dense first layer; GPT-OSS has a sliding window. The public sizes
# are each released model's MoE layer (DeepSeek-V3 with 32 local experts).
FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in (
        Family(
            "mixtral",
            "MixtralConfig",
            "MixtralSparseMoeBlock",
            "gate",
            routers.mixtral_router_forward,
            routers.renormalized_routing,
            ("hidden_dim",),
            dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2),
            dict(hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2),
        ),
        Family(
            "qwen2_moe",
            "Qwen2MoeConfig",
            "Qwen2MoeSparseMoeBlock",
            "gate",
            routers.softmax_router_forward,
            routers.softmax_routing,
            _SOFTMAX_ATTRS,
            dict(
                intermediate_size=32,
                moe_intermediate_size=16,
                shared_expert_intermediate_size=24,
                num_experts=6,
                num_experts_per_tok=2,
                norm_topk_prob=False,
            ),
            dict(
                hidden_size=2048,
                moe_intermediate_size=1408,
                shared_expert_intermediate_size=5632,
                num_experts=60,
                num_experts_per_tok=4,
            ),
        ),
        Family(
            "qwen3_moe",
            "Qwen3MoeConfig",
            "Qwen3MoeSparseMoeBlock",
            "gate",
            routers.softmax_router_forward,
            routers.softmax_routing,
            _SOFTMAX_ATTRS,
            dict(
                num_hidden_layers=3,
                mlp_only_layers=[0],
                head_dim=8,
                intermediate_size=32,
                moe_intermediate_size=16,
                num_experts=6,
                num_experts_per_tok=3,
                norm_topk_prob=True,
            ),
            dict(
                hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True
            ),
        ),
        Family(
            "olmoe",
            "OlmoeConfig",
            "OlmoeSparseMoeBlock",
            "gate",
            routers.softmax_router_forward,
            routers.softmax_routing,
            _SOFTMAX_ATTRS,
            dict(intermediate_size=16, num_experts=6, num_experts_per_tok=2),
            dict(hidden_size=2048, intermediate_size=1024, num_experts=64, num_experts_per_tok=8),
        ),
        Family(
            "deepseek_v3",
            "DeepseekV3Config",
            "DeepseekV3MoE",
            "gate",
            routers.deepseek_v3_router_forward,
            routers.deepseek_v3_routing,
            (*_DEEPSEEK_ATTRS, "routed_scaling_factor"),
            dict(
                num_hidden_layers=3,
                num_key_value_heads=4,
                intermediate_size=32,
                moe_intermediate_size=16,
                n_routed_experts=8,
                n_group=4,
                topk_group=2,
                num_experts_per_tok=3,
                first_k_dense_replace=1,
                routed_scaling_factor=2.5,
                norm_topk_prob=True,
                n_shared_experts=1,
                kv_lora_rank=16,
                q_lora_rank=16,
                qk_rope_head_dim=8,
                qk_nope_head_dim=8,
                v_head_dim=8,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            ),
            dict(
                hidden_size=7168,
                moe_intermediate_size=2048,
                n_routed_experts=32,
                n_group=8,
                topk_group=4,
                num_experts_per_tok=8,
                n_shared_experts=1,
                routed_scaling_factor=2.5,
                norm_topk_prob=True,
            ),
        ),
        Family(
            "gpt_oss",
            "GptOssConfig",
            "GptOssMLP",
            "router",
            routers.gpt_oss_router_forward,
            routers.renormalized_routing,
            ("bias",),
            dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, head_dim=8, sliding_window=4),
            dict(hidden_size=2880, intermediate_size=2880, num_local_experts=128, num_experts_per_tok=4),
        ),
    )
}
