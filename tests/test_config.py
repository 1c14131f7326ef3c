"""``RoutingConfig``: one validated, hashable value for every routing option, accepted by every
routing op and module, and equal in effect to the keyword options it replaces."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from oracles import softmax_topk_oracle

import moe_kernels as mk
from moe_kernels.config import ACTIVATIONS, Activation, KnnMixing, RoutingConfig, override_routing
from moe_kernels.shapes import ROUTING_SHAPES

PRESETS = {
    "default": (RoutingConfig.default(), dict()),
    "renormalize": (RoutingConfig.renormalize(), dict(renormalize=True)),
    "deepseek_v3": (
        RoutingConfig.deepseek_v3(),
        dict(score_func="sigmoid", num_groups=8, topk_groups=4, renormalize=True, scale=2.5),
    ),
    "deepseek_v2": (RoutingConfig.deepseek_v2(), dict(num_groups=8, topk_groups=3, group_score="max", scale=16.0)),
    "llama4": (RoutingConfig.llama4(), dict(score_func="sigmoid")),
    "sigmoid_renorm": (RoutingConfig.sigmoid_renorm(), dict(score_func="sigmoid", renormalize=True)),
}


@pytest.mark.parametrize("name", PRESETS)
def test_presets_route_as_their_keyword_options(name):
    routing, options = PRESETS[name]
    logits = torch.randn(13, 64, dtype=torch.float64)
    bias = torch.randn(64, dtype=torch.float64) * 0.1
    k = 1 if name == "llama4" else 6
    weights, ids = mk.softmax_topk(logits, k, routing=routing, bias=bias)
    want_weights, want_ids = softmax_topk_oracle(logits, k, bias=bias, **options)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_weights, atol=1e-12, rtol=1e-10)
    assert RoutingConfig(**options) == routing


def test_value_semantics():
    config = RoutingConfig.deepseek_v3()
    assert hash(config) == hash(RoutingConfig.deepseek_v3()) and config == RoutingConfig.deepseek_v3()
    assert {config: 1}[RoutingConfig(**dataclasses.asdict(config))] == 1
    assert RoutingConfig(scale=2) == RoutingConfig(scale=2.0) and isinstance(RoutingConfig(scale=2).scale, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.scale = 1.0  # type: ignore[misc]
    # ``renormalize`` is a field on an instance and the preset on the class.
    assert RoutingConfig.renormalize().renormalize is True and RoutingConfig().renormalize is False
    assert dataclasses.replace(config, scale=1.0).scale == 1.0 and config.scale == 2.5


@pytest.mark.parametrize(
    "fields,error,match",
    [
        (dict(score_func="tanh"), ValueError, r"RoutingConfig: score_func must be one of"),
        (dict(renormalize=1), TypeError, r"RoutingConfig: renormalize must be a bool, got int"),
        (dict(num_groups=0, topk_groups=1), ValueError, r"RoutingConfig: num_groups must be a positive int"),
        (dict(num_groups=4), ValueError, r"RoutingConfig: topk_groups must be an int in \[1, num_groups=4\]"),
        (dict(topk_groups=2), ValueError, r"RoutingConfig: topk_groups=2 needs num_groups"),
        (dict(group_score="mean"), ValueError, r"RoutingConfig: group_score must be one of"),
        (dict(scale=float("inf")), ValueError, r"RoutingConfig: scale must be a finite number, got inf"),
        (dict(scale="2"), TypeError, r"RoutingConfig: scale must be a number, got str"),
    ],
)
def test_construction_validates_each_option(fields, error, match):
    with pytest.raises(error, match=match):
        RoutingConfig(**fields)


def test_problem_checks_name_the_op():
    with pytest.raises(ValueError, match=r"softmax_topk: num_groups must be a positive int dividing E=60, got 8"):
        mk.softmax_topk(torch.randn(3, 60), 2, routing=RoutingConfig.deepseek_v3())
    with pytest.raises(ValueError, match=r"knn_route: k must be an int in \[1, 8\]"):
        mk.knn_route(
            torch.randn(2, 8),
            torch.zeros(2, 1, dtype=torch.long),
            torch.ones(2, 1),
            torch.randn(3, 8),
            9,
            routing=RoutingConfig.renormalize(),
        )
    with pytest.raises(TypeError, match=r"softmax_topk: routing must be a moe_kernels.RoutingConfig or None, got dict"):
        mk.softmax_topk(torch.randn(3, 8), 2, routing={"renormalize": True})


def test_keyword_options_override_the_config():
    base = RoutingConfig.deepseek_v3()
    keep = (None,) * 6
    assert override_routing("x", base, keep[:5] + (1.0,)) == dataclasses.replace(base, scale=1.0)
    assert override_routing("x", RoutingConfig(), (None, True) + keep[2:]) == RoutingConfig.renormalize()
    assert override_routing("x", base, keep) is base
    logits = torch.randn(9, 256)
    bias = torch.randn(256) * 0.1
    via_keywords = mk.softmax_topk(logits, 8, bias=bias, **{**PRESETS["deepseek_v3"][1], "scale": 1.0})
    via_config = mk.softmax_topk(logits, 8, bias=bias, routing=base, scale=1.0)
    assert all(torch.equal(a, b) for a, b in zip(via_keywords, via_config))
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'renorm'"):
        mk.softmax_topk(logits, 8, renorm=True)
    with pytest.raises(TypeError, match=r"softmax_topk: renormalize must be a bool, got int"):
        mk.softmax_topk(logits, 8, renormalize=1)


@pytest.mark.parametrize("name", PRESETS)
def test_op_args_round_trip(name):
    routing = PRESETS[name][0]
    flat = routing.op_args()
    assert [type(value) for value in flat] == [kind for _, kind in RoutingConfig.OP_FIELDS]
    assert RoutingConfig.from_op_args(*flat) == routing
    assert RoutingConfig.from_op_args(*flat) is RoutingConfig.from_op_args(*flat)  # cached: one rebuild
    mixing = KnnMixing("softmax", 0.3, 0.5)
    assert KnnMixing.from_op_args(*mixing.op_args()) == mixing


@pytest.mark.parametrize(
    "fields,match",
    [
        (dict(weighting="mean"), r"KnnMixing: weighting must be one of \('similarity', 'softmax'\), got 'mean'"),
        (dict(temperature=0), r"KnnMixing: temperature must be a finite number > 0, got 0"),
        (dict(min_confidence=float("nan")), r"KnnMixing: min_confidence must be a number in \[0, 1\], got nan"),
    ],
)
def test_knn_mixing_validates_each_option(fields, match):
    with pytest.raises(ValueError, match=match):
        KnnMixing(**fields)
    assert KnnMixing(temperature=1) == KnnMixing(temperature=1.0) and isinstance(
        KnnMixing(temperature=1).temperature, float
    )


def test_registry_shapes_hold_configs():
    for shape in ROUTING_SHAPES:
        assert isinstance(shape.routing, RoutingConfig)
        shape.routing.check(shape.num_experts, shape.k)


def test_modules_take_the_config():
    torch.manual_seed(0)
    hidden = torch.randn(11, 32)
    routing = RoutingConfig.deepseek_v2(num_groups=4, topk_groups=2)
    router = mk.TopKRouter(32, 16, 3, routing=routing)
    assert router.routing == routing
    weights, ids = router(hidden)
    want_weights, want_ids = softmax_topk_oracle(
        hidden.double() @ router.weight.double().T, 3, num_groups=4, topk_groups=2, group_score="max", scale=16.0
    )
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights.double(), want_weights, atol=1e-5, rtol=1e-5)
    moe = mk.MoE(32, 8, 16, 3, routing=routing)
    assert moe.router.routing == routing and mk.MoE(32, 8, 16, 3).router.routing == RoutingConfig()
    with pytest.raises(ValueError, match=r"MoE: routing applies to the default router only"):
        mk.MoE(32, 8, 16, 3, router=router, routing=routing)
    with pytest.raises(TypeError, match=r"TopKRouter: routing must be a moe_kernels.RoutingConfig or None, got dict"):
        mk.TopKRouter(32, 16, 3, routing={"renormalize": True})
    with pytest.raises(
        ValueError, match=r"TopKRouter: k must be an int in \[1, 8\] \(the 8 experts of the kept groups\)"
    ):
        mk.TopKRouter(32, 16, 9, routing=routing)


def test_activation_codes_have_one_source():
    assert ACTIVATIONS == ("silu", "gelu", "gelu_tanh", "gpt_oss")
    assert [Activation.parse(name) for name in ACTIVATIONS] == list(Activation)
    assert [int(a) for a in Activation] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"activation must be one of .*got 'relu'"):
        Activation.parse("relu")
