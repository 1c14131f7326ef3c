"""Experts family, reference path: the pure-PyTorch experts reference and the public ops' CPU path
(``grouped_mm``, ``fused_experts``, ``moe_align``, ``expert_counts``) against the float64 loop
oracles (tests/oracles.py), the C++ oracle (csrc_ref/experts_ref.cpp) and ``torch._grouped_mm``
where it runs; properties on random shapes, dtypes, layouts and ids."""

from __future__ import annotations

import re

import pytest
import torch
from cpp_reference import load_cpp_reference
from experts_cases import (
    CASE_IDS,
    CASES,
    F64,
    GROUP_CASES,
    GROUP_IDS,
    SHAPES,
    call,
    cast,
    cpp,
    fused_problem,
    grouped_inputs,
    grouped_normal_inputs,
    inputs_of,
    oracle,
    reference_problem,
    routed_ids,
    to_float64,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import expert_counts_oracle, fused_experts_oracle, grouped_mm_oracle, moe_align_oracle
from strategies import examples, generator, lay_out, layouts, reference_dtypes, seeds, token_counts

import moe_kernels as mk
from moe_kernels import reference
from moe_kernels.config import ACTIVATIONS
from moe_kernels.testing import assert_close


@pytest.fixture(scope="module")
def cref():
    return load_cpp_reference()


# ---------------------------------------------------------------- expert_counts, moe_align


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_expert_counts(case, index_dtype):
    num_tokens, num_experts, k, mode = case[:4]
    ids = routed_ids(num_tokens, num_experts, k, mode, torch.Generator().manual_seed(1)).to(index_dtype)
    counts = reference.expert_counts(ids, num_experts)
    assert counts.dtype == torch.int32
    assert counts.tolist() == expert_counts_oracle(ids, num_experts)


def test_moe_align_sorts_slots_stably():
    ids = torch.tensor([[2, 0], [-1, 2], [1, 0], [0, -1]], dtype=torch.int32)
    align = mk.moe_align(ids, 3)
    assert align.order.tolist() == [1, 5, 6, 4, 0, 3, 2, 7]
    assert align.tokens.tolist() == [0, 2, 3, 2, 0, 1, 1, 3]
    assert align.experts.tolist() == [0, 0, 0, 1, 2, 2, 3, 3]
    assert align.counts.tolist() == [3, 1, 2] and align.offsets.tolist() == [3, 4, 6]
    assert align.positions[align.order].tolist() == list(range(8))
    assert torch.equal(mk.expert_counts(ids, 3), align.counts)
    assert torch.equal(mk.expert_counts(ids, 3), reference.expert_counts(ids, 3))


# ---------------------------------------------------------------- grouped_mm


def test_grouped_mm_oracle_matches_reference():
    a, b, offsets, _ = grouped_inputs(*SHAPES["empty-first-mid-last"], dtype=torch.float64)
    torch.testing.assert_close(reference.grouped_mm(a, b, offsets), grouped_mm_oracle(a, b, offsets))


@pytest.mark.parametrize("case", GROUP_CASES, ids=GROUP_IDS)
def test_grouped_mm(cref, case):
    a, b, offsets = grouped_normal_inputs(*case)
    out = reference.grouped_mm(a, b, offsets)
    want = grouped_mm_oracle(a, b, offsets)
    assert out.dtype == F64 and out.shape == want.shape
    assert_close(out, want)
    assert_close(cref.grouped_mm_ref(a, b, offsets), want)
    assert torch.equal(out[offsets[-1] :], torch.zeros_like(out[offsets[-1] :]))


@pytest.mark.parametrize("case", GROUP_CASES, ids=GROUP_IDS)
def test_grouped_mm_float32_and_strided(case):
    a, b, offsets = grouped_normal_inputs(*case)
    a32, b32 = a.float(), b.float()
    out = reference.grouped_mm(a32.T.contiguous().T, b32.transpose(1, 2).contiguous().transpose(1, 2), offsets)
    assert out.dtype == torch.float32
    assert_close(out, grouped_mm_oracle(a32, b32, offsets))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_grouped_mm_matches_torch(dtype):
    # K and N multiples of 8: _grouped_mm wants 16-byte aligned strides. Its rows past
    # offsets[-1] are left unwritten, so only the rows before are compared.
    a, b, offsets = grouped_normal_inputs(40, 32, 16, [0, 10, 10, 35])
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
    p = reference_problem(*case[:3], *case[4:], mode=case[3], bias=bias, seed=sum(case[:3]))
    out = call(reference.fused_experts, p, activation)
    want = oracle(p, activation)
    assert out.dtype == F64 and out.shape == p["hidden"].shape
    assert_close(out, want)
    assert_close(cpp(cref, p, activation), want)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fused_experts_noncontiguous(cref, activation):
    p = reference_problem(64, 8, 2, 97, 47, mode="holes", bias=True, seed=5)
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
    out = call(reference.fused_experts, strided, activation)
    assert_close(out, oracle(p, activation))
    assert_close(cpp(cref, strided, activation), oracle(p, activation))


@pytest.mark.parametrize("case", [CASES[7], CASES[8], CASES[11]], ids=[CASE_IDS[7], CASE_IDS[8], CASE_IDS[11]])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_fused_experts_float32(case, activation, bias):
    # The float32 row of TOLERANCES has an absolute atol of 1e-6, while two float32 GEMMs err by
    # about sqrt(H) ulps of their terms: inputs at a layer's scale (pre-activations ~0.5, routing
    # weights summing to 1) keep the error ~3x under it over seeds.
    p = reference_problem(*case[:3], *case[4:], mode=case[3], bias=bias, seed=11, gate_scale=0.5)
    p["weights"] = p["weights"] / p["weights"].sum(dim=-1, keepdim=True)
    if bias:
        p["gate_up_bias"], p["down_bias"] = p["gate_up_bias"] * 0.5, p["down_bias"] * 0.5
    p = cast(p, torch.float32)
    out = call(reference.fused_experts, p, activation)
    assert out.dtype == torch.float32
    assert_close(out, oracle(p, activation))


def test_fused_experts_bfloat16_dtypes():
    """bf16 activations and weights with float32 routing weights: output and gradients come back
    in each input's dtype."""
    p = reference_problem(7, 5, 2, 16, 12, mode="holes", bias=True, seed=3)
    p = {**cast(p, torch.bfloat16), "weights": p["weights"].float()}
    out = call(reference.fused_experts, p, "silu")
    assert out.dtype == torch.bfloat16
    assert_close(out, oracle(p, "silu"))
    grads = reference.fused_experts_backward(
        torch.ones_like(out),
        *inputs_of(p),
        activation="silu",
        gate_up_bias=p["gate_up_bias"],
        down_bias=p["down_bias"],
    )
    names = ["hidden", "gate_up_proj", "down_proj", "weights", "gate_up_bias", "down_bias"]
    assert [grad.dtype for grad in grads] == [p[name].dtype for name in names]
    assert [grad.shape for grad in grads] == [p[name].shape for name in names]


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_public_op_reference_path_matches_oracle(activation):
    p = fused_problem(9, 16, 6, 4, 2, bias=activation == "gpt_oss")
    out = mk.fused_experts(**p, activation=activation)
    want = fused_experts_oracle(**to_float64(p), activation=activation)
    assert out.dtype == torch.float32
    assert_close(out, want, dtype=torch.float32, msg=activation)


# ---------------------------------------------------------------- C++ oracle arguments


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda m, p: m.fused_experts_ref(*inputs_of(p), "relu", None, None),
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
        call(cref, reference_problem(3, 2, 1, 4, 2))


def test_cpp_empty_biases_mean_none(cref):
    p = reference_problem(7, 5, 2, 16, 12, mode="holes")
    empty = torch.empty(0, dtype=F64)
    got = cref.fused_experts_ref(*inputs_of(p), "silu", empty, empty)
    assert_close(got, oracle(p, "silu"))


# ------------------------------------------------------------------------------------------------
# Properties: random shapes (T = 0, 1, primes; odd and prime E, H, I; k = 1 and k = E), ids with
# empty slots and repeats, dtypes and layouts, against the float64 oracles.


@settings(max_examples=examples(400))
@given(data=st.data())
def test_property_moe_align_and_expert_counts_match_oracle(data):
    num_tokens = data.draw(token_counts, label="T")
    num_experts = data.draw(st.sampled_from([1, 2, 5, 60, 257]), label="E")
    k = data.draw(st.sampled_from([0, 1, 2, 8]), label="k")
    source = generator(data.draw(seeds, label="seed"))
    ids = torch.randint(-1, num_experts, (num_tokens, k), generator=source)
    ids = ids.to(data.draw(st.sampled_from([torch.int32, torch.int64]), label="dtype"))
    ids = lay_out(ids, data.draw(layouts, label="layout"))
    align = mk.moe_align(ids, num_experts)
    counts = mk.expert_counts(ids, num_experts)
    want = moe_align_oracle(ids, num_experts)
    assert counts.dtype == torch.int32 and counts.tolist() == want["counts"]
    for field, values in want.items():
        got = getattr(align, field)
        assert got.dtype == (torch.int64 if field == "order" else torch.int32), field
        assert got.tolist() == values, field


@settings(max_examples=examples(300))
@given(data=st.data())
def test_property_grouped_mm_matches_oracle(data):
    rows, width, cols = (data.draw(st.sampled_from(sizes)) for sizes in ([0, 1, 7, 31], [1, 5, 16], [1, 3, 24]))
    num_groups = data.draw(st.sampled_from([0, 1, 2, 5]), label="G")
    source = generator(data.draw(seeds, label="seed"))
    ends = sorted(torch.randint(0, rows + 1, (num_groups,), generator=source).tolist())
    offsets = torch.tensor(ends, dtype=torch.int32)
    dtype = data.draw(reference_dtypes, label="dtype")
    a = lay_out(torch.randn(rows, width, generator=source).to(dtype), data.draw(layouts, label="a layout"))
    b = lay_out(torch.randn(num_groups, width, cols, generator=source).to(dtype), data.draw(layouts, label="b"))
    if data.draw(st.booleans(), label="b transposed view"):  # the (G, K, N) view of a (G, N, K) tensor
        b = b.transpose(1, 2).contiguous().transpose(1, 2)
    out = mk.grouped_mm(a, b, offsets, backend="torch")
    assert out.dtype == dtype and out.shape == (rows, cols)
    want = grouped_mm_oracle(a, b, offsets)
    # Accumulated in float32 and rounded once to the dtype.
    assert_close(out, want, dtype=dtype, msg=f"offsets {ends}")
    assert bool((out[ends[-1] if ends else 0 :] == 0).all())


@settings(max_examples=examples(100))
@given(data=st.data())
def test_property_fused_experts_matches_oracle(data):
    num_tokens = data.draw(token_counts, label="T")
    num_experts = data.draw(st.sampled_from([1, 2, 5, 8]), label="E")
    k = data.draw(st.sampled_from([1, min(2, num_experts), num_experts]), label="k")
    hidden_size, inter = data.draw(st.sampled_from([(4, 2), (16, 12), (13, 7)]), label="H, I")
    activation = data.draw(st.sampled_from(ACTIVATIONS), label="activation")
    bias = data.draw(st.booleans(), label="bias")
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64, torch.float16]), label="dtype")
    seed = data.draw(seeds, label="seed")
    mode = data.draw(st.sampled_from(["random", "holes", "sparse"]), label="ids")
    gate_scale = data.draw(st.sampled_from([0.5, 3.0, 12.0]), label="pre-activation scale")  # 12: clamps
    p = reference_problem(
        num_tokens, num_experts, k, hidden_size, inter, mode=mode, bias=bias, seed=seed, gate_scale=gate_scale
    )
    p["ids"] = p["ids"].to(data.draw(st.sampled_from([torch.int32, torch.int64])))
    p["weights"] = p["weights"] / p["weights"].sum(-1, keepdim=True)  # routing weights of a layer
    p = {**cast(p, dtype), "weights": p["weights"].to(torch.float64 if dtype == torch.float64 else torch.float32)}
    p = {key: None if t is None else lay_out(t, data.draw(layouts, label=key)) for key, t in p.items()}
    out = call(mk.fused_experts, p, activation, backend="torch")
    assert out.dtype == dtype and out.shape == p["hidden"].shape
    assert_close(out, oracle(p, activation), dtype=dtype, op="fused_experts")
