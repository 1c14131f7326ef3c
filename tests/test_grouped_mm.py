"""``grouped_mm`` (grouped GEMM, ``torch._grouped_mm``'s convention): the op's reference path,
registration, compile and bad input; the Triton kernels (forward, ``grad_a`` through the forward
kernel on ``b^T``, the weight-gradient kernel, the gather / row-scale variants) against float64."""

from __future__ import annotations

import json

import pytest
import torch

from moe_kernels import testing
from moe_kernels.functional.grouped_mm import grouped_mm
from moe_kernels.ops import grouped_mm as ops
from moe_kernels.ops import tuned_configs as tuned
from moe_kernels.ops.grouped_mm import GroupedMMFunction
from moe_kernels.reference import experts as reference

# Small tiles keep the interpreter fast and put several tiles in every group dimension.
SMALL = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)

# (M, K, N, rows per group): the rows past sum(counts) are the zero tail.
SHAPES = {
    "m0": (0, 8, 8, [0, 0]),
    "m1": (1, 5, 3, [1]),
    "tail": (20, 12, 10, [5, 7]),
    "all-empty": (6, 4, 5, [0, 0, 0]),
    "long-tail": (50, 8, 12, [3, 4]),
    "empty-first-mid-last": (45, 16, 24, [0, 12, 0, 28, 0]),
    "single-group": (33, 20, 17, [33]),
    "small-and-large-groups": (64, 24, 16, [2, 40, 5, 17]),
    "prime": (37, 47, 97, [3, 0, 19, 8, 5]),
    # Degenerate: nothing to multiply (the launchers write zeros without a launch).
    "k0": (5, 0, 4, [2, 2]),
    "n0": (4, 3, 0, [4]),
    "g0": (3, 4, 2, []),
}


def _offsets(counts, device="cpu"):
    return torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32).to(device)


def _uniform(*shape, generator, dtype=torch.float32):
    """Values in [-1, 1): products and sums stay O(sqrt(K)), errors O(sqrt(K) eps)."""
    return (torch.rand(*shape, generator=generator, dtype=torch.float64) * 2 - 1).to(dtype)


def _inputs(m, k, n, counts, dtype=torch.float32, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    a = _uniform(m, k, generator=generator, dtype=dtype)
    b = _uniform(len(counts), k, n, generator=generator, dtype=dtype)
    grad = _uniform(m, n, generator=generator, dtype=dtype)
    return a.to(device), b.to(device), _offsets(counts, device), grad.to(device)


def _oracle(a, b, offsets):
    """Per-group float64 loop written from the definition."""
    out = torch.zeros(a.shape[0], b.shape[2], dtype=torch.float64)
    start = 0
    for g, end in enumerate(offsets.tolist()):
        out[start:end] = a[start:end].double().cpu() @ b[g].double().cpu()
        start = end
    return out


# ---------------------------------------------------------------- reference path (no kernels)


def test_oracle_matches_reference():
    a, b, offsets, _ = _inputs(*SHAPES["empty-first-mid-last"], dtype=torch.float64)
    torch.testing.assert_close(reference.grouped_mm(a, b, offsets), _oracle(a, b, offsets))


@pytest.mark.parametrize("shape", ["m0", "tail", "empty-first-mid-last"])
def test_torch_backend_matches_reference_autograd(shape):
    a, b, offsets, grad = _inputs(*SHAPES[shape], dtype=torch.float64)
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


def test_gradcheck_float64():
    a, b, offsets, _ = _inputs(9, 4, 3, [2, 0, 5], dtype=torch.float64)
    args = (a.requires_grad_(True), b.requires_grad_(True))
    assert torch.autograd.gradcheck(lambda x, y: grouped_mm(x, y, offsets, backend="torch"), args)


@pytest.mark.parametrize("shape", ["m0", "m1", "tail"])
def test_opcheck_reference_path(shape):
    a, b, offsets, _ = _inputs(*SHAPES[shape])
    for requires_grad in (False, True):
        args = (a.clone().requires_grad_(requires_grad), b.clone().requires_grad_(requires_grad), offsets, False)
        torch.library.opcheck(torch.ops.moe_kernels.grouped_mm.default, args)
    grad = torch.randn(a.shape[0], b.shape[2])
    torch.library.opcheck(torch.ops.moe_kernels.grouped_mm_backward.default, (grad, a, b, offsets, False))


def test_eager_function_matches_op():
    a, b, offsets, grad = _inputs(*SHAPES["tail"])
    grads = []
    for fn in (GroupedMMFunction.apply, torch.ops.moe_kernels.grouped_mm):
        x, y = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        out = fn(x, y, offsets, False)
        out.backward(grad)
        grads.append((out, x.grad, y.grad))
    for via_function, via_op in zip(*grads):
        torch.testing.assert_close(via_function, via_op, atol=0, rtol=0)


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    a, b, offsets, grad = _inputs(*SHAPES["empty-first-mid-last"])

    def loss(x, y):
        return (grouped_mm(x, y, offsets, backend="torch") * grad).sum()

    eager = [t.clone().requires_grad_(True) for t in (a, b)]
    compiled = [t.clone().requires_grad_(True) for t in (a, b)]
    want = loss(*eager)
    want.backward()
    got = torch.compile(loss, fullgraph=True)(*compiled)
    got.backward()
    testing.assert_close(got, want)
    for c, e in zip(compiled, eager):
        testing.assert_close(c.grad, e.grad)


def _good_args():
    return dict(a=torch.randn(6, 4), b=torch.randn(3, 4, 5), offsets=torch.tensor([2, 2, 5], dtype=torch.int32))


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(a=[[1.0]]), TypeError, r"a must be a torch.Tensor, got list"),
        (
            dict(a=torch.ones(6, 4, dtype=torch.int32)),
            TypeError,
            r"a must be float32, float16 or bfloat16 .*got torch.int32",
        ),
        (dict(a=torch.ones(6, 4, 1)), ValueError, r"a must have shape \(M, K\), got \(6, 4, 1\)"),
        (dict(b=torch.ones(4, 5)), ValueError, r"b must have shape \(G, K, N\), got \(4, 5\)"),
        (dict(b=torch.ones(3, 7, 5)), ValueError, r"with K = a.shape\[1\] = 4, got \(3, 7, 5\)"),
        (
            dict(b=torch.ones(3, 4, 5, dtype=torch.float16)),
            TypeError,
            r"b must have a's dtype torch.float32, got torch.float16",
        ),
        (dict(b=torch.ones(3, 4, 5, device="meta")), ValueError, r"b must be on a's device cpu, got meta"),
        (dict(offsets=torch.tensor([2, 2, 5])), TypeError, r"offsets must be int32, got torch.int64"),
        (
            dict(offsets=torch.tensor([2, 5], dtype=torch.int32)),
            ValueError,
            r"offsets must have shape \(G,\) = \(3,\), got \(2,\)",
        ),
        (
            dict(offsets=torch.tensor([[2, 2, 5]], dtype=torch.int32)),
            ValueError,
            r"offsets must have shape \(G,\) = \(3,\), got \(1, 3\)",
        ),
        (
            dict(offsets=torch.tensor([2, 1, 5], dtype=torch.int32)),
            ValueError,
            r"non-decreasing, got offsets\[0\] = 2 > offsets\[1\] = 1",
        ),
        (
            dict(offsets=torch.tensor([-1, 2, 5], dtype=torch.int32)),
            ValueError,
            r"offsets must lie in \[0, M\] = \[0, 6\], got offsets\[0\] = -1",
        ),
        (dict(offsets=torch.tensor([2, 2, 7], dtype=torch.int32)), ValueError, r"got offsets\[2\] = 7"),
        (dict(backend="cuda"), ValueError, r"backend must be one of \('auto', 'triton', 'torch'\), got 'cuda'"),
    ],
)
def test_bad_arguments(change, error, match):
    args = _good_args()
    backend = change.pop("backend", "torch")
    args.update(change)
    with pytest.raises(error, match=match):
        grouped_mm(args["a"], args["b"], args["offsets"], backend=backend)


@pytest.mark.kernel
def test_float64_on_triton_path_is_refused(kernel_device):
    args = _good_args()
    device = kernel_device
    with pytest.raises(TypeError, match=r"backend='triton' takes float32/float16/bfloat16 a, got torch.float64"):
        grouped_mm(
            args["a"].double().to(device), args["b"].double().to(device), args["offsets"].to(device), backend="triton"
        )


def test_meta_heuristic_and_pinned_config():
    for m, n, k, dtype in [
        (1, 1, 1, torch.float32),
        (64, 2048, 7168, torch.bfloat16),
        (100000, 4096, 1536, torch.float16),
    ]:
        for weight_grad in (False, True):
            meta = ops.grouped_mm_meta(m, n, k, dtype, weight_grad=weight_grad)
            blocks = [value for key, value in meta.items() if key.startswith("BLOCK_") and key != "BLOCK_G"]
            assert all(v >= 16 and v & (v - 1) == 0 for v in blocks), meta
            assert meta["num_warps"] in (4, 8) and meta["INPUT_PRECISION"] == (
                "ieee" if dtype == torch.float32 else "tf32"
            )
    big = ops.grouped_mm_meta(100000, 4096, 1536, torch.bfloat16)
    assert (big["BLOCK_M"], big["BLOCK_N"], big["BLOCK_K"], big["num_warps"]) == (128, 128, 64, 8)
    with ops.pinned_config(**SMALL):
        assert {k: ops.grouped_mm_meta(1000, 1000, 1000, torch.float16)[k] for k in SMALL} == SMALL
        grad_meta = ops.grouped_mm_meta(1000, 1000, 1000, torch.float16, weight_grad=True)
        assert (grad_meta["BLOCK_M"], grad_meta["BLOCK_N"], grad_meta["BLOCK_K_OUT"]) == (16, 16, 16)
        with ops.pinned_config(BLOCK_G=2):
            assert ops.grouped_mm_meta(1, 1, 1, torch.float32)["BLOCK_G"] == 2
            assert ops.grouped_mm_meta(1, 1, 1, torch.float32)["BLOCK_M"] == 16
    assert tuned._PINNED_CONFIG is None
    with pytest.raises(ValueError, match=r"unknown keys \['BLOCK_X'\]"):
        with ops.pinned_config(BLOCK_X=16):
            pass
    with pytest.raises(ValueError, match=r"BLOCK_M must be a power of two >= 16, got 24"):
        with ops.pinned_config(BLOCK_M=24):
            pass


# ---------------------------------------------------------------- Triton kernels


def _kernel_vs_float64(device, dtype, shape, *, b_transposed=False, strided=False):
    m, k, n, counts = shape
    a, b, offsets, grad = _inputs(m, k, n, counts, dtype, device)
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


@pytest.mark.kernel
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_kernel_matches_float64(kernel_device, dtype, shape):
    with ops.pinned_config(**SMALL):
        _kernel_vs_float64(kernel_device, dtype, SHAPES[shape])


@pytest.mark.kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_strided_inputs(kernel_device, dtype):
    with ops.pinned_config(**SMALL):
        _kernel_vs_float64(kernel_device, dtype, SHAPES["small-and-large-groups"], b_transposed=True, strided=True)


@pytest.mark.kernel
def test_kernel_group_scan_in_chunks(kernel_device):
    """BLOCK_G = 2 scans the 5 groups' ends in 3 steps (carrying tile counts across steps)."""
    with ops.pinned_config(**SMALL, BLOCK_G=2):
        _kernel_vs_float64(kernel_device, torch.float32, SHAPES["empty-first-mid-last"])


@pytest.mark.kernel
def test_kernel_default_config(kernel_device):
    """The heuristic configuration (64 x 128 x 64 tiles: groups smaller and larger than a tile)."""
    assert tuned._PINNED_CONFIG is None
    _kernel_vs_float64(kernel_device, torch.float16, (150, 72, 136, [30, 0, 70, 41]))


def _gather_inputs(device, dtype, m_src=23, k=20, n=18, counts=(7, 0, 16, 5), seed=1):
    generator = torch.Generator().manual_seed(seed)
    m_out = sum(counts) + 3  # 3 rows past the groups
    a = _uniform(m_src, k, generator=generator, dtype=dtype)
    b = _uniform(len(counts), k, n, generator=generator, dtype=dtype)
    a_rows = torch.randint(0, m_src, (m_out,), generator=generator, dtype=torch.int32)
    # Scales with 2 fraction bits: times a float16/float32 value, exact in float32.
    scale = torch.randint(4, 13, (m_out,), generator=generator).to(torch.float32) / 4
    grad = _uniform(m_out, n, generator=generator, dtype=dtype)
    return [t.to(device) for t in (a, b, a_rows, scale, grad)] + [_offsets(list(counts), device)]


@pytest.mark.kernel
@pytest.mark.parametrize("gather", [False, True], ids=["rows", "gather"])
@pytest.mark.parametrize("scale", [False, True], ids=["unscaled", "scaled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_gather_and_scale(kernel_device, dtype, gather, scale):
    a, b, a_rows, row_scale, grad, offsets = _gather_inputs(kernel_device, dtype)
    m_out = a_rows.shape[0]
    if not gather:  # plain rows: a holds the M_out rows
        a = a[a_rows.long()]
    rows = a_rows.long().cpu() if gather else torch.arange(m_out)
    ends = offsets.tolist()
    group = torch.searchsorted(torch.tensor(ends), torch.arange(m_out), right=True)
    valid = torch.arange(m_out) < ends[-1]
    a64, b64, grad64 = a.double().cpu(), b.double().cpu(), grad.double().cpu()
    s64 = row_scale.double().cpu() if scale else torch.ones(m_out, dtype=torch.float64)
    want = torch.zeros(m_out, b.shape[2], dtype=torch.float64)
    want_db = torch.zeros(b.shape, dtype=torch.float64)
    for r in range(m_out):
        if valid[r]:
            want[r] = s64[r] * (a64[rows[r]] @ b64[group[r]])
            # The kernel rounds the scaled gradient rows to their dtype before the product.
            scaled = (s64[r] * grad64[r]).to(dtype).double()
            want_db[group[r]] += torch.outer(a64[rows[r]], scaled)
    kwargs = dict(a_rows=a_rows if gather else None, row_scale=row_scale if scale else None)
    with ops.pinned_config(**SMALL), testing.poisoned_outputs():
        out = ops.launch_grouped_mm(a, b, offsets, **kwargs)
        grad_b = ops.launch_grouped_mm_weight_grad(a, grad, offsets, b.shape[0], **kwargs)
    testing.assert_written(out, "out")
    testing.assert_written(grad_b, "grad_b")
    testing.assert_close(out.cpu(), want, msg="out")
    testing.assert_close(grad_b.cpu(), want_db, msg="grad_b")


@pytest.mark.kernel
@pytest.mark.parametrize("activation", reference.ACTIVATIONS)
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_gated_epilogue(kernel_device, dtype, activation, bias):
    """The up projection with the gated activation in its epilogue, against float64: ``act`` of
    ``h = a[a_rows] @ b[g] (+ bias[g])`` and, when stored, ``h`` itself; zero rows past the groups
    and an empty group included. ``h`` is rounded to the dtype when stored, ``act`` is computed
    from the float32 accumulators."""
    a, b, a_rows, _, _, offsets = _gather_inputs(kernel_device, dtype, n=2 * 9)
    generator = torch.Generator().manual_seed(5)
    bias_t = _uniform(b.shape[0], b.shape[2], generator=generator, dtype=dtype).to(kernel_device) if bias else None
    m_out = a_rows.shape[0]
    ends = offsets.tolist()
    group = torch.searchsorted(torch.tensor(ends), torch.arange(m_out), right=True)
    want_h = torch.zeros(m_out, b.shape[2], dtype=torch.float64)
    for r in range(ends[-1]):
        want_h[r] = a.double().cpu()[a_rows[r].item()] @ b.double().cpu()[group[r]]
        if bias:
            want_h[r] += bias_t.double().cpu()[group[r]]
    want_act = reference.gated_activation(want_h, activation)
    want_act[ends[-1] :] = 0
    with ops.pinned_config(**SMALL), testing.poisoned_outputs():
        act, h = ops.launch_grouped_gated_mm(a, b, offsets, activation, a_rows=a_rows, bias=bias_t)
        act_only, no_h = ops.launch_grouped_gated_mm(
            a, b, offsets, activation, a_rows=a_rows, bias=bias_t, store_h=False
        )
    testing.assert_written(act, "act")
    testing.assert_written(h, "h")
    testing.assert_close(h.cpu(), want_h, msg="h")
    testing.assert_close(
        act.cpu(), want_act, dtype=dtype, op=None if dtype == torch.float32 else "fused_experts", msg="act"
    )
    assert no_h is None and torch.equal(act_only, act)


@pytest.mark.kernel
def test_kernel_gated_epilogue_without_a_product(kernel_device):
    """K = 0: h is the bias alone (0 past the groups), act its activation."""
    offsets = _offsets([2, 3], kernel_device)
    a = torch.empty(6, 0, device=kernel_device)
    b = torch.empty(2, 0, 8, device=kernel_device)
    bias = torch.randn(2, 8, generator=torch.Generator().manual_seed(0)).to(kernel_device)
    act, h = ops.launch_grouped_gated_mm(a, b, offsets, "silu", bias=bias)
    want_h = torch.cat([bias[:1].expand(2, -1), bias[1:].expand(3, -1), bias.new_zeros(1, 8)]).cpu().double()
    testing.assert_close(h.cpu(), want_h)
    testing.assert_close(act.cpu(), reference.gated_activation(want_h, "silu"))


@pytest.mark.kernel
def test_kernel_weight_grad_many_row_chunks(kernel_device):
    """A group of 70 rows reduces over 5 chunks of BLOCK_M = 16 (the last one partial)."""
    a, b, offsets, grad = _inputs(75, 18, 20, [3, 70, 0], torch.float32, kernel_device)
    with ops.pinned_config(**SMALL), testing.poisoned_outputs():
        grad_b = ops.launch_grouped_mm_weight_grad(a, grad, offsets, 3)
    testing.assert_written(grad_b, "grad_b")
    _, want = reference.grouped_mm_backward(grad.double().cpu(), a.double().cpu(), b.double().cpu(), offsets.cpu())
    testing.assert_close(grad_b.cpu(), want)
    assert (grad_b[2] == 0).all()


@pytest.mark.kernel
def test_kernel_opcheck_and_eager_function(kernel_device):
    a, b, offsets, _ = _inputs(*SHAPES["tail"], device=kernel_device)
    with ops.pinned_config(**SMALL):
        args = (a.clone().requires_grad_(True), b.clone().requires_grad_(True), offsets, True)
        torch.library.opcheck(torch.ops.moe_kernels.grouped_mm.default, args)
        via_function = GroupedMMFunction.apply(*args)
        via_op = torch.ops.moe_kernels.grouped_mm(*args)
    torch.testing.assert_close(via_function, via_op, atol=0, rtol=0)


def test_tuned_configs_replace_the_heuristic(tmp_path, monkeypatch):
    monkeypatch.setattr(tuned, "TUNED_CONFIG_DIR", tmp_path)
    tuned.tuned_table.cache_clear()
    name = "NVIDIA H100 80GB HBM3"
    key = tuned.tuned_key("forward", torch.bfloat16, 1536, 2048)
    small = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=4)
    large = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3)
    path = tuned.write_tuned_table(name, {key: [[32768, large], [512, small]]}, "3.6.0")
    try:
        assert path == tmp_path / "nvidia-h100-80gb-hbm3.json"
        assert json.loads(path.read_text())["tables"][key]["triton"] == "3.6.0"  # the tuner's Triton is recorded
        heuristic = ops.grouped_mm_meta(100, 1536, 2048, torch.bfloat16)
        for rows, want in ((100, small), (512, small), (4096, large), (32768, large)):
            meta = ops.grouped_mm_meta(rows, 1536, 2048, torch.bfloat16, device_name=name)
            assert {k: meta[k] for k in want} == want
        # Past the tuned range the heuristic applies, not the largest tuned tile.
        assert ops.grouped_mm_meta(10**6, 1536, 2048, torch.bfloat16, device_name=name) == ops.grouped_mm_meta(
            10**6, 1536, 2048, torch.bfloat16
        )
        # Another GPU, another shape or no device: the heuristic.
        assert ops.grouped_mm_meta(100, 1536, 2048, torch.bfloat16, device_name="NVIDIA A100") == heuristic
        assert ops.grouped_mm_meta(100, 1024, 2048, torch.bfloat16, device_name=name) == ops.grouped_mm_meta(
            100, 1024, 2048, torch.bfloat16
        )
        # The gated kernel of the same (N, K) has its own entries.
        assert ops.grouped_mm_meta(
            100, 1536, 2048, torch.bfloat16, gated=True, device_name=name
        ) == ops.grouped_mm_meta(100, 1536, 2048, torch.bfloat16, gated=True)
        # A second tuning run merges its tables into the file.
        other = tuned.tuned_key("weight_grad", torch.bfloat16, 768, 2048)
        tuned.write_tuned_table(name, {other: [[512, dict(BLOCK_M=32)]]}, "3.9.0")
        tables = json.loads(path.read_text())["tables"]
        assert tables[key]["triton"] == "3.6.0" and tables[other]["triton"] == "3.9.0"
        with pytest.raises(ValueError, match="kernel must be one of"):
            tuned.tuned_key(False, torch.bfloat16, 1, 1)
        with ops.pinned_config(BLOCK_M=16):  # a pinned config still wins
            assert ops.grouped_mm_meta(100, 1536, 2048, torch.bfloat16, device_name=name)["BLOCK_M"] == 16
    finally:
        tuned.tuned_table.cache_clear()
