"""The fused experts op: routing metadata, the Triton path (grouped GEMMs, activation, combine)
against the float64 reference, the library registration and bad inputs. The reference itself is
checked against loops and the C++ oracle in test_experts_reference.py."""

from __future__ import annotations

import contextlib

import pytest
import torch
from cpp_reference import load_cpp_reference

import moe_kernels as mk
from moe_kernels.ops import align as align_ops
from moe_kernels.ops import experts as ops
from moe_kernels.ops import grouped_mm as gmm
from moe_kernels.reference import experts as ref
from moe_kernels.testing import assert_close, assert_written, poisoned_outputs


def _problem(num_tokens, hidden, inter, num_experts, k, *, dtype=torch.float32, bias=False, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(dtype).to(device)

    rows = [torch.randperm(num_experts, generator=generator)[:k] for _ in range(num_tokens)]
    ids = (torch.stack(rows) if rows else torch.zeros(0, k, dtype=torch.int64)).int()
    if num_tokens > 2 and k > 1:
        ids[1, -1] = -1  # an empty slot
    return dict(
        hidden=randn(num_tokens, hidden),
        gate_up_proj=randn(num_experts, 2 * inter, hidden, scale=hidden**-0.5),
        down_proj=randn(num_experts, hidden, inter, scale=inter**-0.5),
        weights=torch.rand(num_tokens, k, generator=generator)
        .to(torch.float64 if dtype == torch.float64 else torch.float32)
        .to(device),
        ids=ids.to(device),
        gate_up_bias=randn(num_experts, 2 * inter, scale=0.5) if bias else None,
        down_bias=randn(num_experts, hidden, scale=0.5) if bias else None,
    )


def _float64(p):
    return {key: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for key, v in p.items()}


def test_moe_align_sorts_slots_stably():
    ids = torch.tensor([[2, 0], [-1, 2], [1, 0], [0, -1]], dtype=torch.int32)
    align = mk.moe_align(ids, 3)
    assert align.order.tolist() == [1, 5, 6, 4, 0, 3, 2, 7]
    assert align.tokens.tolist() == [0, 2, 3, 2, 0, 1, 1, 3]
    assert align.experts.tolist() == [0, 0, 0, 1, 2, 2, 3, 3]
    assert align.counts.tolist() == [3, 1, 2] and align.offsets.tolist() == [3, 4, 6]
    assert align.positions[align.order].tolist() == list(range(8))
    assert torch.equal(mk.expert_counts(ids, 3), align.counts)
    assert torch.equal(mk.expert_counts(ids, 3), ref.expert_counts(ids, 3))


@pytest.mark.parametrize("activation", ref.ACTIVATIONS)
def test_reference_path_matches_float64(activation):
    p = _problem(9, 16, 6, 4, 2, bias=activation == "gpt_oss")
    out = mk.fused_experts(**p, activation=activation)
    want = ref.fused_experts(**_float64(p), activation=activation)
    assert out.dtype == torch.float32
    assert_close(out, want, dtype=torch.float32, msg=activation)


def test_gradients_reach_every_input():
    p = _problem(7, 8, 4, 3, 2, dtype=torch.float64, bias=True)
    leaves = {key: v.requires_grad_() for key, v in p.items() if key != "ids"}
    assert torch.autograd.gradcheck(
        lambda *args: mk.fused_experts(
            *args[:4], p["ids"], gate_up_bias=args[4], down_bias=args[5], activation="gpt_oss"
        ),
        tuple(leaves[key] for key in ("hidden", "gate_up_proj", "down_proj", "weights", "gate_up_bias", "down_bias")),
    )


@pytest.mark.parametrize("num_tokens", [0, 1, 5])
def test_opcheck(num_tokens):
    p = _problem(num_tokens, 8, 4, 3, 2, bias=True)
    for key in ("hidden", "gate_up_proj", "down_proj", "weights"):
        p[key].requires_grad_()
    args = (
        p["hidden"],
        p["gate_up_proj"],
        p["down_proj"],
        p["weights"],
        p["ids"],
        "silu",
        p["gate_up_bias"],
        p["down_bias"],
        False,
        True,
    )
    torch.library.opcheck(ops.fused_experts_op, args)


def test_compile_fullgraph_matches_eager():
    p = _problem(11, 8, 4, 3, 2)
    p["hidden"].requires_grad_()

    def layer(hidden):
        return mk.fused_experts(hidden, p["gate_up_proj"], p["down_proj"], p["weights"], p["ids"])

    eager = layer(p["hidden"])
    compiled = torch.compile(layer, fullgraph=True)(p["hidden"])
    assert_close(compiled, eager)
    (grad_eager,) = torch.autograd.grad(eager.sum(), p["hidden"])
    (grad_compiled,) = torch.autograd.grad(compiled.sum(), p["hidden"])
    assert_close(grad_compiled, grad_eager)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(hidden=torch.ones(4, 8, dtype=torch.int32)), TypeError, "hidden must be float32"),
        (dict(gate_up_proj=torch.ones(3, 7, 8)), ValueError, r"gate_up_proj must have shape \(E, 2I, H\) with H=8"),
        (dict(down_proj=torch.ones(3, 8, 5)), ValueError, r"down_proj must have shape \(E, H, I\) = \(3, 8, 4\)"),
        (dict(down_proj=torch.ones(3, 8, 4, dtype=torch.float64)), TypeError, "down_proj must have hidden's dtype"),
        (dict(ids=torch.zeros(4, 2)), TypeError, r"ids must be a \(T, k\) int32 or int64 tensor"),
        (
            dict(ids=torch.full((4, 2), 3, dtype=torch.int32)),
            ValueError,
            r"ids must lie in \[-1, E\) = \[-1, 3\).*got values in \[3, 3\]",
        ),
        (
            dict(ids=torch.full((4, 2), -2, dtype=torch.int32)),
            ValueError,
            r"ids must lie in \[-1, E\) = \[-1, 3\).*got values in \[-2, -2\]",
        ),
        (dict(weights=torch.ones(4, 3)), ValueError, r"weights and ids must both have shape \(T, k\) with T=4"),
        (dict(weights=torch.ones(4, 2, dtype=torch.float16)), TypeError, "weights must be float32"),
        (dict(activation="relu"), ValueError, "activation must be one of"),
        (
            dict(down_bias=torch.ones(3, 4)),
            ValueError,
            r"down_bias must be None or a torch.float32 tensor of shape \(3, 8\)",
        ),
    ],
)
def test_bad_arguments(change, error, match):
    p = _problem(4, 8, 4, 3, 2)
    kwargs = {**p, **{key: v for key, v in change.items() if key != "activation"}}
    with pytest.raises(error, match=match):
        mk.fused_experts(**kwargs, activation=change.get("activation", "silu"))


# ---------------------------------------------------------------------------------------------
# Triton path (CUDA, or the interpreter on CPU)
# ---------------------------------------------------------------------------------------------


def _small_tiles(device):
    """The interpreter runs one program at a time: small tiles keep the tests fast there."""
    return gmm.pinned_config(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16) if device == "cpu" else contextlib.nullcontext()


def _kernel_vs_reference(device, dtype, num_tokens, hidden, inter, num_experts, k, activation, bias):
    p = _problem(num_tokens, hidden, inter, num_experts, k, dtype=dtype, bias=bias, device=device)
    grad_out = torch.randn(num_tokens, hidden).to(dtype).to(device)
    with _small_tiles(device), poisoned_outputs():
        out, h = ops.launch_fused_experts(
            p["hidden"],
            p["gate_up_proj"],
            p["down_proj"],
            p["weights"],
            p["ids"],
            activation,
            p["gate_up_bias"],
            p["down_bias"],
        )
        grads = ops.launch_fused_experts_backward(
            grad_out,
            p["hidden"],
            p["gate_up_proj"],
            p["down_proj"],
            p["weights"],
            p["ids"],
            h,
            activation,
            p["gate_up_bias"],
            p["down_bias"],
        )
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
    p64 = {key: (v.cpu() if isinstance(v, torch.Tensor) else v) for key, v in _float64(p).items()}
    want = ref.fused_experts(**p64, activation=activation)
    want_grads = ref.fused_experts_backward(grad_out.double().cpu(), **p64, activation=activation)
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


@pytest.mark.kernel
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


@pytest.mark.kernel
def test_align_kernel_flags_out_of_range_ids(kernel_device):
    ids = torch.tensor([[0, 4], [1, -2], [5, 3]], dtype=torch.int32, device=kernel_device)
    *_, valid = align_ops.launch_moe_align(ids, 5, torch.rand(3, 2, device=kernel_device))
    assert int(valid) == 0
    *_, valid = align_ops.launch_moe_align(ids.clamp(-1, 4), 5, torch.rand(3, 2, device=kernel_device))
    assert int(valid) == 1
    p = _problem(3, 16, 8, 5, 2, device=kernel_device)
    with pytest.raises(RuntimeError), _small_tiles(kernel_device):  # the launcher's asynchronous assert
        ops.launch_fused_experts(p["hidden"], p["gate_up_proj"], p["down_proj"], p["weights"], ids, "silu", None, None)
        if kernel_device == "cuda":
            torch.cuda.synchronize()


@pytest.mark.kernel
def test_kernel_inference_stores_no_h_and_backward_recomputes_it(kernel_device, monkeypatch):
    """Without ``save_h`` the forward writes no pre-activation (same output); a backward handed
    no ``h`` recomputes it (same gradients); the public function saves ``h`` exactly when an
    input requires grad."""
    p = _problem(9, 16, 8, 4, 2, bias=True, device=kernel_device)
    args = (
        p["hidden"],
        p["gate_up_proj"],
        p["down_proj"],
        p["weights"],
        p["ids"],
        "gpt_oss",
        p["gate_up_bias"],
        p["down_bias"],
    )
    grad_out = torch.randn(9, 16).to(kernel_device)
    with _small_tiles(kernel_device):
        out, h = ops.launch_fused_experts(*args)
        out_inference, no_h = ops.launch_fused_experts(*args, save_h=False)
        assert no_h.shape == (0, 16) and torch.equal(out_inference, out)
        with_h = ops.launch_fused_experts_backward(grad_out, *args[:5], h, *args[5:])
        recomputed = ops.launch_fused_experts_backward(grad_out, *args[:5], no_h, *args[5:])
        for got, want in zip(recomputed, with_h):
            assert torch.equal(got, want)
        stored = []
        launch = gmm.launch_grouped_gated_mm
        monkeypatch.setattr(
            gmm, "launch_grouped_gated_mm", lambda *a, **kw: stored.append(kw["store_h"]) or launch(*a, **kw)
        )
        with torch.no_grad():
            mk.fused_experts(*args[:5], activation="gpt_oss", gate_up_bias=args[6], down_bias=args[7], backend="triton")
        mk.fused_experts(*args[:5], activation="gpt_oss", gate_up_bias=args[6], down_bias=args[7], backend="triton")
        mk.fused_experts(
            p["hidden"].requires_grad_(),
            *args[1:5],
            activation="gpt_oss",
            gate_up_bias=args[6],
            down_bias=args[7],
            backend="triton",
        )
    assert stored == [False, False, True]


@pytest.mark.kernel
def test_kernel_with_the_general_alignment(kernel_device, monkeypatch):
    """Routings past the alignment kernel's size take the torch alignment: same results."""
    monkeypatch.setattr(align_ops, "ALIGN_KERNEL_MAX_SLOTS", 0)
    assert align_ops.align_meta(21 * 2, 5) is None
    _kernel_vs_reference(kernel_device, torch.float32, 21, 24, 10, 5, 2, "silu", bias=False)


@pytest.mark.kernel
@pytest.mark.parametrize("activation", ref.ACTIVATIONS)
def test_kernel_matches_reference(kernel_device, activation):
    _kernel_vs_reference(kernel_device, torch.float32, 21, 24, 10, 5, 2, activation, bias=activation == "gpt_oss")


@pytest.mark.kernel
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
def test_kernel_edge_shapes(kernel_device, shape):
    _kernel_vs_reference(kernel_device, torch.float32, *shape, "silu", bias=False)


@pytest.mark.kernel
@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_kernel_low_precision(kernel_device, dtype):
    _kernel_vs_reference(kernel_device, dtype, 17, 32, 16, 4, 2, "silu", bias=False)


@pytest.mark.kernel
def test_kernel_functional_and_compile(kernel_device):
    p = _problem(12, 16, 8, 4, 2, device=kernel_device)
    p["hidden"].requires_grad_()
    with _small_tiles(kernel_device):
        eager = mk.fused_experts(**p, backend="triton")
        compiled = torch.compile(lambda **kw: mk.fused_experts(**kw, backend="triton"), fullgraph=True)(**p)
        assert_close(compiled, eager)
        eager.sum().backward()
    want = ref.fused_experts(**{key: (v.detach() if isinstance(v, torch.Tensor) else v) for key, v in p.items()})
    assert_close(eager.detach(), want)


@pytest.mark.kernel
def test_kernel_non_contiguous_inputs(kernel_device):
    p = _problem(10, 16, 8, 4, 2, device=kernel_device)
    strided = dict(p)
    strided["hidden"] = torch.stack([p["hidden"], -p["hidden"]], dim=2).flatten(1)[:, ::2]  # column stride 2
    strided["gate_up_proj"] = p["gate_up_proj"].transpose(1, 2).contiguous().transpose(1, 2)
    strided["down_proj"] = p["down_proj"].transpose(1, 2).contiguous().transpose(1, 2)
    strided["weights"] = p["weights"].t().contiguous().t()
    strided["ids"] = p["ids"].t().contiguous().t()
    assert not strided["hidden"].is_contiguous() and not strided["gate_up_proj"].is_contiguous()
    with _small_tiles(kernel_device):
        got = mk.fused_experts(**strided, backend="triton")
        want = mk.fused_experts(**p, backend="triton")
    assert_close(got, want)


@pytest.mark.gpu
@pytest.mark.kernel
def test_cuda_graph_capture_and_replay_with_new_inputs():
    static = _problem(16, 64, 32, 8, 2, dtype=torch.bfloat16, device="cuda")
    mk.fused_experts(**static)  # compile the kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mk.fused_experts(**static)
    fresh = _problem(16, 64, 32, 8, 2, dtype=torch.bfloat16, device="cuda", seed=1)
    for key in ("hidden", "weights", "ids"):
        static[key].copy_(fresh[key])
    graph.replay()
    torch.cuda.synchronize()
    want = ref.fused_experts(
        **{key: (v.cpu() if isinstance(v, torch.Tensor) else v) for key, v in _float64(fresh).items()}
    )
    assert_close(out.cpu(), want, dtype=torch.bfloat16, op="fused_experts")
