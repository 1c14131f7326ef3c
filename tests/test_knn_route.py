"""``knn_route`` (fused kNN-MoE route): the reference against gather + ``knn_mix`` + ``softmax_topk``
and the float64 oracles, the documented properties, gradients, registration and bad input; the
fused kernels against the reference and the unfused kernels."""

from __future__ import annotations

import importlib

import pytest
import torch
from oracles import softmax_topk_oracle
from routing_cases import ROUTING_CASES

from moe_kernels import testing
from moe_kernels.functional.knn import knn_mix
from moe_kernels.functional.knn_route import knn_route
from moe_kernels.functional.routing import softmax_topk
from moe_kernels.ops.knn_route import KnnRouteFunction
from moe_kernels.reference import knn as knn_ref
from moe_kernels.reference import routing as routing_ref

MIXINGS = [
    dict(weighting="similarity"),
    dict(weighting="softmax", temperature=0.1),
    dict(weighting="similarity", min_confidence=0.5),
]
MIXING_IDS = ["similarity", "softmax", "fallback-0.5"]

# (id, E, k, routing options, with bias): a subset of the routing tests' cases, one per style.
ROUTINGS = {case[0]: case[1:] for case in ROUTING_CASES}
routings = pytest.mark.parametrize(
    "num_experts,k,options,with_bias",
    [
        pytest.param(*ROUTINGS[name], id=name)
        for name in ("softmax", "softmax-renorm", "dsv2-groups-max", "sigmoid-bias-groups-max", "sigmoid-renorm-scale")
    ],
)

# Relative gap the float64 selection keys (and group scores) of rows that mix in memory rows keep
# pairwise: the float32 mix rounds a few times on logits up to 8 in magnitude, so the keys' error
# is some 1e-6 relative; rows with conf = 0 are the router's tie-free logits themselves.
MIXED_MIN_GAP = 2e-5


def _near_ties(mixed64, options, bias):
    keys = routing_ref.selection_keys(
        routing_ref.gate_scores(mixed64, options.get("score_func", "softmax")), None if bias is None else bias.double()
    )
    bad = testing._has_near_ties(keys, MIXED_MIN_GAP)
    num_groups = options.get("num_groups")
    if num_groups:
        grouped = keys.unflatten(-1, (num_groups, keys.shape[-1] // num_groups))
        top = (
            grouped.amax(-1) if options.get("group_score", "top2_sum") == "max" else grouped.topk(2, -1).values.sum(-1)
        )
        bad |= testing._has_near_ties(top, MIXED_MIN_GAP)
    return bad


def _inputs(
    num_tokens,
    num_experts,
    num_neighbors,
    options=None,
    with_bias=False,
    dtype=torch.float32,
    *,
    num_rows=None,
    mixing=None,
    seed=0,
    device="cpu",
):
    """Router logits, ids, sims, memory and bias whose mixed logits route without near-ties.

    Router and memory rows are tie-free routing logits (``make_routing_logits``); similarities are
    uniform in (-0.2, 1) (some means below 0 or 0.5: conf 0), ids draw with repetition from the
    memory (rows shared by tokens); tokens whose mixed logits have a near-tie are redrawn.
    """
    options = dict(options or {})
    mixing = dict(mixing or {})
    num_rows = num_rows or max(2 * num_neighbors, num_tokens // 2, 1)
    generator = torch.Generator().manual_seed(seed)
    bias = testing.make_bias(num_experts, seed=seed + 1) if with_bias else None
    group_options = {
        key: options[key] for key in ("score_func", "num_groups", "topk_groups", "group_score") if key in options
    }
    router = testing.make_routing_logits(num_tokens, num_experts, dtype, bias=bias, seed=seed, **group_options)
    memory = testing.make_routing_logits(num_rows, num_experts, dtype, bias=bias, seed=seed + 7, **group_options)
    ids = torch.randint(0, num_rows, (num_tokens, num_neighbors), generator=generator)
    sims = torch.rand(num_tokens, num_neighbors, generator=generator) * 1.2 - 0.2
    for _ in range(100):
        mixed, conf = knn_ref.knn_mix(router.double(), memory.double()[ids], sims.double(), **mixing)
        bad = _near_ties(mixed, options, bias) & (conf > 0)
        if not bad.any():
            break
        count = int(bad.sum())
        ids[bad] = torch.randint(0, num_rows, (count, num_neighbors), generator=generator)
        sims[bad] = torch.rand(count, num_neighbors, generator=generator) * 1.2 - 0.2
    else:
        raise RuntimeError("could not draw tie-free mixed logits")
    to = dict(device=device)
    return router.to(**to), ids.to(**to), sims.to(**to), memory.to(**to), None if bias is None else bias.to(**to)


def _unfused(router, ids, sims, memory, k, bias, options, mixing, backend="torch"):
    mixed, conf = knn_mix(router, memory[ids.long()], sims, backend=backend, **mixing)
    weights, chosen = softmax_topk(mixed, k, bias=bias, backend=backend, **options)
    return weights, chosen, conf


def _mixed_oracle(router, ids, sims, memory, weighting="similarity", temperature=0.1, min_confidence=0.0):
    """Per-token float64 loop written from the formula."""
    rows = []
    for z, row_ids, s in zip(router.double(), ids, sims.double()):
        conf = min(max(s.mean().item(), 0.0), 1.0)
        conf = 0.0 if conf < min_confidence else conf
        w = s / s.sum() if weighting == "similarity" else torch.softmax(s / temperature, 0)
        retrieved = sum(w[j] * memory[int(row_ids[j])].double() for j in range(len(s)))
        rows.append(conf * retrieved + (1 - conf) * z if conf > 0 else z)
    return torch.stack(rows)


# ------------------------------------------------------------------------------------------------
# Reference path
# ------------------------------------------------------------------------------------------------


@routings
@pytest.mark.parametrize("mixing", MIXINGS, ids=MIXING_IDS)
def test_reference_equals_gather_mix_route(num_experts, k, options, with_bias, mixing):
    router, ids, sims, memory, bias = _inputs(29, num_experts, 6, options, with_bias, mixing=mixing)
    router64, memory64 = router.double(), memory.double()
    weights, chosen, conf = knn_route(router64, ids, sims, memory64, k, bias=bias, backend="torch", **options, **mixing)
    want = _unfused(router64, ids, sims, memory64, k, bias, options, mixing)
    assert weights.dtype == conf.dtype == torch.float64 and chosen.dtype == torch.int32
    for got, expected in zip((weights, chosen, conf), want):
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
    # ... and the independent per-token float64 oracles.
    mixed = _mixed_oracle(router, ids, sims, memory, **mixing)
    want_weights, want_ids = softmax_topk_oracle(mixed, k, bias=bias, **options)
    torch.testing.assert_close(chosen, want_ids, atol=0, rtol=0)
    testing.assert_close(weights, want_weights, dtype=torch.float64)
    # float32 inputs: float32 outputs, the same ids.
    weights32, chosen32, conf32 = knn_route(
        router, ids, sims, memory, k, bias=bias, backend="torch", **options, **mixing
    )
    assert weights32.dtype == conf32.dtype == torch.float32
    torch.testing.assert_close(chosen32, want_ids, atol=0, rtol=0)
    testing.assert_close(weights32, want_weights, dtype=torch.float32)
    testing.assert_close(conf32, conf, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_confidence_is_bit_exact_frozen_routing(dtype):
    router, ids, sims, memory, _ = _inputs(16, 32, 4, dtype=dtype)
    sims[:6] = -sims[:6].abs()  # mean <= 0
    sims[6:9, 1] = float("nan")  # a NaN similarity
    sims[9:12] = 0.3  # below min_confidence
    memory[ids[:12].flatten()] = float("nan")  # whatever the memory holds
    options = dict(renormalize=True, scale=2.0)
    weights, chosen, conf = knn_route(router, ids, sims, memory, 5, min_confidence=0.4, backend="torch", **options)
    want_weights, want_ids = softmax_topk(router, 5, backend="torch", **options)
    assert (conf[:12] == 0).all()
    assert torch.equal(weights[:12], want_weights[:12]) and torch.equal(chosen[:12], want_ids[:12])


def test_invariant_to_neighbour_order():
    router, ids, sims, memory, _ = _inputs(13, 24, 6)
    order = torch.randperm(6)
    for mixing in MIXINGS:
        weights, chosen, conf = knn_route(router, ids, sims, memory, 3, backend="torch", **mixing)
        weights_p, chosen_p, conf_p = knn_route(
            router, ids[:, order], sims[:, order], memory, 3, backend="torch", **mixing
        )
        torch.testing.assert_close(chosen_p, chosen, atol=0, rtol=0)
        testing.assert_close(weights_p, weights)
        testing.assert_close(conf_p, conf)


def test_int32_ids_equal_int64_ids():
    router, ids, sims, memory, _ = _inputs(11, 16, 3)
    got = knn_route(router, ids.int(), sims, memory, 2, backend="torch")
    want = knn_route(router, ids, sims, memory, 2, backend="torch")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=0, rtol=0)


def _grad_inputs():
    router, ids, sims, memory, bias = _inputs(6, 8, 3, dict(score_func="sigmoid"), True, num_rows=5)
    ids[0] = ids[1]  # rows shared by tokens accumulate
    return router.double(), ids, sims.double(), memory.double(), bias


@pytest.mark.parametrize("mixing", MIXINGS, ids=MIXING_IDS)
@pytest.mark.parametrize(
    "options",
    [dict(renormalize=True, scale=1.5), dict(score_func="sigmoid", num_groups=2, topk_groups=1)],
    ids=["softmax-renorm", "sigmoid-groups"],
)
def test_gradcheck_float64(options, mixing):
    router, ids, sims, memory, bias = _grad_inputs()
    router.requires_grad_(True)
    memory.requires_grad_(True)

    def through_op(r, m):
        return knn_route(r, ids, sims, m, 3, bias=bias, backend="torch", **options, **mixing)[0]

    def through_autograd(r, m):
        return knn_ref.knn_route(r, ids, sims, m, 3, bias=bias, **options, **mixing)[0]

    assert torch.autograd.gradcheck(through_op, (router, memory))
    assert torch.autograd.gradcheck(through_autograd, (router, memory))


def test_explicit_backward_matches_autograd_and_memory_without_grad():
    router, ids, sims, memory, bias = _grad_inputs()
    options = dict(renormalize=True, score_func="sigmoid", scale=2.0)
    grad = torch.randn(6, 3, dtype=torch.float64)
    r_auto, m_auto = router.clone().requires_grad_(True), memory.clone().requires_grad_(True)
    knn_ref.knn_route(r_auto, ids, sims, m_auto, 3, bias=bias, **options)[0].backward(grad)
    r_op, m_op = router.clone().requires_grad_(True), memory.clone().requires_grad_(True)
    knn_route(r_op, ids, sims, m_op, 3, bias=bias, backend="torch", **options)[0].backward(grad)
    testing.assert_close(r_op.grad, r_auto.grad)
    testing.assert_close(m_op.grad, m_auto.grad)
    # A memory that does not require grad gets none, and the router's gradient is unchanged.
    r_only = router.clone().requires_grad_(True)
    weights, _, conf = knn_route(r_only, ids, sims, memory, 3, bias=bias, backend="torch", **options)
    assert not conf.requires_grad
    weights.backward(grad)
    assert memory.grad is None
    testing.assert_close(r_only.grad, r_auto.grad)


def _op_args(router, ids, sims, memory, k, bias, options, mixing, use_triton):
    return (
        router,
        ids,
        sims,
        memory,
        k,
        options.get("renormalize", False),
        options.get("score_func", "softmax"),
        bias,
        options.get("num_groups") or 0,
        options.get("topk_groups") or 0,
        options.get("group_score", "top2_sum"),
        float(options.get("scale", 1.0)),
        mixing.get("weighting", "similarity"),
        float(mixing.get("temperature", 0.1)),
        float(mixing.get("min_confidence", 0.0)),
        use_triton,
    )


OPCHECK_CASES = [
    (dict(renormalize=True), MIXINGS[0], False),
    (dict(score_func="sigmoid", num_groups=4, topk_groups=2), MIXINGS[1], True),
    (dict(scale=2.0), MIXINGS[2], False),
]


@pytest.mark.parametrize("num_tokens", [0, 1, 13])
def test_opcheck_reference_path(num_tokens):
    for options, mixing, with_bias in OPCHECK_CASES:
        router, ids, sims, memory, bias = _inputs(num_tokens, 12, 3, options, with_bias, num_rows=7)
        for router_grad, memory_grad in ((False, False), (True, True), (True, False), (False, True)):
            args = _op_args(
                router.clone().requires_grad_(router_grad),
                ids,
                sims,
                memory.clone().requires_grad_(memory_grad),
                3,
                bias,
                options,
                mixing,
                False,
            )
            torch.library.opcheck(torch.ops.moe_kernels.knn_route.default, args)


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    router, ids, sims, memory, bias = _inputs(10, 16, 4, dict(score_func="sigmoid"), True)
    options = dict(score_func="sigmoid", bias=bias, num_groups=4, topk_groups=2, renormalize=True, weighting="softmax")

    def loss(r, m):
        weights, chosen, conf = knn_route(r, ids, sims, m, 3, backend="torch", **options)
        return (weights**2).sum() + conf.sum() + chosen.sum()

    eager = [t.clone().requires_grad_(True) for t in (router, memory)]
    compiled = [t.clone().requires_grad_(True) for t in (router, memory)]
    want = loss(*eager)
    want.backward()
    got = torch.compile(loss, fullgraph=True)(*compiled)
    got.backward()
    testing.assert_close(got, want)
    for c, e in zip(compiled, eager):
        testing.assert_close(c.grad, e.grad)


def test_compile_checks_ids_without_a_graph_break():
    torch._dynamo.reset()
    router, ids, sims, memory, _ = _inputs(5, 8, 2, num_rows=4)
    route = torch.compile(lambda i: knn_route(router, i, sims, memory, 2, backend="torch")[1], fullgraph=True)
    torch.testing.assert_close(route(ids), knn_route(router, ids, sims, memory, 2, backend="torch")[1])
    with pytest.raises(RuntimeError, match=r"neighbor_ids must lie in \[0, N\) = \[0, 4\)"):
        route(ids + 4)


def test_nan_and_inf_similarities_are_documented():
    router, ids, sims, memory, _ = _inputs(4, 10, 3)
    sims[0, 2] = float("nan")  # conf 0: the router's routing
    sims[1, 0] = float("inf")  # conf 1, NaN weights w: NaN mixed logits
    weights, chosen, conf = knn_route(router, ids, sims, memory, 4, backend="torch")
    want_weights, want_ids = softmax_topk(router, 4, backend="torch")
    assert conf[0] == 0 and conf[1] == 1
    assert torch.equal(weights[0], want_weights[0]) and torch.equal(chosen[0], want_ids[0])
    assert weights[1].isnan().all()
    assert sorted(chosen[1].tolist()) == sorted(set(chosen[1].tolist())) and ((chosen >= 0) & (chosen < 10)).all()


def _good_args():
    router, ids, sims, memory, _ = _inputs(4, 8, 3, num_rows=6)
    return dict(router=router, ids=ids, sims=sims, memory=memory)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(router=torch.ones(4, 8, dtype=torch.int32)), TypeError, r"knn_route: router_logits must be float32"),
        (dict(router=torch.ones(4, 8, 1)), ValueError, r"knn_route: router_logits must have shape \(T, E\)"),
        (
            dict(memory=torch.ones(6, 9)),
            ValueError,
            r"memory_logits must have shape \(N, E\) = \(N, 8\) as router_logits",
        ),
        (
            dict(memory=torch.ones(0, 8)),
            ValueError,
            r"memory_logits must have shape \(N, E\) with N >= 1, got \(0, 8\)",
        ),
        (dict(memory=torch.ones(6, 8, dtype=torch.int64)), TypeError, r"memory_logits must be float32"),
        (dict(memory=[[1.0]]), TypeError, r"memory_logits must be a torch.Tensor, got list"),
        (dict(memory=torch.ones(6, 8, device="meta")), ValueError, r"memory_logits must be on router_logits' device"),
        (dict(sims=torch.ones(5, 3)), ValueError, r"knn_route: neighbor_sims must have shape \(T, n\) = \(4, n\)"),
        (dict(sims=torch.ones(4, 0)), ValueError, r"with n >= 1"),
        (
            dict(ids=torch.zeros(4, 2, dtype=torch.int64)),
            ValueError,
            r"neighbor_ids must have shape \(T, n\) = \(4, 3\) as neighbor_sims, got \(4, 2\)",
        ),
        (dict(ids=torch.zeros(4, 3)), TypeError, r"neighbor_ids must be int32 or int64, got torch.float32"),
        (
            dict(ids=torch.full((4, 3), 6)),
            ValueError,
            r"neighbor_ids must lie in \[0, N\) = \[0, 6\) .*got values in \[6, 6\]",
        ),
        (dict(ids=torch.full((4, 3), -1)), ValueError, r"neighbor_ids must lie in \[0, N\) = \[0, 6\)"),
        (dict(k=9), ValueError, r"knn_route: k must be an int in \[1, 8\]"),
        (dict(score_func="relu"), ValueError, r"knn_route: score_func must be one of"),
        (dict(bias=torch.zeros(7)), ValueError, r"knn_route: bias must have shape \(E,\) = \(8,\)"),
        (dict(num_groups=3, topk_groups=1), ValueError, r"knn_route: num_groups must be a positive int dividing E=8"),
        (dict(weighting="mean"), ValueError, r"knn_route: weighting must be one of \('similarity', 'softmax'\)"),
        (dict(temperature=0.0), ValueError, r"knn_route: temperature must be a finite number > 0, got 0.0"),
        (dict(min_confidence=1.5), ValueError, r"knn_route: min_confidence must be a number in \[0, 1\]"),
        (dict(backend="cuda"), ValueError, r"knn_route: backend must be one of"),
    ],
)
def test_bad_arguments(change, error, match):
    args = _good_args()
    tensors = {key: change.pop(key) for key in ("router", "ids", "sims", "memory") if key in change}
    args.update(tensors)
    k = change.pop("k", 2)
    with pytest.raises(error, match=match):
        knn_route(args["router"], args["ids"], args["sims"], args["memory"], k, **change)


def test_float64_router_needs_the_torch_backend(monkeypatch):
    # The module, not the function of the same name that moe_kernels.functional exports.
    module = importlib.import_module("moe_kernels.functional.knn_route")
    monkeypatch.setattr(module, "use_triton", lambda backend, device, name: True)
    args = _good_args()
    with pytest.raises(TypeError, match=r"knn_route: backend='triton' takes float32/float16/bfloat16 logits"):
        knn_route(args["router"].double(), args["ids"], args["sims"], args["memory"], 2, backend="triton")


# ------------------------------------------------------------------------------------------------
# Kernel path (CUDA, or the Triton interpreter on CPU)
# ------------------------------------------------------------------------------------------------


def _kernel_vs_reference(
    device, num_tokens, num_experts, k, options, with_bias, mixing, dtype=torch.float32, num_neighbors=5, seed=0
):
    router, ids, sims, memory, bias = _inputs(
        num_tokens, num_experts, num_neighbors, options, with_bias, dtype, mixing=mixing, seed=seed, device=device
    )
    r_k, m_k = router.clone().requires_grad_(True), memory.clone().requires_grad_(True)
    with testing.poisoned_outputs():
        weights, chosen, conf = knn_route(r_k, ids, sims, m_k, k, bias=bias, backend="triton", **options, **mixing)
        grad = torch.randn(weights.shape, device=device)
        weights.backward(grad)
    for name, t in (
        ("weights", weights),
        ("ids", chosen),
        ("conf", conf),
        ("grad_router", r_k.grad),
        ("grad_memory", m_k.grad),
    ):
        testing.assert_written(t, name)
    assert weights.dtype == conf.dtype == torch.float32 and chosen.dtype == torch.int32
    assert weights.shape == chosen.shape == (num_tokens, k) and conf.shape == (num_tokens,)
    r64, m64 = router.double().requires_grad_(True), memory.double().requires_grad_(True)
    want_weights, want_ids, want_conf = knn_ref.knn_route(
        r64, ids, sims.double(), m64, k, bias=None if bias is None else bias.double(), **options, **mixing
    )
    want_weights.backward(grad.double())
    torch.testing.assert_close(chosen, want_ids, atol=0, rtol=0)
    testing.assert_close(weights, want_weights, dtype=torch.float32)
    testing.assert_close(conf, want_conf, dtype=torch.float32)
    assert r_k.grad.dtype == m_k.grad.dtype == dtype
    testing.assert_close(r_k.grad, r64.grad, msg="grad_router, kernel vs float64 reference")
    testing.assert_close(m_k.grad, m64.grad, msg="grad_memory, kernel vs float64 reference")


@pytest.mark.kernel
@routings
@pytest.mark.parametrize("mixing", MIXINGS, ids=MIXING_IDS)
def test_kernel_matches_reference(kernel_device, num_experts, k, options, with_bias, mixing):
    _kernel_vs_reference(kernel_device, 37, num_experts, k, options, with_bias, mixing)


@pytest.mark.kernel
@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_kernel_16bit_logits(kernel_device, dtype):
    options = dict(score_func="sigmoid", num_groups=8, topk_groups=4, renormalize=True, scale=2.5)
    _kernel_vs_reference(kernel_device, 37, 64, 6, options, True, MIXINGS[1], dtype=dtype)


@pytest.mark.kernel
@pytest.mark.parametrize("num_experts", [8, 60, 160])
@pytest.mark.parametrize("num_tokens", [0, 1, 37])
def test_kernel_sizes(kernel_device, num_tokens, num_experts):
    options = dict(renormalize=True, num_groups=4, topk_groups=2, group_score="max", scale=3.0)
    _kernel_vs_reference(kernel_device, num_tokens, num_experts, 3, options, False, MIXINGS[0], num_neighbors=3)


@pytest.mark.kernel
def test_kernel_many_neighbours_and_int32_ids(kernel_device):
    router, ids, sims, memory, _ = _inputs(21, 40, 32, num_rows=9, device=kernel_device)
    got = knn_route(router, ids.int(), sims, memory, 4, backend="triton", weighting="softmax")
    want = knn_route(router.cpu(), ids.cpu(), sims.cpu(), memory.cpu(), 4, backend="torch", weighting="softmax")
    torch.testing.assert_close(got[1].cpu(), want[1], atol=0, rtol=0)
    testing.assert_close(got[0].cpu(), want[0])
    testing.assert_close(got[2].cpu(), want[2])


@pytest.mark.kernel
def test_kernel_equals_unfused_kernels(kernel_device):
    name = "dsv2-groups-max"
    num_experts, k, options, with_bias = ROUTINGS[name]
    router, ids, sims, memory, bias = _inputs(37, num_experts, 6, options, with_bias, device=kernel_device)
    weights, chosen, conf = knn_route(router, ids, sims, memory, k, bias=bias, backend="triton", **options)
    want_weights, want_ids, want_conf = _unfused(router, ids, sims, memory, k, bias, options, {}, backend="triton")
    torch.testing.assert_close(chosen, want_ids, atol=0, rtol=0)
    testing.assert_close(weights, want_weights)
    testing.assert_close(conf, want_conf)


@pytest.mark.kernel
def test_kernel_zero_confidence_is_bit_exact_frozen_routing(kernel_device):
    router, ids, sims, memory, bias = _inputs(16, 60, 4, dict(score_func="sigmoid"), True, device=kernel_device)
    sims[:6] = -sims[:6].abs()
    sims[6:9, 1] = float("nan")
    sims[9:12] = 0.3
    memory[ids[:12].flatten()] = float("nan")
    options = dict(score_func="sigmoid", bias=bias, num_groups=6, topk_groups=2, renormalize=True, scale=2.5)
    weights, chosen, conf = knn_route(router, ids, sims, memory, 5, min_confidence=0.4, backend="triton", **options)
    want_weights, want_ids = softmax_topk(router, 5, backend="triton", **options)
    assert (conf[:12] == 0).all()
    assert torch.equal(weights[:12], want_weights[:12]) and torch.equal(chosen[:12], want_ids[:12])


@pytest.mark.kernel
def test_kernel_opcheck_and_eager_function(kernel_device):
    options, mixing, with_bias = OPCHECK_CASES[1]
    router, ids, sims, memory, bias = _inputs(13, 16, 3, options, with_bias, device=kernel_device)
    args = _op_args(
        router.clone().requires_grad_(True),
        ids,
        sims,
        memory.clone().requires_grad_(True),
        3,
        bias,
        options,
        mixing,
        True,
    )
    torch.library.opcheck(torch.ops.moe_kernels.knn_route.default, args)
    via_function = KnnRouteFunction.apply(*args)
    via_op = torch.ops.moe_kernels.knn_route(*args)
    torch.testing.assert_close(via_function, via_op, atol=0, rtol=0)


@pytest.mark.kernel
@pytest.mark.parametrize("bad_id", [-1, 4, 2**40])
def test_kernel_checks_neighbor_ids_itself(kernel_device, bad_id):
    """The Triton forward checks the ids in its kernel: an id outside the memory (even one far
    past it, or below 0 on a token that falls back) gathers nothing and fails the launcher's
    device assert; valid ids set nothing off."""
    from moe_kernels.ops.knn_route import launch_knn_route

    router, ids, sims, memory, _ = _inputs(5, 8, 2, num_rows=4)
    args = [t.to(kernel_device) for t in (router, ids, sims, memory)]
    routing = (False, "softmax", None, 0, 0, "max", 1.0, "similarity", 0.1, 0.0)
    launch_knn_route(*args, 2, *routing)
    bad = args[1].clone()
    bad[3, 1] = bad_id
    with pytest.raises(RuntimeError, match=r"neighbor_ids must lie in \[0, N\) = \[0, 4\)"):
        launch_knn_route(args[0], bad, *args[2:], 2, *routing)
        if kernel_device == "cuda":
            torch.cuda.synchronize()
