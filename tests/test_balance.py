"""moe_kernels.balance: load statistics against float64 oracles, the Switch aux loss against HF
transformers, the z-loss, the aux-loss-free bias, MoE's per-layer load, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import moe_kernels
from moe_kernels import balance
from moe_kernels.balance import AuxLossFreeBias, load_stats, router_z_loss, switch_aux_loss
from moe_kernels.testing import tolerance


def _random_ids(tokens: int, k: int, num_experts: int, *, seed: int, empty: float = 0.1) -> torch.Tensor:
    """(T, k) int32 ids, skewed towards low experts, with a fraction ``empty`` of -1 slots."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.linspace(2.0, 0.5, num_experts)
    ids = torch.multinomial(weights, tokens * k, replacement=True, generator=gen).reshape(tokens, k)
    ids[torch.rand(tokens, k, generator=gen) < empty] = -1
    return ids.to(torch.int32)


def _oracle(ids: torch.Tensor, num_experts: int) -> dict:
    """float64 load statistics from plain Python counting."""
    counts = [0] * num_experts
    for value in ids.reshape(-1).tolist():
        if value >= 0:
            counts[value] += 1
    total = sum(counts)
    mean = total / num_experts
    fraction = [c / total for c in counts]
    std = math.sqrt(sum((c - mean) ** 2 for c in counts) / num_experts)
    entropy = -sum(f * math.log(f) for f in fraction if f > 0) / math.log(num_experts)
    return dict(
        counts=counts,
        fraction=fraction,
        cv=std / mean,
        max_over_mean=max(counts) / mean,
        entropy=entropy,
        jain=total**2 / (num_experts * sum(c * c for c in counts)),
    )


@pytest.mark.parametrize("tokens,k,num_experts,seed", [(97, 2, 8, 0), (1000, 6, 64, 1), (33, 1, 3, 2)])
def test_load_stats_against_oracle(tokens, k, num_experts, seed):
    ids = _random_ids(tokens, k, num_experts, seed=seed)
    stats = load_stats(ids, num_experts)
    expected = _oracle(ids, num_experts)
    assert stats.counts.dtype == torch.int64 and stats.counts.tolist() == expected["counts"]
    atol, rtol = tolerance(torch.float32)
    for name in ("fraction", "cv", "max_over_mean", "entropy", "jain"):
        value = getattr(stats, name)
        assert value.dtype == torch.float32, name
        torch.testing.assert_close(
            value.double(), torch.tensor(expected[name], dtype=torch.float64), atol=atol, rtol=rtol, msg=name
        )


def test_load_stats_extremes():
    balanced = load_stats(torch.arange(12, dtype=torch.int32).reshape(6, 2) % 4, 4)
    assert balanced.cv == 0 and balanced.max_over_mean == 1 and balanced.jain == 1
    assert balanced.entropy == pytest.approx(1.0, abs=1e-6)
    collapsed = load_stats(torch.full((5, 1), 2, dtype=torch.int64), 4)
    assert collapsed.counts.tolist() == [0, 0, 5, 0] and collapsed.max_over_mean == 4
    assert collapsed.entropy == 0 and collapsed.jain == pytest.approx(0.25)
    empty = load_stats(torch.full((3, 2), -1, dtype=torch.int32), 4)
    assert empty.counts.tolist() == [0, 0, 0, 0]
    assert all(torch.isnan(getattr(empty, name)).all() for name in ("fraction", "cv", "max_over_mean", "jain"))


class _AtenRecorder(TorchDispatchMode):
    """Records the name of every aten op that runs under it."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


# Ops that read a device value back to the host: .item() / bool() / float() of a tensor, and ops
# whose output size depends on the data.
HOST_SYNC_OPS = {
    "aten._local_scalar_dense",
    "aten.nonzero",
    "aten.bincount",
    "aten.unique",
    "aten._unique2",
    "aten.masked_select",
    "aten.item",
}


def test_device_ops_have_no_host_sync():
    ids = _random_ids(64, 2, 8, seed=3)
    logits = torch.randn(64, 8, requires_grad=True)
    bias = AuxLossFreeBias(8, rate=0.1)
    router = moe_kernels.dynamics.AdaptiveScoreRouter(4, 8, 2, feedback=1.0)
    with _AtenRecorder() as recorder:
        load_stats(ids, 8)
        switch_aux_loss(logits, ids, 8).backward()
        router_z_loss(logits)
        bias.update(ids)
        router.update(ids)
    assert len(recorder.ops) > 20  # the recorder saw the ops
    assert not HOST_SYNC_OPS & set(recorder.ops), sorted(HOST_SYNC_OPS & set(recorder.ops))
    with _AtenRecorder() as recorder:  # the recorder catches a sync when there is one
        float(load_stats(ids, 8).cv)
    assert "aten._local_scalar_dense" in recorder.ops


def _hf_loss():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    return load_balancing_loss_func


@pytest.mark.parametrize("tokens,num_experts,k", [(50, 8, 2), (129, 16, 4), (7, 4, 1)])
def test_switch_aux_loss_equals_transformers(tokens, num_experts, k):
    gen = torch.Generator().manual_seed(tokens)
    logits = (torch.randn(tokens, num_experts, generator=gen) * 1.5).requires_grad_()
    ids = torch.topk(torch.softmax(logits.detach(), -1), k, dim=-1).indices.to(torch.int32)
    ours = switch_aux_loss(logits, ids, num_experts)
    reference_logits = logits.detach().clone().requires_grad_()
    theirs = _hf_loss()((reference_logits,), num_experts, k)
    atol, rtol = tolerance(torch.float32)
    torch.testing.assert_close(ours, theirs, atol=atol, rtol=rtol)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(logits.grad, reference_logits.grad, atol=atol, rtol=rtol)
    # A balanced router scores k; the loss is not constant in the logits.
    assert not torch.all(logits.grad == 0)


def test_switch_aux_loss_ignores_empty_slots_and_gradchecks():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(20, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    ids = _random_ids(20, 3, 6, seed=6, empty=0.3)
    counts = torch.tensor(_oracle(ids, 6)["counts"], dtype=torch.float64)
    expected = 6 * (counts / 20 * torch.softmax(logits, -1).mean(0)).sum()
    loss = switch_aux_loss(logits, ids, 6)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected, atol=1e-12, rtol=1e-12)
    assert torch.autograd.gradcheck(lambda x: switch_aux_loss(x, ids, 6), (logits,))


def test_router_z_loss():
    from transformers.models.switch_transformers.modeling_switch_transformers import router_z_loss_func

    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 40, 8, generator=gen) * 3
    flat = logits.reshape(-1, 8)
    expected = torch.logsumexp(flat.double(), -1).square().mean()
    atol, rtol = tolerance(torch.float32)
    torch.testing.assert_close(router_z_loss(flat).double(), expected, atol=atol, rtol=rtol)
    torch.testing.assert_close(router_z_loss(flat), router_z_loss_func(logits), atol=atol, rtol=rtol)
    assert router_z_loss(flat.bfloat16()).dtype == torch.float32
    x = torch.randn(12, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(router_z_loss, (x,))


def test_aux_loss_free_bias_update_rule():
    bias = AuxLossFreeBias(5, rate=0.01)
    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [3, -1]], dtype=torch.int32)  # counts 3, 2, 1, 1, 0
    bias.update(ids)
    # mean load 7/5 = 1.4: experts above it go down by rate, below it up.
    assert bias.bias.tolist() == pytest.approx([-0.01, -0.01, 0.01, 0.01, 0.01])
    assert bias.bias.dtype == torch.float32 and "bias" in dict(bias.named_buffers())


def test_aux_loss_free_bias_balances_a_skewed_router(one_thread):
    """Fixed logits favouring experts 0-2 (2048 tokens, E = 8, top-2, max_over_mean 3.4 at the
    start): with rate 1e-3, max_over_mean is <= 1.2 after 300 steps and stays there to 400 (it
    first got there at step 237)."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2048, 8, generator=gen) + torch.tensor([2.5, 2.0, 1.0, 0, 0, 0, 0, 0])
    bias = AuxLossFreeBias(8, rate=1e-3)
    history = []
    for _ in range(400):
        _, ids = moe_kernels.softmax_topk(logits, 2, bias=bias.bias)
        history.append(float(load_stats(ids, 8).max_over_mean))
        bias.update(ids)
    assert history[0] > 3
    assert max(history[300:]) <= 1.2


def test_moe_exposes_last_load():
    torch.manual_seed(0)
    moe = moe_kernels.MoE(16, 32, 8, 2)
    hidden = torch.randn(3, 5, 16)
    moe(hidden)
    assert moe.last_load is None  # off by default
    model = torch.nn.Sequential(moe, torch.nn.ReLU(), moe_kernels.MoE(16, 32, 4, 1))
    assert balance.track_load(model) == 2
    model(hidden)
    loads = balance.collect_load(model)
    assert sorted(loads) == ["0", "2"]
    _, ids = moe.router(hidden.reshape(-1, 16))
    assert loads["0"].counts.tolist() == load_stats(ids, 8).counts.tolist()
    assert int(loads["0"].counts.sum()) == 15 * 2 and int(loads["2"].counts.sum()) == 15
    balance.track_load(model, False)
    assert moe.track_load is False


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: load_stats(torch.zeros(3, 2), 4), TypeError, "load_stats: ids must be an integer tensor"),
        (lambda: load_stats([0, 1], 4), TypeError, "load_stats: ids must be a torch.Tensor, got list"),
        (
            lambda: load_stats(torch.zeros(3, 2, dtype=torch.int32), 0),
            ValueError,
            "load_stats: num_experts must be >= 1",
        ),
        (
            lambda: switch_aux_loss(torch.randn(4, 3, 2), torch.zeros(4, 1, dtype=torch.int32), 2),
            ValueError,
            "switch_aux_loss: router_logits must be \\(T, E\\)",
        ),
        (
            lambda: switch_aux_loss(torch.randn(4, 3), torch.zeros(4, 1, dtype=torch.int32), 4),
            ValueError,
            "router_logits has 3 experts, num_experts is 4",
        ),
        (
            lambda: switch_aux_loss(torch.randn(4, 3), torch.zeros(5, 1, dtype=torch.int32), 3),
            ValueError,
            "ids must be \\(T, k\\) with T = 4",
        ),
        (
            lambda: router_z_loss(torch.zeros(4, 3, dtype=torch.int32)),
            TypeError,
            "router_z_loss: router_logits must be floating",
        ),
        (lambda: AuxLossFreeBias(4, rate=-1e-3), ValueError, "AuxLossFreeBias: rate must be a finite number >= 0"),
        (lambda: AuxLossFreeBias(0), ValueError, "AuxLossFreeBias: num_experts must be >= 1"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.gpu
def test_cuda_hot_paths_do_not_sync():
    ids = _random_ids(4096, 8, 256, seed=9).cuda()
    logits = torch.randn(4096, 256, device="cuda", requires_grad=True)
    bias = AuxLossFreeBias(256, device="cuda")
    router = moe_kernels.dynamics.AdaptiveScoreRouter(16, 256, 8, feedback=1.0, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = load_stats(ids, 256)
        loss = switch_aux_loss(logits, ids, 256) + router_z_loss(logits)
        loss.backward()
        bias.update(ids)
        router.update(ids)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert stats.counts.tolist() == _oracle(ids.cpu(), 256)["counts"]
    assert logits.grad is not None and bias.bias.device.type == "cuda"
