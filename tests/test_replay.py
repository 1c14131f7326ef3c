"""Routing replay on ``moe_kernels.MoE`` models (TopKRouter, ProbMoERouter, KNNRouter): a record
replayed on the same model reproduces its forward; replayed on a changed router it forces the
recorded ids and still trains the router; call-by-call and one-shot replay; record files; the
refusals (mismatched records, custom routers, corrupt files)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import moe_kernels as mk
from moe_kernels import replay
from moe_kernels.knn import KNNRouter, RoutingMemory

pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # tiny models

H, I, E = 24, 16, 8


def _model(router: str = "topk", seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    blocks = []
    for layer in range(2):
        if router == "topk":
            grouped = mk.RoutingConfig.deepseek_v3(num_groups=4, topk_groups=2)
            routing = mk.RoutingConfig.renormalize() if layer else grouped
            blocks.append(mk.MoE(H, I, E, 3, routing=routing))
        elif router == "probmoe":
            blocks.append(mk.MoE(H, I, E, 3, router=mk.ProbMoERouter(H, E, 3, k_min=1)))
        else:
            keys, values = torch.randn(64, H), torch.randn(64, E) * 3
            memory = RoutingMemory(keys, values, index="torch")
            blocks.append(mk.MoE(H, I, E, 2, router=KNNRouter(torch.randn(E, H) * 0.3, memory, 2, n_neighbors=4)))
        blocks.append(nn.Tanh())
    return nn.Sequential(*blocks)


def _inputs(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, H, generator=torch.Generator().manual_seed(seed))


def _perturb(model: nn.Module) -> None:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, mk.MoE):
                module.router.weight.add_(torch.randn_like(module.router.weight) * 2)


@pytest.mark.parametrize("router", ["topk", "probmoe", "knn"])
def test_replay_on_the_same_model_reproduces_the_forward(router):
    model = _model(router).eval()
    x = _inputs(3, 7)
    with replay.record(model) as record:
        expected = model(x)
    assert record.layers == ["0", "2"]
    for layer in record.layers:
        ids = record.ids(layer)
        assert ids.dtype == torch.int64 and ids.shape == (3, 7, model[int(layer)].router.k)
    with replay.replay(model, record) as progress:
        got = model(x)
    assert progress.position("0") == 7 and progress.remaining("2") == 0
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("router", ["topk", "probmoe", "knn"])
def test_replay_forces_the_recorded_ids_and_trains_the_router(router):
    model = _model(router).train(router == "probmoe")  # ProbMoE: the sampling mode's weights
    x = _inputs(2, 5)
    with replay.record(model) as record:
        model(x)
    _perturb(model)
    with replay.record(model) as live:
        model(x)
    assert any(not torch.equal(live.ids(layer), record.ids(layer)) for layer in record.layers)  # the test can fail
    with replay.replay(model, record), replay.record(model) as replayed:
        model(x).square().sum().backward()
    for layer in record.layers:
        assert torch.equal(replayed.ids(layer), record.ids(layer))
        grad = model[int(layer)].router.weight.grad
        if router == "knn":  # the frozen router's weight is a plain tensor: its gradient is the experts'
            grad = model[int(layer)].gate_up_proj.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_dynamic_k_slots_are_recorded_and_replayed():
    model = _model("probmoe").eval()
    x = _inputs(4, 6) * 3
    with replay.record(model) as record:
        expected = model(x)
    assert (record.ids("0") == -1).any()  # the band left slots empty
    with replay.replay(model, record):
        torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=0)


def test_a_record_of_steps_replays_in_one_forward_and_step_by_step():
    model = _model().eval()
    x = _inputs(2, 9)
    with replay.record(model) as record:
        model(x[:, :5])  # a "prefill", then one position per call
        for t in range(5, 9):
            model(x[:, t : t + 1])
    assert record.ids("0").shape == (2, 9, 3)
    _perturb(model)
    with replay.replay(model, record), replay.record(model) as whole:
        model(x)
    with replay.replay(model, record), replay.record(model) as steps:
        model(x[:, :4])
        model(x[:, 4:9])
    for layer in record.layers:
        assert torch.equal(whole.ids(layer), record.ids(layer))
        assert torch.equal(steps.ids(layer), record.ids(layer))


def test_flat_inputs_record_rows():
    model = _model().eval()
    x = _inputs(11)
    with replay.record(model) as record:
        expected = model(x)
    assert record.ids("2").shape == (11, 3)
    with replay.replay(model, record):
        torch.testing.assert_close(model(x[:6]), expected[:6], atol=1e-6, rtol=0)
        torch.testing.assert_close(model(x[6:]), expected[6:], atol=1e-6, rtol=0)


def test_router_logits_are_kept_when_asked():
    block = mk.MoE(H, I, E, 2, keep_router_logits=True)
    x = _inputs(5)
    block(x)
    logits = block.last_router_logits
    torch.testing.assert_close(logits, x @ block.router.weight.T)
    mk.balance.switch_aux_loss(logits, block.router(x)[1], E).backward()
    assert block.router.weight.grad.abs().sum() > 0
    custom = mk.MoE(H, I, E, 2, router=_CustomRouter(), keep_router_logits=True)
    with pytest.raises(ValueError, match="keep_router_logits needs a router with a route method"):
        custom(x)


class _CustomRouter(nn.Module):
    k = 2

    def forward(self, hidden):
        return torch.full((hidden.shape[0], 2), 0.5), torch.zeros(hidden.shape[0], 2, dtype=torch.int32)


def test_record_files_round_trip(tmp_path):
    model = _model("probmoe").eval()
    with replay.record(model) as record:
        model(_inputs(2, 4) * 3)
    path = tmp_path / "rollout.routing"
    record.save(path)
    loaded = replay.RoutingRecord.load(path)
    assert loaded.layers == record.layers
    for layer in record.layers:
        assert torch.equal(loaded.ids(layer), record.ids(layer)) and loaded.num_experts(layer) == E


def test_mismatched_records_are_refused():
    model = _model().eval()
    with replay.record(model) as record:
        model(_inputs(2, 4))
    with replay.replay(model, record), pytest.raises(ValueError, match=r"layer '0' runs a forward of \(3, 4\)"):
        model(_inputs(3, 4))  # batch size
    with replay.replay(model, record), pytest.raises(ValueError, match="2 positions left from position 2"):
        model(_inputs(2, 2))
        model(_inputs(2, 3))  # more positions than left
    other_k = nn.Sequential(mk.MoE(H, I, E, 2), nn.Tanh(), mk.MoE(H, I, E, 2))
    with replay.replay(other_k, record), pytest.raises(ValueError, match="k=2"):
        other_k(_inputs(2, 4))
    one_layer = nn.Sequential(mk.MoE(H, I, E, 3))
    with pytest.raises(ValueError, match="are not the record's"), replay.replay(one_layer, record):
        pass
    other_e = nn.Sequential(mk.MoE(H, I, 16, 3), nn.Tanh(), mk.MoE(H, I, 16, 3))
    with pytest.raises(ValueError, match="has 16 experts, the record 8"), replay.replay(other_e, record):
        pass
    with replay.replay(model, record), pytest.raises(ValueError, match="already replaying"):
        with replay.replay(model, record):
            pass
    with pytest.raises(TypeError, match="routing must be a RoutingRecord"), replay.replay(model, {"0": None}):
        pass


def test_models_this_package_does_not_route_are_refused():
    with pytest.raises(ValueError, match="has no MoE layers"), replay.record(nn.Linear(3, 3)):
        pass
    custom = nn.Sequential(mk.MoE(H, I, E, 2, router=_CustomRouter()))
    with pytest.raises(ValueError, match="_CustomRouter, which does not run"), replay.record(custom):
        pass
    with pytest.raises(ValueError, match="does not run"):
        mk.balance.track_load(custom)


def test_taps_are_gone_after_the_blocks():
    model = _model().eval()
    with replay.record(model) as record:
        model(_inputs(2, 3))
    with pytest.raises(RuntimeError), replay.replay(model, record):
        raise RuntimeError("a failing training step")
    for module in model.modules():
        assert "_moe_kernels_taps" not in module.__dict__
        assert not module._forward_pre_hooks


class _Reversed(nn.Module):
    """Two MoE blocks registered a, b and called b, a."""

    def __init__(self):
        super().__init__()
        self.a, self.b = mk.MoE(H, I, E, 2), mk.MoE(H, I, E, 2)

    def forward(self, x):
        return self.a(torch.tanh(self.b(x)))


def test_layers_are_listed_in_call_order():
    model = _Reversed()
    with replay.record(model) as record:
        model(_inputs(2, 3))
    assert record.layers == ["b", "a"]
    with replay.replay(model, record), replay.record(model) as again:
        model(_inputs(2, 3))
    assert all(torch.equal(again.ids(name), record.ids(name)) for name in ("a", "b"))


@pytest.mark.parametrize("routing", [mk.RoutingConfig.renormalize(), mk.RoutingConfig.deepseek_v3()], ids=str)
def test_softmax_topk_takes_given_ids(routing):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 16, generator=g, dtype=torch.float64)
    bias = torch.randn(16, generator=g, dtype=torch.float64) * 0.1
    weights, ids = mk.softmax_topk(logits, 4, routing=routing, bias=bias, backend="torch")
    given, same_ids = mk.softmax_topk(logits, 4, routing=routing, ids=ids.long())
    assert torch.equal(same_ids, ids)
    torch.testing.assert_close(given, weights, rtol=1e-12, atol=0)
    ids[0, 3] = -1  # an empty slot weighs 0
    assert mk.softmax_topk(logits, 4, routing=routing, ids=ids)[0][0, 3] == 0
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: mk.softmax_topk(x, 4, routing=routing, ids=ids)[0], (logits,))
    compiled = torch.compile(lambda x, i: mk.softmax_topk(x, 4, routing=routing, ids=i), fullgraph=True)
    torch.testing.assert_close(
        compiled(logits.detach().float(), ids)[0], mk.softmax_topk(logits.float(), 4, routing=routing, ids=ids)[0]
    )


@pytest.mark.parametrize(
    "ids,error,match",
    [
        (torch.zeros(6, 3, dtype=torch.int64), ValueError, r"ids must have shape \(\.\.\., k\) = \(6, 4\)"),
        (torch.zeros(6, 4), TypeError, "ids must be int32 or int64"),
        (torch.full((6, 4), 16), ValueError, r"ids must lie in \[-1, E\) = \[-1, 16\)"),
    ],
)
def test_given_ids_are_checked(ids, error, match):
    with pytest.raises(error, match=match):
        mk.softmax_topk(torch.randn(6, 16), 4, ids=ids)
    with pytest.raises(error, match=match):
        mk.probmoe_route(torch.randn(6, 16), 4, ids=ids)
