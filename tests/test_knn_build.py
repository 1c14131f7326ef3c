"""Building kNN-MoE routing memories from a reference set (moe_kernels.knn.build)."""

from __future__ import annotations

import pytest
import torch
from oracles import softmax_topk_oracle
from torch import nn

import moe_kernels as mk
from moe_kernels import testing
from moe_kernels.config import RoutingConfig
from moe_kernels.knn import KNNRouter
from moe_kernels.knn.build import build_routing_memory, routed_layers


class TwoBlockModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.blocks = nn.ModuleList([mk.MoE(16, 8, 4, 2, routing=RoutingConfig.renormalize()) for _ in range(2)])
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


def _loss(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def _batches(count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(24, 6, generator=generator), torch.randn(24, 3, generator=generator)) for _ in range(count)]


def test_build_lowers_the_reference_loss_and_keeps_the_model():
    torch.manual_seed(0)
    model = TwoBlockModel()
    state = {name: p.clone() for name, p in model.state_dict().items()}
    batches = _batches(3)
    built = build_routing_memory(model, batches, _loss, steps=15, lr=0.2, model_name="toy", progress=False)
    assert built.loss_after < built.loss_before
    assert set(built.memories) == {"blocks.0", "blocks.1"}
    for name, memory in built.memories.items():
        assert memory.num_entries == 3 * 24 and memory.values.shape == (72, 4)
        assert (memory.model, memory.layer) == ("toy", name)
    # The first layer's keys are its router inputs (normalised for the cosine metric).
    with torch.no_grad():
        inputs = torch.cat([model.inp(x) for x, _ in batches])
    torch.testing.assert_close(built.memories["blocks.0"].keys, nn.functional.normalize(inputs, dim=-1))
    # The model is untouched: parameters, their flags, and the routers' own forward.
    for name, p in model.state_dict().items():
        assert torch.equal(p, state[name]), name
    assert all(p.requires_grad for p in model.parameters())
    assert all("forward" not in vars(router) for router in routed_layers(model).values())


def test_zero_steps_stores_the_frozen_logits():
    model = TwoBlockModel()
    batches = _batches(1)
    built = build_routing_memory(model, batches, _loss, steps=0, layers=["blocks.1"], progress=False)
    assert built.loss_after == built.loss_before and list(built.memories) == ["blocks.1"]
    captured = {}
    model.blocks[1].router.register_forward_pre_hook(lambda _m, args: captured.setdefault("h", args[0]))
    with torch.no_grad():
        model(batches[0][0])
        want = nn.functional.linear(captured["h"], model.blocks[1].router.weight)
    torch.testing.assert_close(built.memories["blocks.1"].values, want)


def test_built_memory_drives_a_knn_router():
    torch.manual_seed(1)
    model = TwoBlockModel()
    batches = _batches(2)
    built = build_routing_memory(model, batches, _loss, steps=10, lr=0.2, progress=False)
    memory = built.memories["blocks.0"]
    frozen = model.blocks[0].router
    model.blocks[0].router = KNNRouter(frozen.weight, memory, 2, n_neighbors=1, routing=RoutingConfig.renormalize())
    with torch.no_grad():
        hidden = model.inp(batches[0][0])
        weights, ids = model.blocks[0].router(hidden)
    # A reference token's nearest case is itself (similarity 1, so confidence 1): the router
    # routes with the trained logits stored for it (the first 24 entries are batch 0's), not with
    # the frozen gate's. Fixed seed: no two of those logits' scores within 1e-4 of each other.
    stored = memory.values[:24].double()
    assert not testing._has_near_ties(torch.softmax(stored, -1), 1e-4).any()
    want_weights, want_ids = softmax_topk_oracle(stored, 2, renormalize=True)
    torch.testing.assert_close(ids, want_ids, atol=0, rtol=0)
    testing.assert_close(weights, want_weights)
    _, frozen_ids = softmax_topk_oracle(hidden.double() @ frozen.weight.double().T, 2, renormalize=True)
    assert not torch.equal(ids, frozen_ids)  # the training moved the routing of some tokens


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(layers=["nope"]), r"layers must name MoE blocks routed by softmax_topk, got \[.nope.\]"),
        (dict(steps=-1), "steps must be an int >= 0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_routing_memory(TwoBlockModel(), _batches(1), _loss, progress=False, **kwargs)


def test_empty_reference_set():
    with pytest.raises(ValueError, match="reference_batches is empty"):
        build_routing_memory(TwoBlockModel(), [], _loss, progress=False)


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss", "deepseek_v3"])
def test_memories_build_for_patched_transformers_models(family):
    transformers = pytest.importorskip("transformers")
    import moe_kernels.integrations.transformers as hf

    torch.manual_seed(0)
    config = testing.tiny_hf_config(family)
    model = hf.apply_moe_kernels(transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager"))
    ids = torch.randint(0, config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))

    def loss(model, batch):
        return model(input_ids=batch, labels=batch).loss

    layers = [layer.name for layer in mk.cor.find_moe_layers(model, "test")]
    frozen = build_routing_memory(model, [ids], loss, steps=0, progress=False)
    assert sorted(frozen.memories) == sorted(layers)
    captured = {}

    def keep(name):
        def hook(_module, _args, out):
            captured[name] = out[0]

        return hook

    for name, router in routed_layers(model).items():  # the router's own logits, its bias included
        router.register_forward_hook(keep(name))
    with torch.no_grad():
        model(input_ids=ids)
    for name in layers:
        torch.testing.assert_close(frozen.memories[name].values, captured[name].float())
    built = build_routing_memory(model, [ids], loss, steps=8, lr=0.2, progress=False)
    assert built.loss_after < built.loss_before
    assert all("_moe_kernels_taps" not in router.__dict__ for router in routed_layers(model).values())
