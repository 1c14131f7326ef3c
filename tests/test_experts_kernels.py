"""Experts family, Triton kernels (CUDA, or the interpreter on CPU), against the float64 reference
and oracles: ``grouped_mm`` (forward, ``grad_a`` through the forward kernel on ``b^T``, the
weight-gradient kernel, the gather / row-scale variants, the gated epilogue), the alignment
kernel, and ``fused_experts`` forward and backward (also against the C++ oracle). The tile
heuristic and the tuned-config store (host code) are tested in test_tuned_configs.py. A small
property test draws grouped_mm shapes, groups, dtypes and layouts."""

from __future__ import annotations

import pytest
import torch
from cpp_reference import load_cpp_reference
from experts_cases import (
    SHAPES,
    SMALL,
    biases_of,
    fused_problem,
    gather_inputs,
    grouped_inputs,
    inputs_of,
    offsets_of,
    small_tiles,
    to_float64,
    uniform,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import gated_activation_oracle, gathered_grouped_mm_oracle, grouped_mm_oracle
from strategies import examples, lay_out, layouts

import moe_kernels as mk
from moe_kernels import testing
from moe_kernels.config import ACTIVATIONS
from moe_kernels.functional.grouped_mm import grouped_mm
from moe_kernels.ops import align as align_ops
from moe_kernels.ops import experts as ops
from moe_kernels.ops import grouped_mm as gmm
from moe_kernels.ops import tuned_configs as tuned
from moe_kernels.ops.tuned_configs import pinned_config
from moe_kernels.reference import experts as reference
from moe_kernels.testing import assert_close, assert_written, poisoned_outputs

pytestmark = pytest.mark.kernel

# ---------------------------------------------------------------- grouped_mm kernels


def _grouped_kernel_vs_float64(device, dtype, shape, *, b_transposed=False, strided=False):
    m, k, n, counts = shape
    a, b, offsets, grad = grouped_inputs(m, k, n, counts, dtype, device)
    if strided:  # a row stride past the row width, and a column-major output gradient
        a = torch.cat([a, torch.zeros_like(a[:, :3])], dim=1)[:, :k]
        grad = grad.t().contiguous().t()
    a_k = a.clone().requires_grad_(True)
    if b_transposed:  # the (G, K, N) view of a (G, N, K) tensor: stride_bk = 1, stride_bn = K
        b_leaf = b.transpose(1, 2).contiguous().requires_grad_(True)
        b_k = b_leaf.transpose(1, 2)
    else:
        b_leaf = b_k = b.clone().requires_grad_(True)
    with testing.poisoned_outputs():
        out = grouped_mm(a_k, b_k, offsets, backend="triton")
        out.backward(grad)
    grad_b = b_leaf.grad.transpose(1, 2) if b_transposed else b_leaf.grad
    for name, t in (("out", out), ("grad_a", a_k.grad), ("grad_b", grad_b)):
        testing.assert_written(t, name)
    assert out.dtype == a_k.grad.dtype == grad_b.dtype == dtype
    a64, b64 = a.double().cpu().requires_grad_(True), b.double().cpu().requires_grad_(True)
    want = reference.grouped_mm(a64, b64, offsets.cpu())
    want.backward(grad.double().cpu())
    testing.assert_close(out.cpu(), want, dtype=dtype, msg="out")
    testing.assert_close(a_k.grad.cpu(), a64.grad, dtype=dtype, msg="grad_a")
    testing.assert_close(grad_b.cpu(), b64.grad, dtype=dtype, msg="grad_b")
    tail = sum(counts)
    assert (out[tail:] == 0).all() and (a_k.grad[tail:] == 0).all()


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_grouped_mm_kernel_matches_float64(kernel_device, dtype, shape):
    with pinned_config(**SMALL):
        _grouped_kernel_vs_float64(kernel_device, dtype, SHAPES[shape])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_grouped_mm_kernel_strided_inputs(kernel_device, dtype):
    with pinned_config(**SMALL):
        _grouped_kernel_vs_float64(
            kernel_device, dtype, SHAPES["small-and-large-groups"], b_transposed=True, strided=True
        )


def test_grouped_mm_kernel_group_scan_in_chunks(kernel_device):
    """BLOCK_G = 2 scans the 5 groups' ends in 3 steps (carrying tile counts across steps)."""
    with pinned_config(**SMALL, BLOCK_G=2):
        _grouped_kernel_vs_float64(kernel_device, torch.float32, SHAPES["empty-first-mid-last"])


def test_grouped_mm_kernel_default_config(kernel_device):
    """The heuristic configuration (64 x 128 x 64 tiles: groups smaller and larger than a tile)."""
    assert tuned._PINNED_CONFIG is None
    _grouped_kernel_vs_float64(kernel_device, torch.float16, (150, 72, 136, [30, 0, 70, 41]))


@pytest.mark.parametrize("gather", [False, True], ids=["rows", "gather"])
@pytest.mark.parametrize("scale", [False, True], ids=["unscaled", "scaled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_grouped_mm_kernel_gather_and_scale(kernel_device, dtype, gather, scale):
    a, b, a_rows, row_scale, grad, offsets = gather_inputs(kernel_device, dtype)
    m_out = a_rows.shape[0]
    if not gather:  # plain rows: a holds the M_out rows
        a = a[a_rows.long()]
    rows = a_rows.long().cpu() if gather else torch.arange(m_out)
    s64 = row_scale if scale else torch.ones(m_out)
    want, want_db = gathered_grouped_mm_oracle(a, b, offsets, grad, rows, s64, dtype)
    kwargs = dict(a_rows=a_rows if gather else None, row_scale=row_scale if scale else None)
    with pinned_config(**SMALL), testing.poisoned_outputs():
        out = gmm.launch_grouped_mm(a, b, offsets, **kwargs)
        grad_b = gmm.launch_grouped_mm_weight_grad(a, grad, offsets, b.shape[0], **kwargs)
    testing.assert_written(out, "out")
    testing.assert_written(grad_b, "grad_b")
    testing.assert_close(out.cpu(), want, msg="out")
    testing.assert_close(grad_b.cpu(), want_db, msg="grad_b")


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_grouped_mm_kernel_gated_epilogue(kernel_device, dtype, activation, bias):
    """The up projection with the gated activation in its epilogue, against float64: ``act`` of
    ``h = a[a_rows] @ b[g] (+ bias[g])`` and, when stored, ``h`` itself; zero rows past the groups
    and an empty group included. ``h`` is rounded to the dtype when stored, ``act`` is computed
    from the float32 accumulators."""
    a, b, a_rows, _, _, offsets = gather_inputs(kernel_device, dtype, n=2 * 9)
    generator = torch.Generator().manual_seed(5)
    bias_t = uniform(b.shape[0], b.shape[2], generator=generator, dtype=dtype).to(kernel_device) if bias else None
    m_out = a_rows.shape[0]
    ends = offsets.tolist()
    group = torch.searchsorted(torch.tensor(ends), torch.arange(m_out), right=True)
    want_h = torch.zeros(m_out, b.shape[2], dtype=torch.float64)
    for r in range(ends[-1]):
        want_h[r] = a.double().cpu()[a_rows[r].item()] @ b.double().cpu()[group[r]]
        if bias:
            want_h[r] += bias_t.double().cpu()[group[r]]
    want_act = gated_activation_oracle(want_h, activation)
    want_act[ends[-1] :] = 0
    with pinned_config(**SMALL), testing.poisoned_outputs():
        act, h = gmm.launch_grouped_gated_mm(a, b, offsets, activation, a_rows=a_rows, bias=bias_t)
        act_only, no_h = gmm.launch_grouped_gated_mm(
            a, b, offsets, activation, a_rows=a_rows, bias=bias_t, store_h=False
        )
    testing.assert_written(act, "act")
    testing.assert_written(h, "h")
    testing.assert_close(h.cpu(), want_h, msg="h")
    testing.assert_close(
        act.cpu(), want_act, dtype=dtype, op=None if dtype == torch.float32 else "fused_experts", msg="act"
    )
    assert no_h is None and torch.equal(act_only, act)


def test_grouped_mm_kernel_gated_epilogue_without_a_product(kernel_device):
    """K = 0: h is the bias alone (0 past the groups), act its activation."""
    offsets = offsets_of([2, 3], kernel_device)
    a = torch.empty(6, 0, device=kernel_device)
    b = torch.empty(2, 0, 8, device=kernel_device)
    bias = torch.randn(2, 8, generator=torch.Generator().manual_seed(0)).to(kernel_device)
    act, h = gmm.launch_grouped_gated_mm(a, b, offsets, "silu", bias=bias)
    want_h = torch.cat([bias[:1].expand(2, -1), bias[1:].expand(3, -1), bias.new_zeros(1, 8)]).cpu().double()
    testing.assert_close(h.cpu(), want_h)
    testing.assert_close(act.cpu(), gated_activation_oracle(want_h, "silu"))


def test_grouped_mm_kernel_weight_grad_many_row_chunks(kernel_device):
    """A group of 70 rows reduces over 5 chunks of BLOCK_M = 16 (the last one partial)."""
    a, b, offsets, grad = grouped_inputs(75, 18, 20, [3, 70, 0], torch.float32, kernel_device)
    with pinned_config(**SMALL), testing.poisoned_outputs():
        grad_b = gmm.launch_grouped_mm_weight_grad(a, grad, offsets, 3)
    testing.assert_written(grad_b, "grad_b")
    _, want = reference.grouped_mm_backward(grad.double().cpu(), a.double().cpu(), b.double().cpu(), offsets.cpu())
    testing.assert_close(grad_b.cpu(), want)
    assert (grad_b[2] == 0).all()


# ---------------------------------------------------------------- alignment and fused_experts kernels


def _fused_kernel_vs_reference(device, dtype, num_tokens, hidden, inter, num_experts, k, activation, bias):
    p = fused_problem(num_tokens, hidden, inter, num_experts, k, dtype=dtype, bias=bias, device=device)
    grad_out = torch.randn(num_tokens, hidden).to(dtype).to(device)
    with small_tiles(device), poisoned_outputs():
        out, h = ops.launch_fused_experts(*inputs_of(p), activation, *biases_of(p))
        grads = ops.launch_fused_experts_backward(grad_out, *inputs_of(p), h, activation, *biases_of(p))
    # 16-bit: the op's own row (intermediates stored in 16 bits); float32 keeps the strict row,
    # which these small problems meet.
    op = None if dtype == torch.float32 else "fused_experts"
    names = (
        "grad_hidden",
        "grad_gate_up_proj",
        "grad_down_proj",
        "grad_weights",
        "grad_gate_up_bias",
        "grad_down_bias",
    )
    p64 = {key: (v.cpu() if isinstance(v, torch.Tensor) else v) for key, v in to_float64(p).items()}
    want = reference.fused_experts(**p64, activation=activation)
    want_grads = reference.fused_experts_backward(grad_out.double().cpu(), **p64, activation=activation)
    assert_written(out, "out")
    assert_close(out.cpu(), want, op=op, msg="out")
    # The independent C++ oracle (float64 loops) agrees too.
    cpp = load_cpp_reference().fused_experts_ref(
        p64["hidden"],
        p64["gate_up_proj"],
        p64["down_proj"],
        p64["weights"],
        p64["ids"],
        activation,
        p64["gate_up_bias"],
        p64["down_bias"],
    )
    assert_close(out.cpu(), cpp, op=op, msg="out vs C++ oracle")
    for name, got, expected in zip(names, grads, want_grads):
        if expected is None:
            assert got.numel() == 0
            continue
        assert_written(got, name)
        assert_close(got.cpu(), expected, dtype=dtype, op=op, msg=name)


@pytest.mark.parametrize(
    "num_tokens,k,num_experts,id_dtype",
    [
        (1, 1, 1, torch.int32),
        (1, 8, 64, torch.int64),
        (7, 2, 5, torch.int32),
        (37, 3, 60, torch.int64),
        (128, 8, 160, torch.int32),
        (97, 8, 1000, torch.int32),
    ],
)
def test_align_kernel_equals_the_torch_alignment(kernel_device, num_tokens, k, num_experts, id_dtype):
    """The one-program alignment kernel (decode-sized routings) gives exactly the torch path's
    alignment (stable by slot, empty slots last), the weights in sorted order, and a set valid flag."""
    generator = torch.Generator().manual_seed(num_tokens * k)
    ids = torch.randint(-1, num_experts, (num_tokens, k), generator=generator, dtype=id_dtype)
    weights = torch.rand(num_tokens, k, generator=generator)
    assert align_ops.align_meta(num_tokens * k, num_experts) is not None  # the kernel, not the fallback
    with poisoned_outputs():
        align, row_weight, valid = align_ops.launch_moe_align(
            ids.to(kernel_device), num_experts, weights.to(kernel_device)
        )
    want = align_ops.moe_align(ids, num_experts)
    for field in want._fields:
        got = getattr(align, field).cpu()
        assert got.dtype == getattr(want, field).dtype and torch.equal(got, getattr(want, field)), field
    assert torch.equal(row_weight.cpu(), weights.reshape(-1)[want.order]) and int(valid) == 1


def test_align_kernel_flags_out_of_range_ids(kernel_device):
    ids = torch.tensor([[0, 4], [1, -2], [5, 3]], dtype=torch.int32, device=kernel_device)
    *_, valid = align_ops.launch_moe_align(ids, 5, torch.rand(3, 2, device=kernel_device))
    assert int(valid) == 0
    *_, valid = align_ops.launch_moe_align(ids.clamp(-1, 4), 5, torch.rand(3, 2, device=kernel_device))
    assert int(valid) == 1
    p = fused_problem(3, 16, 8, 5, 2, device=kernel_device)
    with pytest.raises(RuntimeError), small_tiles(kernel_device):  # the launcher's asynchronous assert
        ops.launch_fused_experts(p["hidden"], p["gate_up_proj"], p["down_proj"], p["weights"], ids, "silu", None, None)
        if kernel_device == "cuda":
            torch.cuda.synchronize()


def test_fused_experts_kernel_inference_stores_no_h_and_backward_recomputes_it(kernel_device, monkeypatch):
    """Without ``save_h`` the forward writes no pre-activation (same output); a backward handed
    no ``h`` recomputes it (same gradients); the public function saves ``h`` exactly when an
    input requires grad."""
    p = fused_problem(9, 16, 8, 4, 2, bias=True, device=kernel_device)
    inputs, biases = inputs_of(p), biases_of(p)
    grad_out = torch.randn(9, 16).to(kernel_device)
    with small_tiles(kernel_device):
        out, h = ops.launch_fused_experts(*inputs, "gpt_oss", *biases)
        out_inference, no_h = ops.launch_fused_experts(*inputs, "gpt_oss", *biases, save_h=False)
        assert no_h.shape == (0, 16) and torch.equal(out_inference, out)
        with_h = ops.launch_fused_experts_backward(grad_out, *inputs, h, "gpt_oss", *biases)
        recomputed = ops.launch_fused_experts_backward(grad_out, *inputs, no_h, "gpt_oss", *biases)
        for got, want in zip(recomputed, with_h):
            assert torch.equal(got, want)
        stored = []
        launch = gmm.launch_grouped_gated_mm
        monkeypatch.setattr(
            gmm, "launch_grouped_gated_mm", lambda *a, **kw: stored.append(kw["store_h"]) or launch(*a, **kw)
        )
        options = dict(activation="gpt_oss", gate_up_bias=biases[0], down_bias=biases[1], backend="triton")
        with torch.no_grad():
            mk.fused_experts(*inputs, **options)
        mk.fused_experts(*inputs, **options)
        mk.fused_experts(p["hidden"].requires_grad_(), *inputs[1:], **options)
    assert stored == [False, False, True]


def test_fused_experts_kernel_with_the_general_alignment(kernel_device, monkeypatch):
    """Routings past the alignment kernel's size take the torch alignment: same results."""
    monkeypatch.setattr(align_ops, "ALIGN_KERNEL_MAX_SLOTS", 0)
    assert align_ops.align_meta(21 * 2, 5) is None
    _fused_kernel_vs_reference(kernel_device, torch.float32, 21, 24, 10, 5, 2, "silu", bias=False)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fused_experts_kernel_matches_reference(kernel_device, activation):
    _fused_kernel_vs_reference(kernel_device, torch.float32, 21, 24, 10, 5, 2, activation, bias=activation == "gpt_oss")


@pytest.mark.parametrize(
    "shape",
    [
        (1, 16, 8, 4, 1),  # T = 1, k = 1
        (0, 16, 8, 4, 2),  # T = 0
        (7, 97, 47, 5, 5),  # odd H and I, prime E, k = E
        (33, 16, 8, 1, 1),  # E = 1: every token on one expert
        (19, 32, 16, 7, 2),  # T < block, experts left empty
    ],
    ids=["T1-k1", "T0", "odd-H-I-k=E", "E1", "sparse"],
)
def test_fused_experts_kernel_edge_shapes(kernel_device, shape):
    _fused_kernel_vs_reference(kernel_device, torch.float32, *shape, "silu", bias=False)


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_fused_experts_kernel_low_precision(kernel_device, dtype):
    _fused_kernel_vs_reference(kernel_device, dtype, 17, 32, 16, 4, 2, "silu", bias=False)


def test_fused_experts_kernel_non_contiguous_inputs(kernel_device):
    p = fused_problem(10, 16, 8, 4, 2, device=kernel_device)
    strided = dict(p)
    strided["hidden"] = torch.stack([p["hidden"], -p["hidden"]], dim=2).flatten(1)[:, ::2]  # column stride 2
    strided["gate_up_proj"] = p["gate_up_proj"].transpose(1, 2).contiguous().transpose(1, 2)
    strided["down_proj"] = p["down_proj"].transpose(1, 2).contiguous().transpose(1, 2)
    strided["weights"] = p["weights"].t().contiguous().t()
    strided["ids"] = p["ids"].t().contiguous().t()
    assert not strided["hidden"].is_contiguous() and not strided["gate_up_proj"].is_contiguous()
    with small_tiles(kernel_device):
        got = mk.fused_experts(**strided, backend="triton")
        want = mk.fused_experts(**p, backend="triton")
    assert_close(got, want)


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay_with_new_inputs():
    static = fused_problem(16, 64, 32, 8, 2, dtype=torch.bfloat16, device="cuda")
    mk.fused_experts(**static)  # compile the kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mk.fused_experts(**static)
    fresh = fused_problem(16, 64, 32, 8, 2, dtype=torch.bfloat16, device="cuda", seed=1)
    for key in ("hidden", "weights", "ids"):
        static[key].copy_(fresh[key])
    graph.replay()
    torch.cuda.synchronize()
    want = reference.fused_experts(
        **{key: (v.cpu() if isinstance(v, torch.Tensor) else v) for key, v in to_float64(fresh).items()}
    )
    assert_close(out.cpu(), want, dtype=torch.bfloat16, op="fused_experts")


@settings(max_examples=examples(20))  # the interpreter is slow: small cases
@given(data=st.data())
def test_grouped_mm_kernel_property_matches_oracle(kernel_device, data):
    rows, width, cols = (data.draw(st.sampled_from(sizes)) for sizes in ([0, 1, 7, 31], [1, 5, 16], [1, 3, 24]))
    num_groups = data.draw(st.sampled_from([0, 1, 2, 5]), label="G")
    source = torch.Generator().manual_seed(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    ends = sorted(torch.randint(0, rows + 1, (num_groups,), generator=source).tolist())
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16]), label="dtype")
    a = lay_out(torch.rand(rows, width, generator=source).to(dtype) * 2 - 1, data.draw(layouts, label="a"))
    b = lay_out(torch.rand(num_groups, width, cols, generator=source).to(dtype) * 2 - 1, data.draw(layouts))
    offsets = torch.tensor(ends, dtype=torch.int32)
    with pinned_config(**SMALL), testing.poisoned_outputs():
        out = grouped_mm(a.to(kernel_device), b.to(kernel_device), offsets.to(kernel_device), backend="triton")
    testing.assert_written(out, "out")
    assert_close(out.cpu(), grouped_mm_oracle(a, b, offsets), dtype=dtype, msg=f"offsets {ends}")
