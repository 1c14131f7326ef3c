"""The one registry of the transformers MoE families this integration patches: where each family's
MoE blocks and routers are, how its router is patched and routes, and the sizes its tests and
benchmarks build it at (a tiny 2-3 layer model, and the public model's MoE layer). The
integration (:func:`~moe_kernels.integrations.transformers.apply_moe_kernels`), its tests
(``moe_kernels.testing.tiny_hf_config``) and the benchmarks (``bench_hf``, ``bench_hf_generate``)
all read it."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

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

# Each family's config fields (data, in ``moe_kernels/configs/hf_families.json``): ``tiny``, a 2-3
# layer test model with the family's routing features on (Qwen3-MoE renormalises and has a dense
# first layer; DeepSeek-V3 keeps 2 of 4 groups with scale 2.5 and a shared expert after a dense
# first layer; GPT-OSS has a sliding window); ``public``, the released model's MoE layer
# (DeepSeek-V3 with 32 local experts).
_SIZES = json.loads((Path(__file__).resolve().parents[2] / "configs" / "hf_families.json").read_text())


def _family(model_type, config_class, block, router_attr, router_forward, routing, router_attrs) -> Family:
    sizes = _SIZES[model_type]
    return Family(
        model_type,
        config_class,
        block,
        router_attr,
        router_forward,
        routing,
        router_attrs,
        sizes["tiny"],
        sizes["public"],
    )


FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in (
        _family(
            "mixtral",
            "MixtralConfig",
            "MixtralSparseMoeBlock",
            "gate",
            routers.mixtral_router_forward,
            routers.renormalized_routing,
            ("hidden_dim",),
        ),
        _family(
            "qwen2_moe",
            "Qwen2MoeConfig",
            "Qwen2MoeSparseMoeBlock",
            "gate",
            routers.softmax_router_forward,
            routers.softmax_routing,
            _SOFTMAX_ATTRS,
        ),
        _family(
            "qwen3_moe",
            "Qwen3MoeConfig",
            "Qwen3MoeSparseMoeBlock",
            "gate",
            routers.softmax_router_forward,
            routers.softmax_routing,
            _SOFTMAX_ATTRS,
        ),
        _family(
            "olmoe",
            "OlmoeConfig",
            "OlmoeSparseMoeBlock",
            "gate",
            routers.softmax_router_forward,
            routers.softmax_routing,
            _SOFTMAX_ATTRS,
        ),
        _family(
            "deepseek_v3",
            "DeepseekV3Config",
            "DeepseekV3MoE",
            "gate",
            routers.deepseek_v3_router_forward,
            routers.deepseek_v3_routing,
            (*_DEEPSEEK_ATTRS, "routed_scaling_factor"),
        ),
        _family(
            "gpt_oss",
            "GptOssConfig",
            "GptOssMLP",
            "router",
            routers.gpt_oss_router_forward,
            routers.renormalized_routing,
            ("bias",),
        ),
    )
}
