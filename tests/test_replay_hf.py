"""Routing replay and load metrics on transformers models patched by ``apply_moe_kernels``, every
family (tiny random models, float32, no download): the record of a greedy ``generate`` against a
full forward over the generated sequence, replay in one forward and call by call, gradients under
a changed router, load metrics against counts of the recorded ids, refusals."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM

import moe_kernels.integrations.transformers as hf
from moe_kernels import balance, cor, replay
from moe_kernels.testing import TINY_HF_SIZES, tiny_hf_config

FAMILIES = hf.SUPPORTED_MODEL_TYPES
PROMPT, NEW = 5, 4
# Two routings of a token within this of a tie (k-th against (k+1)-th key) may differ between a
# forward over the whole sequence and the cached decode steps: float noise, not a replay error.
TIE_GAP = 1e-4

pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # tiny models


def _model(family: str):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(family), experts_implementation="eager").eval()
    return hf.apply_moe_kernels(model)


def _prompt(batch: int = 2) -> torch.Tensor:
    return torch.randint(0, TINY_HF_SIZES["vocab_size"], (batch, PROMPT), generator=torch.Generator().manual_seed(1))


def _generate(model, prompt):
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW, do_sample=False)


def _router_keys(model) -> dict:
    """A forward hook per patched router capturing its selection keys ``(T, E)``: the scores
    (softmax or sigmoid of its logits) plus DeepSeek-V3's selection bias."""
    keys, hooks = {}, []
    for layer in cor.find_moe_layers(model, "test"):

        def hook(router, args, out, name=layer.name, routing=layer.routing):
            logits = out[0].detach().float()
            scores = logits.softmax(-1) if routing.score_func == "softmax" else logits.sigmoid()
            bias = getattr(router, "e_score_correction_bias", None)
            keys[name] = scores + (0 if bias is None else bias)

        hooks.append(layer.router.register_forward_hook(hook))
    return keys, hooks


@pytest.mark.parametrize("family", FAMILIES)
def test_record_of_generate_agrees_with_a_full_forward_and_replays(family):
    model = _model(family)
    prompt = _prompt()
    with replay.record(model) as rollout:
        sequences = _generate(model, prompt)
    layers = [layer.name for layer in cor.find_moe_layers(model, "test")]
    assert rollout.layers == layers
    keys, hooks = _router_keys(model)
    try:
        with replay.record(model) as full, torch.no_grad():
            expected = model(sequences[:, :-1]).logits
    finally:
        for hook in hooks:
            hook.remove()
    for name in layers:
        recorded, whole = rollout.ids(name), full.ids(name)
        assert recorded.shape == whole.shape == (2, PROMPT + NEW - 1, whole.shape[-1])
        differ = (recorded.sort(-1).values != whole.sort(-1).values).any(-1).reshape(-1)
        top = keys[name].topk(whole.shape[-1] + 1, dim=-1).values
        gap = top[:, -2] - top[:, -1]
        assert (gap[differ] < TIE_GAP).all(), (name, gap[differ])
    with replay.replay(model, rollout), torch.no_grad():  # the RL case: one forward over all positions
        got = model(sequences[:, :-1]).logits
    if all(torch.equal(rollout.ids(name), full.ids(name)) for name in layers):  # else near-tie tokens differ
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    with replay.replay(model, rollout) as progress, replay.record(model) as again:  # call by call
        assert torch.equal(_generate(model, prompt), sequences)
    assert all(progress.remaining(name) == 0 and torch.equal(again.ids(name), rollout.ids(name)) for name in layers)


@pytest.mark.parametrize("family", FAMILIES)
def test_replay_under_a_changed_router_forces_ids_and_reaches_the_router(family):
    model = _model(family)
    sequences = _generate(model, _prompt())
    with replay.record(model) as rollout, torch.no_grad():
        model(sequences)
    layers = cor.find_moe_layers(model, "test")
    with torch.no_grad():
        for layer in layers:
            layer.router.weight.add_(torch.randn_like(layer.router.weight))
    with replay.record(model) as live, torch.no_grad():
        model(sequences)
    assert any(not torch.equal(live.ids(layer.name), rollout.ids(layer.name)) for layer in layers)
    with replay.replay(model, rollout), replay.record(model) as replayed:
        model(sequences).logits.float().logsumexp(-1).mean().backward()
    for layer in layers:
        assert torch.equal(replayed.ids(layer.name), rollout.ids(layer.name))
        grad = layer.router.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_load_metrics_equal_counts_of_the_recorded_ids(family):
    model = _model(family)
    prompt = _prompt()
    with replay.record(model) as rollout, balance.measure_load(model) as load:
        _generate(model, prompt)
    counts = load.counts()
    assert load.layers == rollout.layers
    for name in rollout.layers:
        ids = rollout.ids(name)
        expected = torch.bincount(ids[ids >= 0], minlength=rollout.num_experts(name))
        assert torch.equal(counts[name], expected)
        assert load.calls(name) == NEW  # the prefill and NEW - 1 decode steps
        torch.testing.assert_close(load.stats()[name].counts, expected)
    assert balance.track_load(model) == len(rollout.layers)
    with replay.record(model) as one, torch.no_grad():
        model(prompt)
    loads = balance.collect_load(model)
    assert sorted(loads) == sorted(one.layers)
    for name in one.layers:
        expected = torch.bincount(one.ids(name).reshape(-1), minlength=one.num_experts(name))
        assert torch.equal(loads[name].counts, expected)
    balance.track_load(model, False)
    hf.revert_moe_kernels(model)
    assert not any("_moe_kernels_taps" in m.__dict__ or "_moe_kernels_moe_layer" in m.__dict__ for m in model.modules())


def test_unpatched_models_are_refused():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_hf_config("olmoe"), experts_implementation="eager").eval()
    for enter in (lambda: replay.record(model), lambda: balance.measure_load(model)):
        with pytest.raises(ValueError, match="are not patched: call"), enter():
            pass
    with pytest.raises(ValueError, match="are not patched: call"):
        balance.track_load(model)
    with pytest.raises(ValueError, match="are not patched: call"):
        balance.collect_load(model)
    patched = hf.apply_moe_kernels(model)
    with replay.record(patched) as rollout, torch.no_grad():
        patched(_prompt())
    hf.revert_moe_kernels(patched)
    with pytest.raises(ValueError, match="are not patched: call"), replay.replay(patched, rollout):
        pass
