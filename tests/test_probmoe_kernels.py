"""ProbMoE family, Triton kernels (CUDA, or the interpreter on CPU): marginals, log normaliser,
samples and the backward against the float64 reference (itself checked against the oracles in
test_probmoe_reference.py), the sampler against the exact law, and a small property test of the
marginals against the float64 oracle (registration and compile of the kernel path:
test_probmoe_library.py)."""

from __future__ import annotations

import pytest
import strategies
import torch
from helpers import chi_square_pvalue
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import exact_k_marginals_oracle, subset_law_oracle
from strategies import INF, NAN

import moe_kernels as mk
from moe_kernels.ops.probmoe import EXACT_K
from moe_kernels.reference import probmoe as ref
from moe_kernels.testing import assert_close, assert_written, poisoned_outputs

pytestmark = pytest.mark.kernel

# (T, E, k, k_min): odd and prime sizes, E = 1, k = E, bands with k_min 0; E = 160 spans several
# checkpoint chunks with a partial last one, T = 70 spans several tiles per persistent program.
SHAPES = [
    (37, 8, 2, 2),
    (70, 60, 4, 4),
    (17, 13, 5, 2),
    (11, 13, 13, 0),
    (1, 1, 1, 1),
    (5, 160, 6, 6),
    (0, 6, 3, 3),
]


def _check(device, dtype, num_tokens, num_experts, k, k_min):
    logits = (torch.randn(num_tokens, num_experts) * 3).to(dtype).to(device)
    seed = torch.full((1,), 99, dtype=torch.int64, device=device)
    with poisoned_outputs():
        marginals, log_z, ids = EXACT_K.op(logits, k, k_min, seed, True, True)
        grad_m, grad_log_z = torch.randn_like(marginals), torch.randn_like(log_z)
        grad = EXACT_K.backward_op(logits, grad_m, grad_log_z, k, k_min, True)
    for name, tensor in (("marginals", marginals), ("log_z", log_z), ("ids", ids), ("grad", grad)):
        assert_written(tensor, name)
    want_m, want_log_z, _ = ref.exact_k_forward(logits.double().cpu(), k, k_min)
    want_grad = ref.exact_k_backward(logits.double().cpu(), grad_m.double().cpu(), grad_log_z.double().cpu(), k, k_min)
    assert_close(marginals.cpu(), want_m, dtype=torch.float32, op="exact_k")
    assert_close(log_z.cpu(), want_log_z, dtype=torch.float32, op="exact_k")
    assert grad.dtype == dtype
    assert_close(grad.cpu(), want_grad, dtype=torch.float32 if dtype == torch.float32 else dtype, op="exact_k")
    # A valid sample: sizes in the band, increasing distinct ids, then -1 padding.
    for row in ids.cpu().tolist():
        chosen = [i for i in row if i >= 0]
        assert k_min <= len(chosen) <= k and row[: len(chosen)] == sorted(set(chosen))
        assert all(i == -1 for i in row[len(chosen) :]) and all(i < num_experts for i in chosen)


@pytest.mark.parametrize("shape", SHAPES, ids=[f"T{t}-E{e}-k{k}-kmin{m}" for t, e, k, m in SHAPES])
def test_kernel_matches_reference(kernel_device, shape):
    _check(kernel_device, torch.float32, *shape)


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_kernel_low_precision_logits(kernel_device, dtype):
    _check(kernel_device, dtype, 33, 24, 4, 2)


def test_kernel_sampler_matches_law(kernel_device):
    # 40k draws through the interpreter (200k on a GPU), against the exact law of E = 6, k = 3.
    draws = 200_000 if kernel_device == "cuda" else 40_000
    logits = torch.tensor([0.3, -1.2, 1.5, 0.0, -0.4, 0.9], device=kernel_device)
    for k_min in (3, 1):
        ids = mk.exact_k_sample(logits.expand(draws, 6), 3, k_min=k_min, seed=2024, backend="triton")
        _, _, law = subset_law_oracle(logits.cpu(), 3, k_min)
        assert chi_square_pvalue(ids.cpu(), law) > 1e-3


def test_kernel_seed_reproducible(kernel_device):
    logits = torch.randn(40, 12, device=kernel_device)
    first = mk.exact_k_sample(logits, 4, seed=5, backend="triton")
    assert torch.equal(first, mk.exact_k_sample(logits, 4, seed=5, backend="triton"))
    assert not torch.equal(first, mk.exact_k_sample(logits, 4, seed=6, backend="triton"))


def test_kernel_non_finite_rows(kernel_device):
    logits = torch.randn(4, 8)
    logits[0, 3] = float("nan")
    logits[1, 5] = float("inf")
    logits[2, :6] = float("-inf")
    logits[3, 2] = float("-inf")
    logits = logits.to(kernel_device)
    weights, ids = mk.probmoe_route(logits, 3, seed=0, backend="triton")
    marginals = mk.exact_k_marginals(logits, 3, backend="triton")
    assert bool(torch.isnan(marginals[:3]).all()) and marginals[3, 2].item() == 0.0
    assert bool((ids[:3] == -1).all()) and bool((weights[:3] == 0).all())
    assert 2 not in ids[3].tolist() and bool((ids[3] >= 0).all())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter (numpy) on inf - inf and log(0)
@settings(max_examples=strategies.examples(20))  # the interpreter is slow: small cases
@given(data=st.data())
def test_kernel_property_marginals_match_oracle(kernel_device, data):
    num_tokens, num_experts = data.draw(st.sampled_from([0, 1, 7])), data.draw(st.sampled_from([1, 3, 13]))
    k = data.draw(st.integers(1, num_experts), label="k")
    k_min = data.draw(st.sampled_from([k, 0, data.draw(st.integers(0, k))]), label="k_min")
    source = strategies.drawn_generator(data.draw)
    logits = torch.randn(num_tokens, num_experts, generator=source) * 3
    logits = strategies.with_special_values(data.draw, logits, (-INF, -INF, NAN, INF))
    logits = strategies.with_drawn_layout(data.draw, logits, label="layout")
    marginals = mk.exact_k_marginals(logits.to(kernel_device), k, k_min=k_min, backend="triton").cpu()
    want = exact_k_marginals_oracle(logits, k, k_min)
    assert torch.equal(torch.isnan(marginals), torch.isnan(want))
    assert_close(marginals.nan_to_num(0.0), want.nan_to_num(0.0), dtype=torch.float32, op="exact_k")
