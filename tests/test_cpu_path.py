"""The fast CPU path (``moe_kernels.cpu``) against the float64 oracles, as the kernels are tested:
the tolerance table, poisoned outputs, odd shapes (E = 60, 160, 257; T = 0, 1, primes), ties and
non-finite rows, and the guards of ``torch._grouped_mm``'s CPU caveats.

The functions are called directly (so each test names the path it checks) and through the public
ops (which run them for CPU tensors)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from oracles import grouped_mm_oracle, knn_mix_oracle, softmax_topk_oracle
from routing_cases import ROUTING_CASES, non_finite_logits, routing_inputs

import moe_kernels
from moe_kernels import testing
from moe_kernels.config import KnnMixing, RoutingConfig
from moe_kernels.cpu import experts as cpu_experts
from moe_kernels.cpu import experts_small, select, select_jit
from moe_kernels.cpu import knn as cpu_knn
from moe_kernels.cpu import probmoe as cpu_probmoe
from moe_kernels.cpu import routing as cpu_routing
from moe_kernels.reference import experts as ref_experts
from moe_kernels.reference import knn as ref_knn
from moe_kernels.reference import probmoe as ref_probmoe
from moe_kernels.reference import routing as ref_routing

ODD_TOKENS = (0, 1, 13, 97)


def _d(t):
    return None if t is None else t.double()


@pytest.fixture(params=["jit", "jit-parallel", "host", "tensor"])
def tie_check(request, monkeypatch):
    """The selection's paths: the compiled pass (numba) on one core and split among two threads
    at every size, and without it both tie checks of the PyTorch path, on the host (few keys) and
    vectorised; with them, both top-k softmaxes (torch.softmax for few values, written out for
    many)."""
    if request.param.startswith("jit"):
        if not select_jit.AVAILABLE:
            pytest.skip("numba is not installed (pip install 'moe-kernels[cpu]')")
        parallel = request.param == "jit-parallel"
        monkeypatch.setattr(select_jit, "PARALLEL_MIN_ROWS", 0 if parallel else 10**9)
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        yield request.param
        torch.set_num_threads(threads)
        return
    monkeypatch.setattr(select_jit, "AVAILABLE", False)
    small = request.param == "host"
    monkeypatch.setattr(select, "HOST_CHECK_ROWS", 10**9 if small else 0)
    monkeypatch.setattr(cpu_routing, "MANUAL_SOFTMAX_MIN_VALUES", 10**9 if small else 0)
    yield request.param


# ------------------------------------------------------------------------------------------------
# softmax_topk


@pytest.mark.parametrize("case", ROUTING_CASES, ids=[c[0] for c in ROUTING_CASES])
@pytest.mark.parametrize("num_tokens", ODD_TOKENS)
def test_routing_matches_oracle(case, num_tokens, tie_check):
    _, num_experts, k, options, with_bias = case
    logits, bias = routing_inputs(num_tokens, num_experts, options, with_bias)
    weights, ids = cpu_routing.softmax_topk(logits, k, RoutingConfig(**options), bias)
    want_weights, want_ids = softmax_topk_oracle(logits, k, bias=bias, **options)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert weights.is_contiguous() and ids.is_contiguous()
    torch.testing.assert_close(ids, want_ids, atol=0, rtol=0)
    testing.assert_close(weights, want_weights, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "options", [{}, dict(renormalize=True), dict(score_func="sigmoid", num_groups=8, topk_groups=3)]
)
@pytest.mark.parametrize("num_tokens", [select.DECODE_ROWS, 300])
def test_routing_ties_rank_like_the_reference(dtype, options, num_tokens, tie_check):
    # Random 16-bit logits (and small integers) tie often: 16-bit logits are ranked by exact_ids
    # at once; float32 ones by topk, checked, the tied rows (up to DECODE_ROWS rows every row)
    # by exact_ids.
    for logits in (torch.randn(num_tokens, 64).to(dtype), torch.randint(-3, 3, (num_tokens, 64)).to(dtype)):
        weights, ids = cpu_routing.softmax_topk(logits, 8, RoutingConfig(**options), None)
        want_weights, want_ids = ref_routing.softmax_topk(logits, 8, routing=RoutingConfig(**options))
        torch.testing.assert_close(ids, want_ids, atol=0, rtol=0)
        testing.assert_close(weights, want_weights)


SPECIAL_KEYS = (0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, -1e-45, 2e-45, 1.1754944e-38,
                3.4028235e38, -3.4028235e38, 1.0, 1.0000001, 0.99999994, -1.0)  # fmt: skip


@pytest.mark.parametrize("num_experts", [1, 7, 64, 257, 5000])
@pytest.mark.parametrize("path", ["exact_ids", "jit"])
def test_exact_selections_are_the_reference_order(num_experts, path):
    # Ties of every kind (+-0, subnormals, +-inf, NaN, neighbouring floats, the largest floats,
    # small integers, bf16 values, tiny normals), against the reference's int64 packing: the
    # PyTorch path's exact_ids, and the compiled pass (ids, values with their NaN, the flags).
    if path == "jit" and not select_jit.AVAILABLE:
        pytest.skip("numba is not installed (pip install 'moe-kernels[cpu]')")
    generator = torch.Generator().manual_seed(num_experts)
    special = torch.tensor(SPECIAL_KEYS)
    for trial in range(40):
        k = int(torch.randint(1, num_experts + 1, (), generator=generator))
        keys = (
            special[torch.randint(0, len(special), (3, num_experts), generator=generator)],
            torch.randint(-3, 3, (3, num_experts), generator=generator).float(),
            torch.randn(3, num_experts, generator=generator).bfloat16().float(),
            torch.randn(3, num_experts, generator=generator) * 1e-39,
        )[trial % 4]
        want = ref_routing.top_k_lowest_id_first(torch.where(keys.isnan(), float("-inf"), keys), k)
        if path == "exact_ids":
            torch.testing.assert_close(select.exact_ids(keys, k), want, atol=0, rtol=0)
            continue
        values, ids, flagged = select_jit.route(keys, keys, None, k, RoutingConfig(), select_jit.WEIGHTS_SELECTED)
        rows = (keys.isnan() | keys.isposinf()).any(-1)  # NaN or +inf in the row: flagged, ids -1
        assert torch.equal(flagged, rows) if rows.any() else flagged is None
        assert (ids[rows, 0] == -1).all()
        fine = ~rows
        torch.testing.assert_close(ids[fine], want[fine].int(), atol=0, rtol=0)
        torch.testing.assert_close(values[fine], keys.gather(1, want)[fine], atol=0, rtol=0)


def test_no_jit_environment_switch_leaves_the_pytorch_path():
    code = "from moe_kernels.cpu import select_jit; print(select_jit.AVAILABLE)"
    env = {**os.environ, "MOE_KERNELS_NO_JIT": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.stdout.strip() == "False", result.stderr


def test_compiled_selection_splits_rows_among_threads_past_a_decode_step(monkeypatch):
    # Past PARALLEL_MIN_ROWS rows with several threads the rows are split among numba's threads;
    # a decode step, one thread, or a parallel call already running take the one-core pass.
    if not select_jit.AVAILABLE:
        pytest.skip("numba is not installed (pip install 'moe-kernels[cpu]')")
    calls = []
    real = select_jit._route_rows_parallel
    monkeypatch.setattr(select_jit, "_route_rows_parallel", lambda *args: calls.append(1) or real(*args))
    threads = torch.get_num_threads()
    scores = torch.rand(select_jit.PARALLEL_MIN_ROWS + 1, 8)

    def route(rows):
        return select_jit.route(scores[:rows], scores[:rows], None, 2, RoutingConfig(), select_jit.WEIGHTS_SELECTED)

    try:
        torch.set_num_threads(2)
        serial = route(select_jit.PARALLEL_MIN_ROWS)
        assert not calls
        split = route(select_jit.PARALLEL_MIN_ROWS + 1)
        assert calls == [1]
        assert torch.equal(split[0][:-1], serial[0]) and torch.equal(split[1][:-1], serial[1])
        with select_jit._PARALLEL_LOCK:
            route(select_jit.PARALLEL_MIN_ROWS + 1)
        torch.set_num_threads(1)
        route(select_jit.PARALLEL_MIN_ROWS + 1)
        assert calls == [1]
    finally:
        torch.set_num_threads(threads)
    assert select_jit.usable(torch.zeros(4, 8, dtype=torch.bfloat16))  # 16-bit logits: scored in float32


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("groups", [None, (4, 2)], ids=["nogroups", "groups"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_routing_non_finite_rows_are_the_reference(score_func, renormalize, groups, dtype, tie_check):
    # With groups, a NaN key makes its group's score NaN on the fast path, while the reference
    # scores the group without it: such rows are the reference's. bfloat16 logits take exact_ids.
    logits = non_finite_logits(score_func).to(dtype)
    num_groups, topk_groups = groups or (None, None)
    routing = RoutingConfig(
        score_func=score_func, renormalize=renormalize, num_groups=num_groups, topk_groups=topk_groups
    )
    weights, ids = cpu_routing.softmax_topk(logits, 5, routing, None)
    want_weights, want_ids = ref_routing.softmax_topk(logits, 5, routing=routing)
    torch.testing.assert_close(ids, want_ids, atol=0, rtol=0)
    torch.testing.assert_close(weights, want_weights, equal_nan=True)


@pytest.mark.parametrize("case", ROUTING_CASES[:5], ids=[c[0] for c in ROUTING_CASES[:5]])
def test_routing_backward_matches_float64(case):
    _, num_experts, k, options, with_bias = case
    logits, bias = routing_inputs(29, num_experts, options, with_bias)
    routing = RoutingConfig(**options)
    _, ids = cpu_routing.softmax_topk(logits, k, routing, bias)
    grad = torch.randn(29, k)
    got = cpu_routing.softmax_topk_backward(grad, logits, ids, routing=routing)
    want = ref_routing.softmax_topk_backward(grad.double(), logits.double(), ids, routing=routing)
    testing.assert_close(got, want, dtype=torch.float32)


# ------------------------------------------------------------------------------------------------
# exact_k


@pytest.mark.parametrize("num_experts,k,k_min", [(60, 4, 4), (160, 6, 6), (257, 8, 3), (13, 5, 0), (1, 1, 1)])
@pytest.mark.parametrize("num_tokens", ODD_TOKENS)
def test_exact_k_matches_float64(num_experts, k, k_min, num_tokens):
    logits = torch.randn(num_tokens, num_experts) * 2
    uniforms = torch.rand(num_tokens, num_experts + 1)
    with testing.poisoned_outputs():
        marginals, log_z, ids = cpu_probmoe.exact_k_forward(logits, k, k_min, uniforms)
        grad_m, grad_z = torch.randn(num_tokens, num_experts), torch.randn(num_tokens)
        grad = cpu_probmoe.exact_k_backward(logits, grad_m, grad_z, k, k_min)
    for name, t in (("marginals", marginals), ("log_z", log_z), ("grad", grad)):
        testing.assert_written(t, name)
    assert (ids != testing.utils.poison_value(torch.int32)).all()
    want_m, want_z, _ = ref_probmoe.exact_k_forward(logits.double(), k, k_min)
    testing.assert_close(marginals, want_m, dtype=torch.float32, op="exact_k")
    testing.assert_close(log_z, want_z, dtype=torch.float32, op="exact_k")
    want_grad = ref_probmoe.exact_k_backward(logits.double(), grad_m.double(), grad_z.double(), k, k_min)
    testing.assert_close(grad, want_grad, dtype=torch.float32, op="exact_k")
    # The sample is the reference's draw for draw (same table arithmetic, same uniforms).
    torch.testing.assert_close(ids, ref_probmoe.exact_k_forward(logits, k, k_min, uniforms)[2], atol=0, rtol=0)


def test_exact_k_rows_outside_the_linear_range_and_invalid_rows():
    logits = torch.randn(6, 40) * 2
    logits[0] *= 60  # a range beyond the linear DP's: the reference computes the row
    logits[1, 3] = float("nan")
    logits[2, 5] = float("inf")
    logits[3, :38] = float("-inf")  # two finite logits, k = 4: no subset
    marginals, log_z, _ = cpu_probmoe.exact_k_forward(logits, 4, 4)
    want_m, want_z, _ = ref_probmoe.exact_k_forward(logits, 4, 4)
    torch.testing.assert_close(marginals, want_m, equal_nan=True, atol=3e-5, rtol=1e-4)
    torch.testing.assert_close(log_z, want_z, equal_nan=True)
    grad = cpu_probmoe.exact_k_backward(logits, torch.ones(6, 40), torch.ones(6), 4, 4)
    want = ref_probmoe.exact_k_backward(logits, torch.ones(6, 40), torch.ones(6), 4, 4)
    torch.testing.assert_close(grad, want, equal_nan=True, atol=3e-5, rtol=1e-4)


def test_exact_k_chunks_agree(monkeypatch):
    logits = torch.randn(37, 24) * 2
    whole = cpu_probmoe.exact_k_forward(logits, 5, 5)[0]
    monkeypatch.setattr(cpu_probmoe, "TABLE_BYTES", 1)  # one token per chunk
    torch.testing.assert_close(cpu_probmoe.exact_k_forward(logits, 5, 5)[0], whole)


# ------------------------------------------------------------------------------------------------
# knn


@pytest.mark.parametrize("weighting", ["similarity", "softmax"])
@pytest.mark.parametrize("num_tokens", ODD_TOKENS)
def test_knn_matches_float64(weighting, num_tokens):
    num_experts, num_neighbors, memory_rows = 60, 5, 50
    router = torch.randn(num_tokens, num_experts)
    memory = torch.randn(memory_rows, num_experts)
    ids = torch.randint(0, memory_rows, (num_tokens, num_neighbors))
    sims = torch.rand(num_tokens, num_neighbors) * 2 - 0.5  # some rows have conf 0
    if num_tokens:
        sims[0] = float("nan")
    mixing = KnnMixing(weighting=weighting, temperature=0.3, min_confidence=0.1)
    mixed, conf = cpu_knn.knn_mix(router, memory[ids], sims, mixing)
    want_mixed, want_conf = ref_knn.knn_mix(router.double(), memory[ids].double(), sims.double(), mixing=mixing)
    testing.assert_close(mixed, want_mixed, dtype=torch.float32)
    testing.assert_close(conf, want_conf, dtype=torch.float32)
    dead = conf == 0
    assert torch.equal(mixed[dead], router[dead])  # the router's logits, bit for bit
    routing = RoutingConfig.renormalize()
    weights, expert_ids, _ = cpu_knn.knn_route(router, ids, sims, memory, 4, routing, None, mixing)
    want_w, want_ids, _ = ref_knn.knn_route(
        router.double(), ids, sims.double(), memory.double(), 4, routing=routing, mixing=mixing
    )
    torch.testing.assert_close(expert_ids, want_ids, atol=0, rtol=0)
    testing.assert_close(weights, want_w, dtype=torch.float32)
    grad = torch.randn(num_tokens, 4)
    got = cpu_knn.knn_route_backward(grad, router, ids, sims, memory, expert_ids, routing=routing, mixing=mixing)
    want = ref_knn.knn_route_backward(
        grad.double(), router.double(), ids, sims.double(), memory.double(), expert_ids, routing=routing, mixing=mixing
    )
    for a, b in zip(got, want):
        testing.assert_close(a, b, dtype=torch.float32)


# ------------------------------------------------------------------------------------------------
# experts and grouped_mm


def _experts_problem(num_experts, k, hidden, inter, num_tokens, empty_slots, bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(num_experts, 2 * inter, hidden, generator=gen) * hidden**-0.5
    down = torch.randn(num_experts, hidden, inter, generator=gen) * inter**-0.5
    x = torch.randn(num_tokens, hidden, generator=gen)
    weights = torch.rand(num_tokens, k, generator=gen)
    # Half the experts unrouted; -1 slots when asked.
    ids = torch.randint(-1 if empty_slots else 0, max(num_experts // 2, 1), (num_tokens, k), generator=gen)
    biases = (torch.randn(num_experts, 2 * inter, generator=gen), torch.randn(num_experts, hidden, generator=gen))
    return x, gate_up, down, weights, ids, biases if bias else (None, None)


EXPERT_CASES = [  # (E, k, H, I, T): small-batch path, one block, several blocks, odd sizes
    (60, 4, 32, 16, 1),
    (160, 6, 16, 8, 13),
    (257, 3, 8, 4, 97),
    (8, 2, 16, 8, 0),
    (16, 4, 64, 32, 300),
]


@pytest.mark.parametrize("case", EXPERT_CASES, ids=[f"E{c[0]}-T{c[4]}" for c in EXPERT_CASES])
@pytest.mark.parametrize("activation", ["silu", "gpt_oss"])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_experts_matches_float64(case, activation, bias, monkeypatch):
    num_experts, k, hidden, inter, num_tokens = case
    monkeypatch.setattr(cpu_experts, "BLOCK_ROWS", 64)  # several blocks at T = 300
    monkeypatch.setattr(cpu_experts, "BACKWARD_BLOCK_ROWS", 64)
    x, gate_up, down, weights, ids, (b1, b2) = _experts_problem(num_experts, k, hidden, inter, num_tokens, True, bias)
    with testing.poisoned_outputs():
        out, saved = cpu_experts.fused_experts_forward(x, gate_up, down, weights, ids, activation, b1, b2, True)
        grad_out = torch.randn(num_tokens, hidden)
        grads = cpu_experts.fused_experts_backward(grad_out, x, gate_up, down, weights, ids, activation, b1, b2, saved)
    want = ref_experts.fused_experts(
        x.double(), gate_up.double(), down.double(), weights.double(), ids, activation=activation,
        gate_up_bias=_d(b1), down_bias=_d(b2),
    )  # fmt: skip
    testing.assert_close(out, want, dtype=torch.float32, op="fused_experts")
    want_h = ref_experts.sorted_pre_activations(x.double(), gate_up.double(), ids, _d(b1))
    testing.assert_close(saved, want_h, dtype=torch.float32, op="fused_experts")
    want_grads = ref_experts.fused_experts_backward(
        grad_out.double(), x.double(), gate_up.double(), down.double(), weights.double(), ids,
        activation=activation, gate_up_bias=_d(b1), down_bias=_d(b2),
    )  # fmt: skip
    for name, got, ref in zip(("hidden", "gate_up", "down", "weights", "b1", "b2"), grads, want_grads):
        if ref is None:
            assert got is None
            continue
        testing.assert_written(got, name)
        testing.assert_close(got, ref, dtype=torch.float32, op="fused_experts", msg=name)
    # Unrouted experts get exactly zero weight gradients.
    unrouted = torch.ones(num_experts, dtype=torch.bool)
    unrouted[ids[ids >= 0].unique()] = False
    assert (grads[1][unrouted] == 0).all() and (grads[2][unrouted] == 0).all()


def test_small_batch_path_is_taken_for_decode_and_not_for_large_experts():
    assert experts_small.applies(torch.empty(8, 64, 32), torch.empty(8, 32, 32), torch.zeros(2, 2, dtype=torch.long))
    assert not experts_small.applies(
        torch.empty(64, 512, 512), torch.empty(64, 512, 256), torch.zeros(1, 8, dtype=torch.long)
    )


@pytest.mark.parametrize("num_rows,offsets", [(10, [2, 2, 7]), (7, [0, 0, 0]), (0, [0, 0, 0]), (13, [13, 13, 13])])
def test_grouped_mm_rows_past_the_last_offset_are_zero(num_rows, offsets):
    # torch._grouped_mm leaves those rows uninitialised (garbage, even NaN): the path must not.
    a = torch.randn(num_rows, 16)
    b = torch.randn(3, 16, 8)
    offsets = torch.tensor(offsets, dtype=torch.int32)
    grad_out = torch.randn(num_rows, 8)
    with testing.poisoned_outputs():
        out = cpu_experts.grouped_mm(a, b, offsets)
        grad_a, grad_b = cpu_experts.grouped_mm_backward(grad_out, a, b, offsets)
    testing.assert_written(out)
    testing.assert_written(grad_a)
    testing.assert_close(out, ref_experts.grouped_mm(a.double(), b.double(), offsets), dtype=torch.float32)
    want_a, want_b = ref_experts.grouped_mm_backward(grad_out.double(), a.double(), b.double(), offsets)
    testing.assert_close(grad_a, want_a, dtype=torch.float32)
    testing.assert_close(grad_b, want_b, dtype=torch.float32)


def test_grouped_mm_backward_takes_a_zero_stride_gradient():
    # torch._grouped_mm's own backward fails on the expanded gradient of a .sum(); the op's
    # explicit backward makes it contiguous first.
    a = torch.randn(10, 16, requires_grad=True)
    b = torch.randn(3, 16, 8, requires_grad=True)
    offsets = torch.tensor([2, 2, 7], dtype=torch.int32)
    moe_kernels.grouped_mm(a, b, offsets).sum().backward()
    want_a, want_b = ref_experts.grouped_mm_backward(torch.ones(10, 8).double(), a.double(), b.double(), offsets)
    testing.assert_close(a.grad, want_a, dtype=torch.float32)
    testing.assert_close(b.grad, want_b, dtype=torch.float32)


def test_public_ops_run_the_cpu_path(monkeypatch):
    calls = []
    real = cpu_routing.softmax_topk
    monkeypatch.setattr(cpu_routing, "softmax_topk", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    logits = testing.make_routing_logits(3, 16)
    weights, ids = moe_kernels.softmax_topk(logits, 2)
    assert calls
    want_weights, want_ids = softmax_topk_oracle(logits, 2)
    torch.testing.assert_close(ids, want_ids, atol=0, rtol=0)
    testing.assert_close(weights, want_weights, dtype=torch.float32)


# ------------------------------------------------------------------------------------------------
# Regressions the property tests found in the CPU path


@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (3, 1), (5, 2)])
def test_grouped_mm_operands_torch_grouped_mm_rejects_go_to_the_reference(shape):
    # ATen takes a (1, 1) matrix of strides (1, 1) as column-major and then requires its
    # leading stride to be a multiple of 16 bytes: such operands must not reach it.
    rows, inner = shape
    a = torch.randn(rows, inner)
    b = torch.randn(2, inner, 1)
    offsets = torch.tensor([rows // 2, rows], dtype=torch.int32)
    out = cpu_experts.grouped_mm(a, b, offsets)
    testing.assert_close(out, grouped_mm_oracle(a, b, offsets), dtype=torch.float32)
    grad_out = torch.randn(rows, 1)
    grad_a, grad_b = cpu_experts.grouped_mm_backward(grad_out, a, b, offsets)
    want_a, want_b = ref_experts.grouped_mm_backward(grad_out.double(), a.double(), b.double(), offsets)
    testing.assert_close(grad_a, want_a, dtype=torch.float32)
    testing.assert_close(grad_b, want_b, dtype=torch.float32)


def test_knn_mix_infinite_memory_logit_at_full_confidence_is_infinite():
    # lerp(router, retrieved, 1) is NaN for an infinite retrieved logit; the mix is +inf.
    router = torch.randn(1, 2)
    neighbors = torch.tensor([[[float("inf"), 0.5]]])
    sims = torch.tensor([[1.0]])
    mixed, conf = cpu_knn.knn_mix(router, neighbors, sims, KnnMixing())
    want_mixed, want_conf = knn_mix_oracle(router, neighbors, sims)
    assert conf.item() == 1.0 and want_conf.item() == 1.0
    assert mixed[0, 0].item() == float("inf") == want_mixed[0, 0].item()
    testing.assert_close(mixed[:, 1:], want_mixed[:, 1:], dtype=torch.float32)


def test_sigmoid_equal_logits_tie_to_the_lower_id_on_the_cpu_path(tie_check):
    # torch.sigmoid's vectorised and scalar paths round equal logits 1 ulp apart at some positions.
    logits = (torch.randn(31, 3, generator=torch.Generator().manual_seed(5894), dtype=torch.float64) * 30).float()
    logits[:, 1] = logits[:, 0]
    routing = RoutingConfig.llama4()
    weights, ids = cpu_routing.softmax_topk(logits, 3, routing, None)
    assert ids[21].tolist() == [2, 0, 1]  # torch.sigmoid's keys gave [2, 1, 0]
    # Against the reference (float32 keys: the float64 oracle separates saturated scores that
    # float32 ties), ids exactly.
    want_weights, want_ids = ref_routing.softmax_topk(logits, 3, routing=routing)
    torch.testing.assert_close(ids, want_ids, atol=0, rtol=0)
    testing.assert_close(weights, want_weights)
