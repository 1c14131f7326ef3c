"""The independent C++ oracle (csrc_ref/routing_ref.cpp) against the PyTorch reference and the
registered op (``backend="torch"``), on float64 random inputs.

Random float64 ``randn`` logits are tie-free in practice, so ids are compared exactly; weights
and gradients within the float64 tolerance.
"""

from __future__ import annotations

import pytest
import torch
from cpp_reference import load_cpp_reference
from oracles import ROUTING_DEFAULTS, with_defaults
from routing_cases import routing_cases, routing_inputs

import moe_kernels
from moe_kernels import reference
from moe_kernels.config import RoutingConfig
from moe_kernels.testing import assert_close, tolerance

ATOL, RTOL = tolerance(torch.float64)


@pytest.fixture(scope="module")
def cref():
    return load_cpp_reference()


def _randn(*shape, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


def _bias(num_experts: int, score_func: str, seed: int) -> torch.Tensor:
    # Of the order of the scores (softmax ~ 1/E, sigmoid ~ 0.5), so that both the scores and the
    # bias decide the ranking.
    magnitude = 1.0 / num_experts if score_func == "softmax" else 0.1
    return _randn(num_experts, seed=seed) * magnitude


def _cpp_softmax_topk(cref, logits, k, bias=None, **routing):
    """The C++ oracle's ``(weights, ids)`` with the routing given as keyword options (flattened
    into its positional arguments: 0 for no groups)."""
    o = with_defaults(routing, ROUTING_DEFAULTS, "_cpp_softmax_topk")
    groups = (o["num_groups"] or 0, o["topk_groups"] or 0, o["group_score"])
    return cref.softmax_topk_ref(logits, k, o["renormalize"], o["score_func"], bias, *groups, o["scale"])


def _backward_options(routing: dict) -> tuple:
    """``(renormalize, score_func, scale)`` of keyword routing options: what the backward reads."""
    o = with_defaults(routing, ROUTING_DEFAULTS, "_backward_options")
    return o["renormalize"], o["score_func"], o["scale"]


def _check(cref, logits, k, routing, bias=None, grad_seed=None):
    """Forward (and, with grad_seed, backward) of the oracle, the reference and the op agree on
    the keyword routing options ``routing``."""
    c_weights, c_ids = _cpp_softmax_topk(cref, logits, k, bias, **routing)
    assert c_weights.dtype == torch.float64 and c_ids.dtype == torch.int32
    assert c_weights.shape == c_ids.shape == (logits.shape[0], k)

    r_weights, r_ids = reference.softmax_topk(logits, k, routing=RoutingConfig(**routing), bias=bias)
    x = logits.clone().requires_grad_(grad_seed is not None)
    o_weights, o_ids = moe_kernels.softmax_topk(x, k, bias=bias, backend="torch", **routing)

    assert torch.equal(c_ids, r_ids), "ids differ from the reference"
    assert torch.equal(c_ids, o_ids), "ids differ from the registered op"
    torch.testing.assert_close(c_weights, r_weights, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(c_weights, o_weights.detach(), atol=ATOL, rtol=RTOL)
    if grad_seed is None:
        return

    grad_weights = _randn(logits.shape[0], k, seed=grad_seed)
    renormalize, score_func, scale = _backward_options(routing)
    c_grad = cref.softmax_topk_backward_ref(grad_weights, logits, c_ids, renormalize, score_func, scale)
    r_grad = reference.softmax_topk_backward(grad_weights, logits, r_ids, routing=RoutingConfig(**routing))
    assert c_grad.dtype == torch.float64 and c_grad.shape == logits.shape
    torch.testing.assert_close(c_grad, r_grad, atol=ATOL, rtol=RTOL)
    if logits.shape[0]:
        o_weights.backward(grad_weights)
        torch.testing.assert_close(c_grad, x.grad, atol=ATOL, rtol=RTOL)


def _check_random(cref, num_tokens, num_experts, k, seed, with_bias, **routing):
    """:func:`_check` on random float64 logits (and bias) drawn from ``seed``, with a backward."""
    logits = _randn(num_tokens, num_experts, seed=seed)
    bias = _bias(num_experts, routing.get("score_func", "softmax"), seed + 1) if with_bias else None
    _check(cref, logits, k, routing, bias, grad_seed=seed + 2)


# (E, k): odd sizes, with k = 1 and k = E (E = 1 has only k = 1 = E).
SIZES = [(1, 1), (2, 1), (2, 2), (60, 1), (60, 60), (257, 1), (257, 257)]


@pytest.mark.parametrize("num_tokens", [0, 1, 7, 1000])
@pytest.mark.parametrize("num_experts, k", SIZES, ids=[f"E{e}-k{k}" for e, k in SIZES])
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [False, True], ids=["plain", "renorm"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_no_groups(cref, num_tokens, num_experts, k, score_func, renormalize, with_bias):
    routing = dict(renormalize=renormalize, score_func=score_func, scale=1.0 if renormalize else 1.7)
    _check_random(cref, num_tokens, num_experts, k, 1000 * num_experts + num_tokens, with_bias, **routing)


GROUP_CASES = [
    # (E, num_groups, topk_groups, group_score, score_func, bias, renormalize, scale, k)
    (160, 8, 3, "max", "softmax", False, False, 16.0, 6),  # DeepSeek-V2 style
    (160, 8, 3, "max", "softmax", True, True, 16.0, 1),
    (160, 8, 3, "top2_sum", "softmax", False, True, 1.0, 6),
    (160, 8, 3, "top2_sum", "softmax", True, False, 1.0, 60),  # k = every eligible expert
    (256, 8, 4, "top2_sum", "sigmoid", True, True, 2.5, 8),  # DeepSeek-V3 noaux_tc
    (256, 8, 4, "top2_sum", "sigmoid", True, True, 2.5, 128),
    (256, 8, 4, "max", "sigmoid", True, True, 2.5, 8),
    (256, 8, 4, "max", "sigmoid", False, False, 2.5, 1),
    (60, 60, 7, "max", "softmax", True, True, 1.0, 7),  # one expert per group
    (60, 30, 5, "top2_sum", "sigmoid", False, False, 1.0, 3),  # two experts per group
    (257, 1, 1, "top2_sum", "sigmoid", True, True, 1.0, 9),  # one group holding everything
    (257, 257, 13, "max", "softmax", False, True, 3.0, 13),
]


@pytest.mark.parametrize("num_tokens", [0, 1, 7, 1000])
@pytest.mark.parametrize("case", GROUP_CASES, ids=lambda c: "-".join(map(str, c)))
def test_groups(cref, num_tokens, case):
    num_experts, num_groups, topk_groups, group_score, score_func, with_bias, renormalize, scale, k = case
    seed = 7 * num_experts + 100 * num_groups + num_tokens + k
    routing = dict(renormalize=renormalize, score_func=score_func, scale=scale)
    routing.update(num_groups=num_groups, topk_groups=topk_groups, group_score=group_score)
    _check_random(cref, num_tokens, num_experts, k, seed, with_bias, **routing)


def test_group_mask_excludes_dropped_groups(cref):
    """With groups, every chosen id lies in one of the topk_groups best groups."""
    logits = _randn(500, 256, seed=3)
    bias = _bias(256, "sigmoid", 4)
    groups = dict(num_groups=8, topk_groups=4, group_score="top2_sum")
    _, ids = _cpp_softmax_topk(cref, logits, 8, bias, renormalize=True, score_func="sigmoid", scale=2.5, **groups)
    keys = (torch.sigmoid(logits) + bias).unflatten(-1, (8, 32))
    best = keys.topk(2, dim=-1).values.sum(-1).topk(4, dim=-1).indices.sort(-1).values
    chosen_groups = (ids.long() // 32).sort(-1).values
    assert all(set(c.tolist()) <= set(b.tolist()) for c, b in zip(chosen_groups, best))


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("with_groups", [False, True], ids=["nogroups", "groups"])
def test_ties_lower_id_first(cref, score_func, with_groups):
    """Equal keys pick the lower expert id first, in the oracle and in the reference."""
    num_experts, k = 16, 5
    groups = dict(num_groups=4, topk_groups=2, group_score="max") if with_groups else {}
    rows = [
        torch.zeros(num_experts, dtype=torch.float64),  # all equal
        torch.full((num_experts,), 0.3, dtype=torch.float64),
        torch.tensor([0.0, 1.0] * 8, dtype=torch.float64),  # equal maxima at odd ids
    ]
    logits = torch.stack(rows)
    c_weights, c_ids = _cpp_softmax_topk(cref, logits, k, renormalize=True, score_func=score_func, **groups)
    r_weights, r_ids = reference.softmax_topk(
        logits, k, routing=RoutingConfig(renormalize=True, score_func=score_func, **groups)
    )
    expected = torch.tensor([[0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [1, 3, 5, 7, 9]], dtype=torch.int32)
    if with_groups:
        # Groups of 4, all with equal scores: groups 0 and 1 stay, experts 0..7 are eligible.
        expected[2] = torch.tensor([1, 3, 5, 7, 0], dtype=torch.int32)
    assert torch.equal(c_ids, expected), c_ids
    assert torch.equal(r_ids, expected), r_ids
    torch.testing.assert_close(c_weights, r_weights, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(c_weights[:2], torch.full((2, k), 1.0 / k, dtype=torch.float64), atol=ATOL, rtol=RTOL)


def test_other_logit_dtypes_are_converted(cref):
    """float32 logits are read as float64 (the oracle always computes in double)."""
    logits = _randn(9, 60, seed=11).float()
    c_weights, c_ids = _cpp_softmax_topk(cref, logits, 4, renormalize=True)
    r_weights, r_ids = reference.softmax_topk(logits.double(), 4, routing=RoutingConfig.renormalize())
    assert torch.equal(c_ids, r_ids)
    torch.testing.assert_close(c_weights, r_weights, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: m.softmax_topk_ref(torch.zeros(4), 1, False, "softmax", None, 0, 0, "max", 1.0), "2-D"),
        (lambda m: m.softmax_topk_ref(torch.zeros(2, 4), 5, False, "softmax", None, 0, 0, "max", 1.0), "k must"),
        (lambda m: m.softmax_topk_ref(torch.zeros(2, 4), 1, False, "relu", None, 0, 0, "max", 1.0), "score_func"),
        (
            lambda m: m.softmax_topk_ref(torch.zeros(2, 4), 1, False, "softmax", torch.zeros(3), 0, 0, "max", 1.0),
            "bias",
        ),
        (lambda m: m.softmax_topk_ref(torch.zeros(2, 6), 1, False, "softmax", None, 4, 1, "max", 1.0), "num_groups"),
        (lambda m: m.softmax_topk_ref(torch.zeros(2, 4), 1, False, "softmax", None, 4, 1, "top2_sum", 1.0), "top2_sum"),
        (lambda m: m.softmax_topk_ref(torch.zeros(2, 8), 5, False, "softmax", None, 4, 2, "max", 1.0), "k must"),
        (
            lambda m: m.softmax_topk_backward_ref(
                torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 2, dtype=torch.int32), False, "softmax", 1.0
            ),
            "grad_weights",
        ),
        (
            lambda m: m.softmax_topk_backward_ref(
                torch.zeros(2, 1), torch.zeros(2, 4), torch.full((2, 1), 4, dtype=torch.int32), False, "softmax", 1.0
            ),
            "out of range",
        ),
    ],
)
def test_bad_arguments_raise(cref, call, message):
    with pytest.raises(RuntimeError, match=message):
        call(cref)


@pytest.mark.kernel
@routing_cases
def test_kernel_matches_cpp_oracle(cref, kernel_device, num_experts, k, options, with_bias):
    """The Triton kernels (forward and backward) against the C++ oracle on tie-free float32 input."""
    logits, bias = routing_inputs(53, num_experts, options, with_bias, torch.float32, kernel_device)
    x = logits.clone().requires_grad_(True)
    weights, ids = moe_kernels.softmax_topk(x, k, bias=bias, backend="triton", **options)
    grad_out = torch.randn(weights.shape, device=kernel_device)
    weights.backward(grad_out)
    cpu_bias = None if bias is None else bias.cpu().double()
    c_weights, c_ids = _cpp_softmax_topk(cref, logits.cpu(), k, cpu_bias, **options)
    c_grad = cref.softmax_topk_backward_ref(grad_out.cpu().double(), logits.cpu(), c_ids, *_backward_options(options))
    assert torch.equal(ids.cpu(), c_ids)
    assert_close(weights.detach().cpu(), c_weights, dtype=torch.float32)
    assert_close(x.grad.cpu(), c_grad, dtype=torch.float32)
