"""Experts family, library: gradcheck in float64 and the explicit backward formulas against
autograd, ``torch.library`` opcheck of ``grouped_mm``, ``fused_experts`` and their backward ops,
torch.compile equals eager, the eager ``autograd.Function`` equals the registered op; reference
path, and the kernel path (``kernel``)."""

from __future__ import annotations

import pytest
import torch
from experts_cases import (
    CASE_IDS,
    CASES,
    GROUP_CASES,
    GROUP_IDS,
    SHAPES,
    SMALL,
    biases_of,
    call,
    fused_problem,
    grouped_inputs,
    grouped_normal_inputs,
    inputs_of,
    reference_problem,
    small_tiles,
)
from helpers import assert_compile_matches_eager, assert_function_matches_op

import moe_kernels as mk
from moe_kernels import activations, reference, testing
from moe_kernels.config import ACTIVATIONS
from moe_kernels.functional.grouped_mm import grouped_mm
from moe_kernels.ops.experts import FUSED_EXPERTS
from moe_kernels.ops.grouped_mm import GROUPED_MM
from moe_kernels.ops.tuned_configs import pinned_config
from moe_kernels.testing import assert_close

F64 = torch.float64

# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("shape", ["m0", "tail", "empty-first-mid-last"])
def test_grouped_mm_torch_backend_matches_reference_autograd(shape):
    a, b, offsets, grad = grouped_inputs(*SHAPES[shape], dtype=torch.float64)
    a_op, b_op = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    out = grouped_mm(a_op, b_op, offsets, backend="torch")
    out.backward(grad)
    a_ref, b_ref = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    want = reference.grouped_mm(a_ref, b_ref, offsets)
    want.backward(grad)
    assert out.dtype == torch.float64 and out.shape == want.shape
    testing.assert_close(out, want)
    testing.assert_close(a_op.grad, a_ref.grad)
    testing.assert_close(b_op.grad, b_ref.grad)


def test_grouped_mm_gradcheck_float64():
    a, b, offsets, _ = grouped_inputs(9, 4, 3, [2, 0, 5], dtype=torch.float64)
    args = (a.requires_grad_(True), b.requires_grad_(True))
    assert torch.autograd.gradcheck(lambda x, y: grouped_mm(x, y, offsets, backend="torch"), args)


def test_fused_experts_gradients_reach_every_input():
    p = fused_problem(7, 8, 4, 3, 2, dtype=torch.float64, bias=True)
    leaves = {key: v.requires_grad_() for key, v in p.items() if key != "ids"}
    assert torch.autograd.gradcheck(
        lambda *args: mk.fused_experts(
            *args[:4], p["ids"], gate_up_bias=args[4], down_bias=args[5], activation="gpt_oss"
        ),
        tuple(leaves[key] for key in ("hidden", "gate_up_proj", "down_proj", "weights", "gate_up_bias", "down_bias")),
    )


@pytest.mark.parametrize("case", GROUP_CASES[:-1], ids=GROUP_IDS[:-1])
def test_grouped_mm_backward(case):
    a, b, offsets = grouped_normal_inputs(*case)
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


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_production_activation_matches_the_reference(activation, dtype):
    # moe_kernels.activations (GatedMLP, the expert-parallel layer, the CPU experts) against the
    # oracle, forward and its written-out backward against autograd; scaled so that GPT-OSS's
    # clamp at 7 cuts many values, with some exactly at +-7 (where autograd passes the gradient).
    x = torch.randn(6, 10, dtype=F64) * 8
    x[0, :4] = torch.tensor([7.0, -7.0, 7.0, 7.0], dtype=F64)
    grad_out = torch.randn(6, 5, dtype=F64)
    xr = x.clone().requires_grad_(True)
    want = reference.gated_activation(xr, activation)
    (want_grad,) = torch.autograd.grad(want, xr, grad_out)
    got = activations.gated_activation(x.to(dtype), activation)
    got_grad = activations.gated_activation_backward(grad_out.to(dtype), x.to(dtype), activation)
    assert got.dtype == got_grad.dtype == dtype
    # float32: relative to the largest value (the inputs reach 20; a value near 0 carries the
    # rounding of the large terms it cancels).
    for result, oracle in ((got, want), (got_grad, want_grad)):
        scale = oracle.detach().abs().max()
        assert_close(result / scale, oracle.detach() / scale, dtype=dtype)


def _differentiable(p):
    return [
        name
        for name in ("hidden", "gate_up_proj", "down_proj", "weights", "gate_up_bias", "down_bias")
        if p[name] is not None
    ]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_fused_experts_gradcheck(activation, bias):
    p = reference_problem(5, 3, 2, 4, 3, mode="holes", bias=bias, seed=7, gate_scale=8.0)
    names = _differentiable(p)

    def fn(*tensors):
        return call(reference.fused_experts, {**p, **dict(zip(names, tensors))}, activation)

    torch.autograd.gradcheck(fn, tuple(p[name].requires_grad_(True) for name in names))


@pytest.mark.parametrize(
    "case", [CASES[i] for i in (0, 3, 5, 8, 9, 10, 11)], ids=[CASE_IDS[i] for i in (0, 3, 5, 8, 9, 10, 11)]
)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_fused_experts_backward(case, activation, bias):
    p = reference_problem(*case[:3], *case[4:], mode=case[3], bias=bias, seed=13)
    names = _differentiable(p)
    inputs = [p[name].requires_grad_(True) for name in names]
    grad_out = torch.randn(p["hidden"].shape, dtype=F64)
    want = torch.autograd.grad(call(reference.fused_experts, p, activation), inputs, grad_out, allow_unused=True)
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


# ---------------------------------------------------------------- torch.library


@pytest.mark.parametrize("shape", ["m0", "m1", "tail"])
def test_grouped_mm_opcheck_reference_path(shape):
    a, b, offsets, _ = grouped_inputs(*SHAPES[shape])
    for requires_grad in (False, True):
        args = (a.clone().requires_grad_(requires_grad), b.clone().requires_grad_(requires_grad), offsets, False)
        torch.library.opcheck(torch.ops.moe_kernels.grouped_mm.default, args)
    grad = torch.randn(a.shape[0], b.shape[2])
    torch.library.opcheck(torch.ops.moe_kernels.grouped_mm_backward.default, (grad, a, b, offsets, False))


@pytest.mark.parametrize("num_tokens", [0, 1, 5])
def test_fused_experts_opcheck(num_tokens):
    p = fused_problem(num_tokens, 8, 4, 3, 2, bias=True)
    for key in ("hidden", "gate_up_proj", "down_proj", "weights"):
        p[key].requires_grad_()
    args = (*inputs_of(p), "silu", *biases_of(p), False, True)
    torch.library.opcheck(FUSED_EXPERTS.op, args)


def test_fused_experts_backward_opcheck():
    p = fused_problem(5, 8, 4, 3, 2, bias=True)
    _, h = FUSED_EXPERTS.op(*inputs_of(p), "gelu", *biases_of(p), False, True)
    grad = torch.randn(5, 8)
    for biases in (biases_of(p), (None, None)):
        torch.library.opcheck(FUSED_EXPERTS.backward_op, (grad, *inputs_of(p), h, "gelu", *biases, False))


def test_eager_function_matches_registered_op():
    a, b, offsets, _ = grouped_inputs(*SHAPES["tail"])
    assert_function_matches_op(GROUPED_MM, (a.requires_grad_(True), b.requires_grad_(True), offsets, False))
    p = fused_problem(9, 8, 4, 3, 2, bias=True)
    for key in ("hidden", "gate_up_proj", "down_proj", "weights", "gate_up_bias", "down_bias"):
        p[key].requires_grad_(True)
    assert_function_matches_op(FUSED_EXPERTS, (*inputs_of(p), "gpt_oss", *biases_of(p), False, False))


@pytest.mark.kernel
def test_grouped_mm_kernel_opcheck_and_eager_function(kernel_device):
    a, b, offsets, _ = grouped_inputs(*SHAPES["tail"], device=kernel_device)
    with pinned_config(**SMALL):
        args = (a.clone().requires_grad_(True), b.clone().requires_grad_(True), offsets, True)
        torch.library.opcheck(torch.ops.moe_kernels.grouped_mm.default, args)
        assert_function_matches_op(GROUPED_MM, args)


# ---------------------------------------------------------------- torch.compile


def test_grouped_mm_compile_fullgraph_matches_eager():
    a, b, offsets, _ = grouped_inputs(*SHAPES["empty-first-mid-last"])

    def multiply(x, y):
        return grouped_mm(x, y, offsets, backend="torch")

    assert_compile_matches_eager(multiply, (a.requires_grad_(True), b.requires_grad_(True)))


def test_fused_experts_compile_fullgraph_matches_eager():
    p = fused_problem(11, 8, 4, 3, 2)
    p["hidden"].requires_grad_()

    def layer(hidden):
        return mk.fused_experts(hidden, p["gate_up_proj"], p["down_proj"], p["weights"], p["ids"])

    assert_compile_matches_eager(layer, (p["hidden"],))


def test_align_compile_fullgraph_matches_eager():
    ids = torch.randint(-1, 5, (13, 3), generator=torch.Generator().manual_seed(0), dtype=torch.int32)

    def align(i):
        return (*mk.moe_align(i, 5), mk.expert_counts(i, 5))

    assert_compile_matches_eager(align, (ids,))


@pytest.mark.kernel
def test_fused_experts_kernel_functional_and_compile(kernel_device):
    p = fused_problem(12, 16, 8, 4, 2, device=kernel_device)
    p["hidden"].requires_grad_()
    weights = [p[key] for key in ("gate_up_proj", "down_proj", "weights", "ids")]
    with small_tiles(kernel_device):
        assert_compile_matches_eager(
            lambda hidden: mk.fused_experts(hidden, *weights, backend="triton"), (p["hidden"],)
        )
        eager = mk.fused_experts(**p, backend="triton")
        eager.sum().backward()
    want = reference.fused_experts(**{key: (v.detach() if isinstance(v, torch.Tensor) else v) for key, v in p.items()})
    assert_close(eager.detach(), want)
