"""Bad input above the op layer: modules refuse bad arguments when built (the ops' named errors),
the exported types and integer-like values are accepted where their plain forms are, no silent
result from non-finite input (NaN bias raises; ProbMoE's undefined rows select no expert in
inference as in training), the methods' edge cases raise named errors or follow their documented
contract, and apply / revert cycles leave exactly the unpatched model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import moe_kernels as mk
from moe_kernels import Activation, RoutingConfig, balance
from moe_kernels.knn import KNNRouter, RoutingMemory, build_routing_memory, faiss_available
from moe_kernels.nn import GatedMLP
from moe_kernels.testing import tiny_hf_config, tolerance

H, I, E = 16, 8, 4


def _memory(entries=20):
    return RoutingMemory(torch.randn(entries, H), torch.randn(entries, E), index="torch")


@pytest.mark.parametrize(
    "build,error,match",
    [
        (lambda: mk.MoE(H, I, E, 2, activation="relu"), ValueError, r"MoE: activation must be one of \("),
        (lambda: mk.MoE(H, I, E, 2, activation=3.0), TypeError, "MoE: activation must be a str or"),
        (lambda: mk.MoE(H, I, E, 5), ValueError, r"TopKRouter: k must be an int in \[1, 4\]"),
        (lambda: mk.MoE(H, 0, E, 2), ValueError, "MoE: intermediate_size must be an int >= 1, got 0"),
        (lambda: mk.MoE(H, I, E, 2.0), TypeError, "MoE: k must be an int, got float"),
        (lambda: mk.MoE(H, I, E, 2, backend="cuda"), ValueError, "MoE: backend must be one of"),
        (
            lambda: mk.MoE(H, I, E, 2, router=mk.TopKRouter(H, 8, 2)),
            ValueError,
            r"router's weight \(E, H\) is \(8, 16\)",
        ),
        (lambda: mk.MoE(H, I, E, 2, router=mk.TopKRouter(H, E, 1)), ValueError, "router selects k=1 experts"),
        (lambda: mk.MoE(H, I, E, 2, router=lambda x: x), TypeError, "router must be an nn.Module"),
        (lambda: mk.ProbMoERouter(H, E, 5), ValueError, r"ProbMoERouter: k must be an int in \[1, num_experts=4\]"),
        (lambda: mk.ProbMoERouter(H, E, 2, k_min=3), ValueError, r"k_min must be None or an int in \[0, k=2\]"),
        (lambda: mk.ProbMoERouter(H, E, 2, renormalize=1), TypeError, "renormalize must be a bool"),
        (lambda: GatedMLP(H, I, activation="swish"), ValueError, "GatedMLP: activation must be one of"),
        (lambda: KNNRouter(torch.randn(E, H), _memory(), 2, n_neighbors=0), ValueError, "n_neighbors must be"),
        (lambda: KNNRouter(torch.randn(E, H), _memory(), 2, n_neighbors=2.5), TypeError, "n_neighbors must be an int"),
        (lambda: KNNRouter(torch.randn(E, H), "memory", 2), TypeError, "memory must be a moe_kernels.knn"),
        (lambda: KNNRouter(torch.randn(E), _memory(), 2), TypeError, r"weight must be a float \(E, H\) tensor"),
    ],
)
def test_modules_refuse_bad_arguments_when_built(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_a_block_refuses_input_of_another_dtype():
    block = mk.MoE(H, I, E, 2, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="MoE: hidden must have the block's dtype torch.bfloat16, got torch.float32"):
        block(torch.randn(3, H))


def test_exported_types_and_integer_like_values_are_accepted():
    torch.manual_seed(0)
    x, logits = torch.randn(5, H), torch.randn(5, E)
    weights, ids = mk.softmax_topk(logits, 2)
    for k in (np.int64(2), torch.tensor(2), np.int32(2)):
        assert torch.equal(mk.softmax_topk(logits, k)[1], ids)
        assert torch.equal(mk.probmoe_route(logits, k, training=False)[1], ids)
    gate_up, down = torch.randn(E, 2 * I, H), torch.randn(E, H, I)
    expected = mk.fused_experts(x, gate_up, down, weights, ids, activation="gelu")
    assert torch.equal(mk.fused_experts(x, gate_up, down, weights, ids, activation=Activation.GELU), expected)
    block = mk.MoE(H, I, E, np.int64(2), activation=Activation.GELU_TANH)
    assert block.activation == "gelu_tanh" and block.router.k == 2 and type(block.router.k) is int
    # What a transformers router returns: bfloat16 weights with bfloat16 hidden states.
    x16, gate_up16, down16 = x.bfloat16(), gate_up.bfloat16(), down.bfloat16()
    from_16 = mk.fused_experts(x16, gate_up16, down16, weights.bfloat16(), ids)
    from_32 = mk.fused_experts(x16, gate_up16, down16, weights, ids)  # the weights before their rounding
    atol, rtol = tolerance(torch.bfloat16, "fused_experts")
    torch.testing.assert_close(from_16.float(), from_32.float(), atol=atol, rtol=rtol)


def test_nan_bias_and_scale_raise():
    logits, bias = torch.randn(3, 8), torch.zeros(8)
    mk.softmax_topk(logits, 2, bias=bias)  # checked once, remembered for this version of bias
    bias[5] = float("nan")  # an in-place change: checked again
    with pytest.raises(ValueError, match="softmax_topk: bias holds NaN"):
        mk.softmax_topk(logits, 2, bias=bias)
    memory, ids, sims = torch.randn(10, 8), torch.zeros(3, 2, dtype=torch.int64), torch.ones(3, 2)
    with pytest.raises(ValueError, match="knn_route: bias holds NaN"):
        mk.knn_route(logits, ids, sims, memory, 2, bias=bias)
    with pytest.raises(ValueError, match="scale must be a finite number, got nan"):
        RoutingConfig(scale=float("nan"))
    with pytest.raises(ValueError, match="scale must be a finite number"):
        mk.softmax_topk(logits, 2, scale=float("nan"))
    # -inf stays a valid bias: it excludes an expert.
    bias[5] = float("-inf")
    assert not (mk.softmax_topk(logits, 7, bias=bias)[1] == 5).any()


@pytest.mark.parametrize("k_min", [None, 1])
def test_probmoe_undefined_rows_select_no_expert_in_both_modes(k_min):
    logits = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    logits[0, 2] = float("nan")
    logits[1, 3] = float("inf")
    logits[2] = float("-inf")
    logits[3, :7] = float("-inf")  # one expert left: fewer than k = 2 (exact-k), enough for k_min = 1
    undefined = [0, 1, 2] if k_min else [0, 1, 2, 3]
    for training in (True, False):
        weights, ids = mk.probmoe_route(logits, 2, k_min=k_min, training=training)
        assert (ids[undefined] == -1).all() and (weights[undefined] == 0).all(), (training, ids)
        assert (ids[4] >= 0).all() and torch.isfinite(weights).all()


def test_methods_edge_cases():
    empty_logits = torch.zeros(0, E, requires_grad=True)
    for loss in (
        balance.switch_aux_loss(empty_logits, torch.zeros(0, 2, dtype=torch.int64), E),
        balance.router_z_loss(empty_logits),
    ):
        assert loss.item() == 0.0
        loss.backward()  # still a graph: an expert-parallel rank with no token takes part
    model = nn.Sequential(mk.MoE(H, I, E, 2))
    batches = [(torch.randn(6, H), None)]

    def nan_loss(model, batch):
        return model(batch[0]).sum() * float("nan")

    with pytest.raises(ValueError, match=r"build_routing_memory: loss_fn returned a non-finite loss \(nan\) at step 0"):
        build_routing_memory(model, batches, nan_loss, steps=2, progress=False)
    if faiss_available():
        with pytest.raises(ValueError, match="index='ivfpq' needs at least 256 keys"):
            RoutingMemory(torch.randn(100, 32), torch.randn(100, E), index="ivfpq")


def test_triton_backend_on_a_cpu_model_is_refused_when_patched(monkeypatch):
    transformers = pytest.importorskip("transformers")
    import moe_kernels.integrations.transformers as hf
    from moe_kernels import utils

    monkeypatch.setattr(utils, "interpreter_enabled", lambda: False)
    model = transformers.AutoModelForCausalLM.from_config(tiny_hf_config("olmoe"))
    with pytest.raises(ValueError, match="apply_moe_kernels: backend='triton' on a CPU model needs TRITON_INTERPRET"):
        hf.apply_moe_kernels(model, backend="triton")
    assert not hf.is_moe_kernels_applied(model)


def test_apply_and_revert_cycles_restore_the_unpatched_model_exactly():
    transformers = pytest.importorskip("transformers")
    import moe_kernels.integrations.transformers as hf
    from moe_kernels import cor, replay

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_hf_config("qwen3_moe")).eval()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
    state = {name: module.__dict__.copy() for name, module in model.named_modules()}
    for cycle in range(3):
        hf.apply_moe_kernels(model)
        layers = cor.find_moe_layers(model, "test")
        prior = torch.zeros(len(layers), layers[0].num_experts)
        prior[:, 0] = 1.0  # with strength 5 a strong prior: CoR would move every token to expert 0
        cor.apply_counterfactual_routing(model, cor.CoRPlan(torch.full((len(layers),), 2), prior, 5.0))
        balance.track_load(model)
        with replay.record(model), torch.no_grad():
            model(ids)
        hf.revert_moe_kernels(model)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, expected), cycle
        assert {name: set(module.__dict__) for name, module in model.named_modules()} == {
            name: set(saved) for name, saved in state.items()
        }
    hf.apply_moe_kernels(model)  # no CoR brought back by a new patch
    assert not cor.is_counterfactual_routing_applied(model)
