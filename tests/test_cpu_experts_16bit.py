"""The CPU experts path in bfloat16 and float16: every branch (the gathered small-batch path, the
features-first decode GEMMs, the rows-first blocks) judged by the 16-bit rule of
``moe_kernels.testing``: the largest error against float64 at most twice plain PyTorch's in the same
dtype (``plain_fused_experts``, HF's eager computation; its gradients by autograd). Also: no 16-bit
call reaches the reference, odd row counts (the padded features-first operands), poisoned outputs,
and the features-first activation layout."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import examples

import moe_kernels
from moe_kernels import testing
from moe_kernels.activations import gated_activation
from moe_kernels.cpu import experts as cpu_experts
from moe_kernels.cpu import experts_small
from moe_kernels.reference import experts as ref_experts

DTYPES = [torch.bfloat16, torch.float16]
GRAD_NAMES = ("hidden", "gate_up_proj", "down_proj", "weights", "gate_up_bias", "down_bias")
# (E, k, H, I, T) and the path each takes with the module's thresholds.
CASES = {
    "small": (60, 4, 32, 16, 1),
    "features_first": (160, 6, 16, 8, 13),
    "features_first_wide": (8, 2, 256, 128, 5),
    "rows_first": (16, 4, 64, 32, 300),
}


def _problem(num_experts, k, hidden, inter, num_tokens, dtype, bias, seed):
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    p = dict(
        hidden=draw(num_tokens, hidden),
        gate_up_proj=draw(num_experts, 2 * inter, hidden, scale=hidden**-0.5),
        down_proj=draw(num_experts, hidden, inter, scale=inter**-0.5),
        weights=torch.rand(num_tokens, k, generator=gen),
        # Half the experts unrouted, and -1 slots.
        ids=torch.randint(-1, max(num_experts // 2, 1), (num_tokens, k), generator=gen),
    )
    p["gate_up_bias"] = draw(num_experts, 2 * inter) if bias else None
    p["down_bias"] = draw(num_experts, hidden) if bias else None
    return p


def _float64(p: dict) -> dict:
    return {key: t if t is None or key == "ids" else t.double() for key, t in p.items()}


def _reference(p: dict, activation: str = "silu") -> torch.Tensor:
    """The float64 reference output of problem ``p``."""
    return ref_experts.fused_experts(**_float64(p), activation=activation)


def _plain_and_grads(p: dict, activation: str, grad_out: torch.Tensor):
    """Plain PyTorch's output in the dtype and its gradients (autograd), None for absent biases."""
    leaves = {key: None if t is None or key == "ids" else t.detach().clone().requires_grad_() for key, t in p.items()}
    args = {key: leaves[key] if leaves[key] is not None else p[key] for key in p}
    out = testing.plain_fused_experts(**args, activation=activation)
    present = [name for name in GRAD_NAMES if leaves[name] is not None]
    grads = torch.autograd.grad(out, [leaves[n] for n in present], grad_out, allow_unused=True)
    by_name = dict(zip(present, grads))
    return out.detach(), [by_name.get(name) for name in GRAD_NAMES]


def _path(p: dict) -> str:
    if experts_small.applies(p["gate_up_proj"], p["down_proj"], p["ids"]):
        return "small"
    return "features_first" if cpu_experts._weights_left(p["hidden"], p["ids"]) else "rows_first"


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "gpt_oss"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_16bit_within_twice_plain_pytorch(case, activation, bias, dtype, monkeypatch):
    monkeypatch.setattr(cpu_experts, "BLOCK_ROWS", 256)  # several blocks in the rows-first case
    monkeypatch.setattr(cpu_experts, "BACKWARD_BLOCK_ROWS", 256)
    monkeypatch.setattr(cpu_experts, "WEIGHTS_LEFT_MAX_ROWS", 1000)
    p = _problem(*CASES[case], dtype, bias, seed=7)
    assert _path(p) == case.removesuffix("_wide")
    args = (p["hidden"], p["gate_up_proj"], p["down_proj"], p["weights"], p["ids"])
    grad_out = torch.randn(p["hidden"].shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    with testing.poisoned_outputs():
        out, saved = cpu_experts.fused_experts_forward(*args, activation, p["gate_up_bias"], p["down_bias"], True)
        grads = cpu_experts.fused_experts_backward(
            grad_out, *args, activation, p["gate_up_bias"], p["down_bias"], saved
        )
    assert out.dtype == dtype and out.is_contiguous()
    plain, plain_grads = _plain_and_grads(p, activation, grad_out)
    p64 = _float64(p)
    testing.assert_within_plain(out, plain, _reference(p, activation), msg=f"{case} out")
    want_h = ref_experts.sorted_pre_activations(p64["hidden"], p64["gate_up_proj"], p["ids"], p64["gate_up_bias"])
    testing.assert_close(saved, want_h, dtype=dtype, msg="saved h: one rounding of a float32 sum")
    want_grads = ref_experts.fused_experts_backward(grad_out.double(), **p64, activation=activation)
    for name, got, plain_grad, expected in zip(GRAD_NAMES, grads, plain_grads, want_grads):
        if expected is None:
            assert got is None
            continue
        testing.assert_written(got, name)
        assert got.dtype == p[name].dtype
        plain_grad = torch.zeros_like(got) if plain_grad is None else plain_grad.to(got.dtype)
        testing.assert_within_plain(got, plain_grad, expected, dtype=dtype, msg=f"{case} grad of {name}")
    unrouted = torch.ones(p["gate_up_proj"].shape[0], dtype=torch.bool)
    unrouted[p["ids"][p["ids"] >= 0].unique()] = False
    assert (grads[1][unrouted] == 0).all() and (grads[2][unrouted] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_16bit_never_takes_the_reference(dtype, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a 16-bit CPU call reached the float32 reference")

    monkeypatch.setattr(ref_experts, "fused_experts", refuse)
    monkeypatch.setattr(ref_experts, "fused_experts_backward", refuse)
    monkeypatch.setattr(ref_experts, "sorted_pre_activations", refuse)
    for case in CASES.values():
        p = _problem(*case, dtype, bias=True, seed=3)
        for key in GRAD_NAMES:
            if p[key] is not None:
                p[key].requires_grad_()
        out = moe_kernels.fused_experts(**p)
        out.float().square().sum().backward()
        assert out.dtype == dtype and p["hidden"].grad.dtype == dtype


@pytest.mark.parametrize("num_tokens", [1, 2, 3, 7])
def test_features_first_pads_odd_row_counts(num_tokens, monkeypatch):
    # 3 slots per token: row counts that are not a multiple of 8 (16 bytes of bfloat16), the
    # features-first operands' padding; -1 slots leave fewer routed rows still.
    monkeypatch.setattr(experts_small, "MAX_GATHER_BYTES", 0)
    p = _problem(12, 3, 64, 40, num_tokens, torch.bfloat16, bias=True, seed=num_tokens)
    p["ids"][0, 0] = -1
    assert _path(p) == "features_first"
    with testing.poisoned_outputs():
        out = moe_kernels.fused_experts(**p)
    testing.assert_written(out)
    testing.assert_within_plain(out, testing.plain_fused_experts(**p), _reference(p))


def test_paths_by_dtype_and_rows(monkeypatch):
    x16, x32 = torch.empty(4, 8, dtype=torch.bfloat16), torch.empty(4, 8)
    few, many = torch.zeros(4, 8, dtype=torch.long), torch.zeros(200, 8, dtype=torch.long)
    assert cpu_experts._weights_left(x16, few)
    assert not cpu_experts._weights_left(x32, few)  # float32 GEMMs are fastest rows first
    monkeypatch.setattr(cpu_experts, "WEIGHTS_LEFT_MAX_ROWS", 1024)
    assert not cpu_experts._weights_left(x16, many)  # prefill


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "gpt_oss"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_activation_in_both_layouts(activation, dtype):
    h = torch.randn(9, 24, generator=torch.Generator().manual_seed(2)).to(dtype)
    h[0, 0], h[1, 1] = 8.0, -8.0  # GPT-OSS's clamps
    want = gated_activation(h.double(), activation)
    # Each element's arithmetic is the same; erf / tanh take a vector or a scalar path by layout.
    testing.assert_close(gated_activation(h, activation), want, dtype=dtype)
    testing.assert_close(gated_activation(h.t().contiguous(), activation, dim=0).t(), want, dtype=dtype)


@settings(max_examples=examples(40), deadline=None)
@given(data=st.data())
def test_property_16bit_forward_within_twice_plain(data):
    num_experts = data.draw(st.sampled_from([1, 4, 9]), label="E")
    k = data.draw(st.sampled_from([1, min(2, num_experts), num_experts]), label="k")
    hidden, inter = data.draw(st.sampled_from([(8, 8), (16, 24), (64, 16)]), label="H, I")
    num_tokens = data.draw(st.integers(0, 40), label="T")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    activation = data.draw(st.sampled_from(["silu", "gelu", "gpt_oss"]), label="activation")
    bias = data.draw(st.booleans(), label="bias")
    p = _problem(num_experts, k, hidden, inter, num_tokens, dtype, bias, seed=data.draw(st.integers(0, 2**16)))
    out = moe_kernels.fused_experts(**p, activation=activation)
    plain = testing.plain_fused_experts(**p, activation=activation)
    testing.assert_within_plain(out, plain, _reference(p, activation), msg=_path(p))
