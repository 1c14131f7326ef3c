"""ProbMoE family, library: gradcheck in float64, ``torch.library`` opcheck of ``exact_k`` and
its backward op, torch.compile equals eager, the eager ``autograd.Function`` equals the
registered op; reference path, and the kernel path (``kernel``)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_compile_matches_eager, assert_function_matches_op

import moe_kernels as mk
from moe_kernels.ops.probmoe import EXACT_K


@pytest.mark.parametrize("k,k_min", [(2, None), (4, 1)])
def test_gradcheck_float64(k, k_min):
    logits = (torch.randn(4, 7, dtype=torch.float64) * 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: mk.exact_k_marginals(x, k, k_min=k_min), (logits,))


@pytest.mark.parametrize("num_tokens", [0, 1, 13])
@pytest.mark.parametrize("sample", [False, True])
def test_opcheck(num_tokens, sample):
    logits = torch.randn(num_tokens, 9, requires_grad=True)
    seed = torch.full((1,), 4, dtype=torch.int64)
    torch.library.opcheck(EXACT_K.op, (logits, 3, 1, seed, sample, False))
    grad_m, grad_log_z = torch.randn(num_tokens, 9), torch.randn(num_tokens)
    torch.library.opcheck(EXACT_K.backward_op, (logits.detach(), grad_m, grad_log_z, 3, 1, False))


@pytest.mark.parametrize("k,k_min", [(3, 3), (4, 0)])
def test_eager_function_matches_registered_op(k, k_min):
    logits = torch.randn(11, 9, requires_grad=True)
    seed = torch.full((1,), 4, dtype=torch.int64)
    assert_function_matches_op(EXACT_K, (logits, k, k_min, seed, True, False))


def test_compile_fullgraph_matches_eager():
    logits = torch.randn(17, 12, requires_grad=True)

    def route(x):
        weights, ids = mk.probmoe_route(x, 3, seed=9)
        return weights, ids, mk.exact_k_marginals(x, 4, k_min=2)

    assert_compile_matches_eager(route, (logits,))


@pytest.mark.kernel
def test_kernel_opcheck_and_compile(kernel_device):
    logits = torch.randn(13, 9, device=kernel_device, requires_grad=True)
    seed = torch.full((1,), 4, dtype=torch.int64, device=kernel_device)
    torch.library.opcheck(EXACT_K.op, (logits, 3, 1, seed, True, True))
    assert_function_matches_op(EXACT_K, (logits, 3, 1, seed, True, True))

    def route(x):
        return mk.probmoe_route(x, 3, k_min=2, seed=1, backend="triton")

    assert_compile_matches_eager(route, (logits,))
