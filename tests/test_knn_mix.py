"""``knn_mix`` (kNN-MoE logit mixing): reference against a float64 per-token oracle, the kernels
against the reference, the documented properties, registration and bad input."""

from __future__ import annotations

import pytest
import torch

import moe_kernels
from moe_kernels import reference, testing
from moe_kernels.ops.knn import KnnMixFunction

OPTIONS = [
    dict(weighting="similarity"),
    dict(weighting="softmax", temperature=0.1),
    dict(weighting="similarity", min_confidence=0.5),
]
OPTION_IDS = ["similarity", "softmax", "fallback-0.5"]


def _inputs(num_tokens, num_experts, num_neighbors, dtype=torch.float32, device="cpu", seed=0):
    """Random logits and similarities in (-0.2, 1): some rows' mean falls below 0.5, a few below 0."""
    generator = torch.Generator().manual_seed(seed)
    router = torch.randn(num_tokens, num_experts, generator=generator).to(dtype)
    neighbors = torch.randn(num_tokens, num_neighbors, num_experts, generator=generator).to(dtype)
    sims = torch.rand(num_tokens, num_neighbors, generator=generator) * 1.2 - 0.2
    return router.to(device), neighbors.to(device), sims.to(device)


def _oracle(router, neighbors, sims, weighting="similarity", temperature=0.1, min_confidence=0.0):
    """Per-token float64 loop written from the formula."""
    mixed, confs = [], []
    for z, values, s in zip(router.double(), neighbors.double(), sims.double()):
        conf = min(max(s.mean().item(), 0.0), 1.0)
        conf = 0.0 if conf < min_confidence else conf
        w = s / s.sum() if weighting == "similarity" else torch.softmax(s / temperature, 0)
        retrieved = sum(w[j] * values[j] for j in range(len(s)))
        mixed.append(conf * retrieved + (1 - conf) * z if conf > 0 else z)
        confs.append(conf)
    return torch.stack(mixed), torch.tensor(confs, dtype=torch.float64)


@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_oracle(options, dtype):
    router, neighbors, sims = _inputs(41, 60, 8, dtype)
    mixed, conf = moe_kernels.knn_mix(router, neighbors, sims, backend="torch", **options)
    want_mixed, want_conf = _oracle(router, neighbors, sims, **options)
    assert mixed.dtype == conf.dtype == torch.float32
    testing.assert_close(conf, want_conf)
    testing.assert_close(mixed, want_mixed)


def test_zero_confidence_is_bit_exact_router():
    router, neighbors, sims = _inputs(16, 32, 4)
    sims[:8] = -sims[:8].abs()  # mean <= 0: conf 0
    sims[8:12, 0] = float("nan")  # NaN: conf 0
    neighbors[:12] = float("nan")  # whatever the neighbours hold
    for backend in ("torch",):
        mixed, conf = moe_kernels.knn_mix(router, neighbors, sims, backend=backend)
        assert (conf[:12] == 0).all()
        assert torch.equal(mixed[:12], router[:12])


def test_single_neighbour_with_similarity_one_gives_its_logits():
    router, neighbors, _ = _inputs(9, 20, 1)
    sims = torch.ones(9, 1)
    for weighting in ("similarity", "softmax"):
        mixed, conf = moe_kernels.knn_mix(router, neighbors, sims, weighting=weighting, backend="torch")
        assert (conf == 1).all()
        assert torch.equal(mixed, neighbors[:, 0])


def test_invariant_to_neighbour_order():
    router, neighbors, sims = _inputs(13, 24, 6)
    order = torch.randperm(6)
    for options in OPTIONS:
        mixed, conf = moe_kernels.knn_mix(router, neighbors, sims, backend="torch", **options)
        mixed_p, conf_p = moe_kernels.knn_mix(router, neighbors[:, order], sims[:, order], backend="torch", **options)
        testing.assert_close(mixed_p, mixed)
        testing.assert_close(conf_p, conf)


@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_gradcheck_float64(options):
    router, neighbors, sims = _inputs(5, 7, 3, torch.float64)
    router.requires_grad_(True)
    neighbors.requires_grad_(True)

    def through_op(r, n):
        return moe_kernels.knn_mix(r, n, sims, backend="torch", **options)[0]

    def through_autograd(r, n):
        return reference.knn_mix(r, n, sims, **options)[0]

    assert torch.autograd.gradcheck(through_op, (router, neighbors))
    assert torch.autograd.gradcheck(through_autograd, (router, neighbors))


def _op_args(router, neighbors, sims, options, use_triton):
    return (
        router,
        neighbors,
        sims,
        options.get("weighting", "similarity"),
        float(options.get("temperature", 0.1)),
        float(options.get("min_confidence", 0.0)),
        use_triton,
    )


@pytest.mark.parametrize("num_tokens", [0, 1, 11])
def test_opcheck_reference_path(num_tokens):
    for options in OPTIONS:
        router, neighbors, sims = _inputs(num_tokens, 12, 3)
        for requires_grad in (False, True):
            args = _op_args(
                router.clone().requires_grad_(requires_grad),
                neighbors.clone().requires_grad_(requires_grad),
                sims,
                options,
                False,
            )
            torch.library.opcheck(torch.ops.moe_kernels.knn_mix.default, args)


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    router, neighbors, sims = _inputs(10, 16, 4)

    def loss(r, n):
        mixed, conf = moe_kernels.knn_mix(r, n, sims, weighting="softmax", backend="torch")
        return (mixed**2).sum() + conf.sum()

    eager = [t.clone().requires_grad_(True) for t in (router, neighbors)]
    compiled = [t.clone().requires_grad_(True) for t in (router, neighbors)]
    want = loss(*eager)
    want.backward()
    got = torch.compile(loss, fullgraph=True)(*compiled)
    got.backward()
    testing.assert_close(got, want)
    for c, e in zip(compiled, eager):
        testing.assert_close(c.grad, e.grad)


def _kernel_vs_reference(device, dtype, options, num_tokens=67, num_experts=72, num_neighbors=5):
    router, neighbors, sims = _inputs(num_tokens, num_experts, num_neighbors, dtype, device)
    r_k, n_k = router.clone().requires_grad_(True), neighbors.clone().requires_grad_(True)
    with testing.poisoned_outputs():
        mixed, conf = moe_kernels.knn_mix(r_k, n_k, sims, backend="triton", **options)
        grad = torch.randn_like(mixed)
        mixed.backward(grad)
    for name, t in (("mixed", mixed), ("conf", conf), ("grad_router", r_k.grad), ("grad_neighbors", n_k.grad)):
        testing.assert_written(t, name)
    r64, n64 = router.double().requires_grad_(True), neighbors.double().requires_grad_(True)
    want_mixed, want_conf = reference.knn_mix(r64, n64, sims.double(), **options)
    want_mixed.backward(grad.double())
    testing.assert_close(conf, want_conf)
    testing.assert_close(mixed, want_mixed)
    assert r_k.grad.dtype == n_k.grad.dtype == dtype
    testing.assert_close(r_k.grad, r64.grad)
    testing.assert_close(n_k.grad, n64.grad)


@pytest.mark.kernel
@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_kernel_matches_reference(kernel_device, options, dtype):
    _kernel_vs_reference(kernel_device, dtype, options)


@pytest.mark.kernel
@pytest.mark.parametrize("shape", [(0, 8, 2), (1, 1, 1), (7, 257, 3), (130, 8, 32)])
def test_kernel_odd_sizes(kernel_device, shape):
    _kernel_vs_reference(kernel_device, torch.float32, OPTIONS[1], *shape)


@pytest.mark.kernel
def test_kernel_zero_confidence_is_bit_exact_router(kernel_device):
    router, neighbors, sims = _inputs(16, 32, 4, device=kernel_device)
    sims[:8] = -sims[:8].abs()
    sims[8:12, 0] = float("nan")
    neighbors[:12] = float("nan")
    mixed, conf = moe_kernels.knn_mix(router, neighbors, sims, backend="triton")
    assert (conf[:12] == 0).all()
    assert torch.equal(mixed[:12], router[:12])


@pytest.mark.kernel
def test_kernel_opcheck_and_eager_function(kernel_device):
    router, neighbors, sims = _inputs(13, 16, 3, device=kernel_device)
    args = _op_args(router.clone().requires_grad_(True), neighbors.clone().requires_grad_(True), sims, OPTIONS[0], True)
    torch.library.opcheck(torch.ops.moe_kernels.knn_mix.default, args)
    via_function = KnnMixFunction.apply(*args)
    via_op = torch.ops.moe_kernels.knn_mix(*args)
    torch.testing.assert_close(via_function, via_op, atol=0, rtol=0)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(router=torch.ones(4, 8, dtype=torch.int32)), TypeError, r"router_logits must be float32"),
        (dict(router=torch.ones(4, 8, 1)), ValueError, r"router_logits must have shape \(T, E\)"),
        (
            dict(neighbors=torch.ones(4, 3, 9)),
            ValueError,
            r"neighbor_logits must have shape \(T, n, E\) = \(4, 3, 8\), got \(4, 3, 9\)",
        ),
        (dict(sims=torch.ones(5, 3)), ValueError, r"neighbor_sims must have shape \(T, n\) = \(4, n\)"),
        (dict(sims=torch.ones(4, 0)), ValueError, r"with n >= 1"),
        (dict(sims=[[1.0]]), TypeError, r"neighbor_sims must be a torch.Tensor, got list"),
        (dict(weighting="mean"), ValueError, r"weighting must be one of \('similarity', 'softmax'\), got 'mean'"),
        (dict(temperature=0.0), ValueError, r"temperature must be a finite number > 0, got 0.0"),
        (dict(min_confidence=1.5), ValueError, r"min_confidence must be a number in \[0, 1\], got 1.5"),
    ],
)
def test_bad_arguments(change, error, match):
    args = dict(router=torch.randn(4, 8), neighbors=torch.randn(4, 3, 8), sims=torch.rand(4, 3))
    options = {key: change.pop(key) for key in ("weighting", "temperature", "min_confidence") if key in change}
    args.update(change)
    with pytest.raises(error, match=match):
        moe_kernels.knn_mix(args["router"], args["neighbors"], args["sims"], **options)
