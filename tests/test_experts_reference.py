"""The pure-PyTorch experts reference (``moe_kernels/reference/experts.py``): against loop oracles
written here from the formulas and against the C++ oracle (csrc_ref/experts_ref.cpp) in float64,
``torch._grouped_mm`` where it runs, and every explicit backward against autograd and gradcheck."""

from __future__ import annotations

import math
import re
from collections import Counter

import pytest
import torch
from cpp_reference import load_cpp_reference

from moe_kernels import reference
from moe_kernels.reference import experts as experts_ref
from moe_kernels.testing import assert_close

F64 = torch.float64
ACTIVATIONS = experts_ref.ACTIVATIONS


@pytest.fixture(scope="module")
def cref():
    return load_cpp_reference()


# ---------------------------------------------------------------- oracles written from the formulas


def _act_oracle(h: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "gpt_oss":
        gate, up = h[:, 0::2].clamp(max=7.0), h[:, 1::2].clamp(-7.0, 7.0)
        return (up + 1.0) * gate * torch.sigmoid(1.702 * gate)
    gate, up = h[:, : h.shape[1] // 2], h[:, h.shape[1] // 2 :]
    if activation == "silu":
        return gate * torch.sigmoid(gate) * up
    if activation == "gelu":
        return 0.5 * gate * (1.0 + torch.erf(gate / math.sqrt(2.0))) * up
    inner = math.sqrt(2.0 / math.pi) * (gate + 0.044715 * gate**3)
    return 0.5 * gate * (1.0 + torch.tanh(inner)) * up


def _fused_oracle(hidden, gate_up_proj, down_proj, weights, ids, activation, gate_up_bias=None, down_bias=None):
    """Per-expert float64 loop."""
    x = hidden.double()
    out = torch.zeros(x.shape, dtype=F64)
    for e in range(gate_up_proj.shape[0]):
        tokens, slots = (ids.long() == e).nonzero(as_tuple=True)
        h = x[tokens] @ gate_up_proj[e].double().T
        if gate_up_bias is not None:
            h = h + gate_up_bias[e].double()
        y = _act_oracle(h, activation) @ down_proj[e].double().T
        if down_bias is not None:
            y = y + down_bias[e].double()
        out.index_add_(0, tokens, weights[tokens, slots].double().unsqueeze(1) * y)
    return out


def _grouped_oracle(a, b, offsets):
    """Per-group float64 loop."""
    out = torch.zeros(a.shape[0], b.shape[-1], dtype=F64)
    start = 0
    for g, end in enumerate(offsets.tolist()):
        out[start:end] = a[start:end].double() @ b[g].double()
        start = end
    return out


# ---------------------------------------------------------------- inputs


def _ids(num_tokens, num_experts, k, mode, generator):
    if mode == "one":  # every slot on one expert
        return torch.full((num_tokens, k), num_experts // 2, dtype=torch.int32)
    if mode == "sparse":  # odd experts get no tokens (repeats within a token allowed)
        pool = torch.arange(0, num_experts, 2)
        return pool[torch.randint(len(pool), (num_tokens, k), generator=generator)].to(torch.int32)
    ids = torch.rand(num_tokens, num_experts, generator=generator).argsort(dim=-1)[:, :k].to(torch.int32)
    if mode == "holes":
        ids[torch.rand(num_tokens, k, generator=generator) < 0.3] = -1
        ids[:1] = -1  # one token with no expert at all
    return ids


def _problem(num_tokens, num_experts, k, hidden_dim, inter, *, mode="random", bias=False, seed=0, gate_scale=3.0):
    """Random float64 inputs (never zero). ``gate_scale`` sets the std of the pre-activation, so
    that a few GPT-OSS gates and ups lie beyond the clamp limit 7."""
    g = torch.Generator().manual_seed(seed)
    p = dict(
        hidden=torch.randn(num_tokens, hidden_dim, generator=g, dtype=F64),
        gate_up_proj=torch.randn(num_experts, 2 * inter, hidden_dim, generator=g, dtype=F64)
        * (gate_scale / math.sqrt(hidden_dim)),
        down_proj=torch.randn(num_experts, hidden_dim, inter, generator=g, dtype=F64) / math.sqrt(inter),
        weights=torch.rand(num_tokens, k, generator=g, dtype=F64) + 0.1,
        ids=_ids(num_tokens, num_experts, k, mode, g),
        gate_up_bias=torch.randn(num_experts, 2 * inter, generator=g, dtype=F64) if bias else None,
        down_bias=torch.randn(num_experts, hidden_dim, generator=g, dtype=F64) * 0.5 if bias else None,
    )
    return p


def _cast(p, dtype):
    return {name: t.to(dtype) if t is not None and t.is_floating_point() else t for name, t in p.items()}


def _call(fn, p, activation, **extra):
    return fn(
        p["hidden"],
        p["gate_up_proj"],
        p["down_proj"],
        p["weights"],
        p["ids"],
        activation=activation,
        gate_up_bias=p["gate_up_bias"],
        down_bias=p["down_bias"],
        **extra,
    )


def _oracle(p, activation):
    return _fused_oracle(
        p["hidden"],
        p["gate_up_proj"],
        p["down_proj"],
        p["weights"],
        p["ids"],
        activation,
        p["gate_up_bias"],
        p["down_bias"],
    )


def _cpp(cref, p, activation):
    return cref.fused_experts_ref(
        p["hidden"],
        p["gate_up_proj"],
        p["down_proj"],
        p["weights"],
        p["ids"],
        activation,
        p["gate_up_bias"],
        p["down_bias"],
    )


# (T, E, k, ids mode, H, I)
CASES = [
    (0, 5, 2, "random", 16, 12),
    (1, 1, 1, "random", 16, 12),
    (1, 8, 8, "holes", 16, 12),
    (7, 1, 1, "holes", 16, 12),
    (7, 5, 1, "random", 16, 12),
    (7, 5, 5, "random", 16, 12),
    (7, 8, 2, "holes", 16, 12),
    (64, 8, 2, "random", 16, 12),
    (64, 8, 8, "holes", 16, 12),
    (64, 5, 2, "one", 16, 12),
    (64, 8, 2, "sparse", 16, 12),
    (64, 8, 2, "random", 97, 47),
]
CASE_IDS = [f"T{t}-E{e}-k{k}-{mode}-H{h}-I{i}" for t, e, k, mode, h, i in CASES]


# ---------------------------------------------------------------- expert_counts


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_expert_counts(case, index_dtype):
    num_tokens, num_experts, k, mode = case[:4]
    ids = _ids(num_tokens, num_experts, k, mode, torch.Generator().manual_seed(1)).to(index_dtype)
    counts = reference.expert_counts(ids, num_experts)
    python = Counter(ids.flatten().tolist())
    assert counts.dtype == torch.int32
    assert counts.tolist() == [python[e] for e in range(num_experts)]


# ---------------------------------------------------------------- grouped_mm

# (M, K, N, offsets)
GROUP_CASES = [
    (10, 6, 5, [0, 3, 3, 10]),  # empty first and middle groups
    (9, 6, 5, [2, 5, 5]),  # rows 5..8 past the end
    (12, 6, 5, [12]),
    (7, 6, 5, [0, 7, 7]),
    (0, 6, 5, [0, 0, 0]),
    (8, 6, 5, [0, 0, 0]),  # every row past the end
    (33, 97, 47, [5, 5, 20, 30]),
]
GROUP_IDS = [f"M{m}-K{k}-N{n}-{'_'.join(map(str, o))}" for m, k, n, o in GROUP_CASES]


def _grouped_inputs(m, k, n, offsets, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k, generator=g, dtype=F64)
    # Scaled by 1/sqrt(K) so that outputs are O(1), like a layer's: the float32 tolerance's atol is
    # absolute, and the float32 rounding error grows with the output's scale.
    b = torch.randn(len(offsets), k, n, generator=g, dtype=F64) / math.sqrt(k)
    return a, b, torch.tensor(offsets, dtype=torch.int32)


@pytest.mark.parametrize("case", GROUP_CASES, ids=GROUP_IDS)
def test_grouped_mm(cref, case):
    a, b, offsets = _grouped_inputs(*case)
    out = reference.grouped_mm(a, b, offsets)
    want = _grouped_oracle(a, b, offsets)
    assert out.dtype == F64 and out.shape == want.shape
    assert_close(out, want)
    assert_close(cref.grouped_mm_ref(a, b, offsets), want)
    assert torch.equal(out[offsets[-1] :], torch.zeros_like(out[offsets[-1] :]))


@pytest.mark.parametrize("case", GROUP_CASES, ids=GROUP_IDS)
def test_grouped_mm_float32_and_strided(case):
    a, b, offsets = _grouped_inputs(*case)
    a32, b32 = a.float(), b.float()
    out = reference.grouped_mm(a32.T.contiguous().T, b32.transpose(1, 2).contiguous().transpose(1, 2), offsets)
    assert out.dtype == torch.float32
    assert_close(out, _grouped_oracle(a32, b32, offsets))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_grouped_mm_matches_torch(dtype):
    # K and N multiples of 8: _grouped_mm wants 16-byte aligned strides. Its rows past
    # offsets[-1] are left unwritten, so only the rows before are compared.
    a, b, offsets = _grouped_inputs(40, 32, 16, [0, 10, 10, 35])
    a, b = a.to(dtype), b.to(dtype)
    try:
        got = torch._grouped_mm(a, b, offsets)
    except (NotImplementedError, RuntimeError) as error:
        if isinstance(error, NotImplementedError) or re.search(
            r"support|expected mat_a to be|not implemented", str(error), re.IGNORECASE
        ):
            pytest.skip(str(error))
        raise
    out = reference.grouped_mm(a, b, offsets)
    assert out.dtype == got.dtype == dtype
    assert_close(out[:35], got[:35])


# ---------------------------------------------------------------- fused_experts forward


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_fused_experts(cref, case, activation, bias):
    p = _problem(*case[:3], *case[4:], mode=case[3], bias=bias, seed=sum(case[:3]))
    out = _call(reference.fused_experts, p, activation)
    want = _oracle(p, activation)
    assert out.dtype == F64 and out.shape == p["hidden"].shape
    assert_close(out, want)
    assert_close(_cpp(cref, p, activation), want)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fused_experts_noncontiguous(cref, activation):
    p = _problem(64, 8, 2, 97, 47, mode="holes", bias=True, seed=5)
    strided = dict(
        hidden=p["hidden"].T.contiguous().T,
        gate_up_proj=p["gate_up_proj"].transpose(1, 2).contiguous().transpose(1, 2),
        down_proj=torch.stack([p["down_proj"], -p["down_proj"]], dim=-1)[..., 0],
        weights=p["weights"].T.contiguous().T,
        ids=p["ids"].T.contiguous().T,
        gate_up_bias=torch.stack([p["gate_up_bias"], p["gate_up_bias"]], dim=0)[1],
        down_bias=p["down_bias"].T.contiguous().T,
    )
    assert not strided["hidden"].is_contiguous() and not strided["down_proj"].is_contiguous()
    out = _call(reference.fused_experts, strided, activation)
    assert_close(out, _oracle(p, activation))
    assert_close(_cpp(cref, strided, activation), _oracle(p, activation))


@pytest.mark.parametrize("case", [CASES[7], CASES[8], CASES[11]], ids=[CASE_IDS[7], CASE_IDS[8], CASE_IDS[11]])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_fused_experts_float32(case, activation, bias):
    # The float32 row of TOLERANCES has an absolute atol of 1e-6, while two float32 GEMMs err by
    # about sqrt(H) ulps of their terms: inputs at a layer's scale (pre-activations ~0.5, routing
    # weights summing to 1) keep the error ~3x under it over seeds.
    p = _problem(*case[:3], *case[4:], mode=case[3], bias=bias, seed=11, gate_scale=0.5)
    p["weights"] = p["weights"] / p["weights"].sum(dim=-1, keepdim=True)
    if bias:
        p["gate_up_bias"], p["down_bias"] = p["gate_up_bias"] * 0.5, p["down_bias"] * 0.5
    p = _cast(p, torch.float32)
    out = _call(reference.fused_experts, p, activation)
    assert out.dtype == torch.float32
    assert_close(out, _oracle(p, activation))


def test_fused_experts_bfloat16_dtypes():
    """bf16 activations and weights with float32 routing weights: output and gradients come back
    in each input's dtype."""
    p = _problem(7, 5, 2, 16, 12, mode="holes", bias=True, seed=3)
    p = {**_cast(p, torch.bfloat16), "weights": p["weights"].float()}
    out = _call(reference.fused_experts, p, "silu")
    assert out.dtype == torch.bfloat16
    assert_close(out, _oracle(p, "silu"))
    grads = reference.fused_experts_backward(
        torch.ones_like(out),
        p["hidden"],
        p["gate_up_proj"],
        p["down_proj"],
        p["weights"],
        p["ids"],
        activation="silu",
        gate_up_bias=p["gate_up_bias"],
        down_bias=p["down_bias"],
    )
    names = ["hidden", "gate_up_proj", "down_proj", "weights", "gate_up_bias", "down_bias"]
    assert [grad.dtype for grad in grads] == [p[name].dtype for name in names]
    assert [grad.shape for grad in grads] == [p[name].shape for name in names]


@pytest.mark.parametrize("fn", [reference.gated_activation, reference.fused_experts])
def test_bad_activation(fn):
    p = _problem(3, 2, 1, 4, 2)
    with pytest.raises(ValueError, match=r"activation must be one of .*'silu'.*got 'relu'"):
        if fn is reference.gated_activation:
            fn(p["hidden"], "relu")
        else:
            _call(fn, p, "relu")


# ---------------------------------------------------------------- backward


@pytest.mark.parametrize("case", GROUP_CASES[:-1], ids=GROUP_IDS[:-1])
def test_grouped_mm_backward(case):
    a, b, offsets = _grouped_inputs(*case)
    a.requires_grad_(True)
    b.requires_grad_(True)
    torch.autograd.gradcheck(lambda x, y: reference.grouped_mm(x, y, offsets), (a, b))
    grad_out = torch.randn(a.shape[0], b.shape[-1], dtype=F64)
    want_a, want_b = torch.autograd.grad(reference.grouped_mm(a, b, offsets), (a, b), grad_out)
    grad_a, grad_b = reference.grouped_mm_backward(grad_out, a.detach(), b.detach(), offsets)
    assert_close(grad_a, want_a)
    assert_close(grad_b, want_b)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gated_activation_backward(activation):
    # limit 1.5: many GPT-OSS values are clamped; gradcheck needs none within eps of the kink.
    options = dict(limit=1.5, alpha=1.3)
    x = torch.randn(6, 10, dtype=F64) * 2
    x = torch.where((x.abs() - 1.5).abs() < 1e-3, x + 0.01, x).requires_grad_(True)
    torch.autograd.gradcheck(lambda t: reference.gated_activation(t, activation, **options), (x,))
    # At exactly +-limit autograd's clamp passes the gradient: the explicit backward must too.
    boundary = x.detach().clone()
    boundary[0, :4] = torch.tensor([1.5, -1.5, 1.5, 1.5], dtype=F64)
    boundary.requires_grad_(True)
    grad_out = torch.randn(6, 5, dtype=F64)
    (want,) = torch.autograd.grad(reference.gated_activation(boundary, activation, **options), boundary, grad_out)
    got = reference.gated_activation_backward(grad_out, boundary.detach(), activation, **options)
    assert_close(got, want)


def _differentiable(p):
    return [
        name
        for name in ("hidden", "gate_up_proj", "down_proj", "weights", "gate_up_bias", "down_bias")
        if p[name] is not None
    ]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_fused_experts_gradcheck(activation, bias):
    p = _problem(5, 3, 2, 4, 3, mode="holes", bias=bias, seed=7, gate_scale=8.0)
    names = _differentiable(p)

    def fn(*tensors):
        return _call(reference.fused_experts, {**p, **dict(zip(names, tensors))}, activation)

    torch.autograd.gradcheck(fn, tuple(p[name].requires_grad_(True) for name in names))


@pytest.mark.parametrize(
    "case", [CASES[i] for i in (0, 3, 5, 8, 9, 10, 11)], ids=[CASE_IDS[i] for i in (0, 3, 5, 8, 9, 10, 11)]
)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_fused_experts_backward(case, activation, bias):
    p = _problem(*case[:3], *case[4:], mode=case[3], bias=bias, seed=13)
    names = _differentiable(p)
    inputs = [p[name].requires_grad_(True) for name in names]
    grad_out = torch.randn(p["hidden"].shape, dtype=F64)
    want = torch.autograd.grad(_call(reference.fused_experts, p, activation), inputs, grad_out, allow_unused=True)
    got = reference.fused_experts_backward(
        grad_out,
        *(p[name].detach() for name in ("hidden", "gate_up_proj", "down_proj", "weights")),
        p["ids"],
        activation=activation,
        gate_up_bias=None if p["gate_up_bias"] is None else p["gate_up_bias"].detach(),
        down_bias=None if p["down_bias"] is None else p["down_bias"].detach(),
    )
    assert (got[4] is None, got[5] is None) == (not bias, not bias)
    got = [g for g in got if g is not None]
    for name, g, w in zip(names, got, want):
        w = torch.zeros_like(g) if w is None else w
        assert g.dtype == p[name].dtype and g.shape == p[name].shape, name
        assert_close(g, w, msg=name)
    grad_weights = got[3]
    assert torch.equal(grad_weights[p["ids"] == -1], torch.zeros_like(grad_weights[p["ids"] == -1]))


# ---------------------------------------------------------------- C++ oracle arguments


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda m, p: m.fused_experts_ref(
                p["hidden"], p["gate_up_proj"], p["down_proj"], p["weights"], p["ids"], "relu", None, None
            ),
            "activation",
        ),
        (
            lambda m, p: m.fused_experts_ref(
                p["hidden"], p["gate_up_proj"], p["down_proj"], p["weights"], p["ids"] + 5, "silu", None, None
            ),
            "out of range",
        ),
        (
            lambda m, p: m.grouped_mm_ref(
                p["hidden"], p["gate_up_proj"].transpose(1, 2), torch.tensor([2, 1], dtype=torch.int32)
            ),
            "non-decreasing",
        ),
    ],
    ids=["activation", "ids", "offsets"],
)
def test_cpp_bad_arguments(cref, call, message):
    with pytest.raises(RuntimeError, match=message):
        call(cref, _problem(3, 2, 1, 4, 2))


def test_cpp_empty_biases_mean_none(cref):
    p = _problem(7, 5, 2, 16, 12, mode="holes")
    empty = torch.empty(0, dtype=F64)
    got = cref.fused_experts_ref(
        p["hidden"], p["gate_up_proj"], p["down_proj"], p["weights"], p["ids"], "silu", empty, empty
    )
    assert_close(got, _oracle(p, "silu"))
