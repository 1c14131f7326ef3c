"""Experts family, bad input: every bad argument to ``grouped_mm``, ``fused_experts``, ``moe_align``
and ``expert_counts`` gets a clear ``ValueError`` / ``TypeError`` naming the op and the argument
(never an IndexError, or a RuntimeError from an index out of range)."""

from __future__ import annotations

import pytest
import torch
from experts_cases import call, fused_problem, reference_problem
from helpers import assert_refused
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import examples

import moe_kernels as mk
from moe_kernels import reference
from moe_kernels.functional.grouped_mm import grouped_mm


def _grouped_mm_args():
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
def test_grouped_mm_bad_arguments(change, error, match):
    args = _grouped_mm_args()
    backend = change.pop("backend", "torch")
    args.update(change)
    with pytest.raises(error, match=match):
        grouped_mm(args["a"], args["b"], args["offsets"], backend=backend)


@pytest.mark.kernel
def test_grouped_mm_float64_on_triton_path_is_refused(kernel_device):
    args = _grouped_mm_args()
    device = kernel_device
    with pytest.raises(TypeError, match=r"backend='triton' takes float32/float16/bfloat16 a, got torch.float64"):
        grouped_mm(
            args["a"].double().to(device), args["b"].double().to(device), args["offsets"].to(device), backend="triton"
        )


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
        (dict(weights=torch.ones(4, 2, dtype=torch.int32)), TypeError, "weights must be float32"),
        (dict(activation="relu"), ValueError, "activation must be one of"),
        (
            dict(down_bias=torch.ones(3, 4)),
            ValueError,
            r"down_bias must be None or a torch.float32 tensor of shape \(3, 8\)",
        ),
    ],
)
def test_fused_experts_bad_arguments(change, error, match):
    p = fused_problem(4, 8, 4, 3, 2)
    kwargs = {**p, **{key: v for key, v in change.items() if key != "activation"}}
    with pytest.raises(error, match=match):
        mk.fused_experts(**kwargs, activation=change.get("activation", "silu"))


@pytest.mark.parametrize("fn", [reference.gated_activation, reference.fused_experts])
def test_bad_activation(fn):
    p = reference_problem(3, 2, 1, 4, 2)
    with pytest.raises(ValueError, match=r"activation must be one of .*'silu'.*got 'relu'"):
        if fn is reference.gated_activation:
            fn(p["hidden"], "relu")
        else:
            call(fn, p, "relu")


# ------------------------------------------------------------------------------------------------
# Property: any bad argument to any experts op raises ValueError / TypeError naming the op and the
# argument; ids and offsets out of range are refused before anything is indexed.


@st.composite
def one_bad_value(draw, values: torch.Tensor, bad: list[int]) -> torch.Tensor:
    """``values`` (int) with one entry, at a drawn position, set to a drawn value of ``bad``."""
    value = draw(st.sampled_from(bad))
    values = values.to(torch.int64 if not -(2**31) <= value < 2**31 else values.dtype, copy=True)
    values.view(-1)[draw(st.integers(0, values.numel() - 1))] = value
    return values


@st.composite
def bad_grouped_mm_call(draw):
    rows, width, cols, groups = draw(st.sampled_from([1, 6])), 4, 3, draw(st.sampled_from([1, 3]))
    args = dict(
        a=torch.randn(rows, width),
        b=torch.randn(groups, width, cols),
        offsets=torch.full((groups,), rows, dtype=torch.int32),
        backend="torch",
    )
    kind = draw(st.sampled_from(["a", "b", "offsets", "backend"]))
    choices = {
        "a": [torch.ones(rows, width, dtype=torch.int32), torch.ones(rows, width, 1), [[1.0]], None],
        "b": [
            torch.ones(groups, width + 1, cols),
            torch.ones(width, cols),
            torch.ones(groups, width, cols, dtype=torch.float16),
            torch.ones(groups, width, cols, device="meta"),
        ],
        "offsets": [
            args["offsets"].long(),
            args["offsets"].to(torch.int16),
            torch.full((groups + 1,), rows, dtype=torch.int32),
            args["offsets"][None],
            draw(one_bad_value(args["offsets"], [-1, rows + 1, 2**31 - 1, -(2**31)])),
        ]
        + ([torch.tensor([rows, 0, rows], dtype=torch.int32)] if groups == 3 and rows > 0 else []),
        "backend": ["cuda", None],
    }
    args[kind] = draw(st.sampled_from(choices[kind]))
    return "grouped_mm", lambda: grouped_mm(args["a"], args["b"], args["offsets"], backend=args["backend"]), kind


@st.composite
def bad_fused_experts_call(draw):
    num_tokens, num_experts, k = draw(st.sampled_from([1, 4])), draw(st.sampled_from([1, 3])), 2
    p = fused_problem(num_tokens, 8, 4, num_experts, k, bias=True)
    p["ids"] = torch.randint(-1, num_experts, (num_tokens, k), generator=torch.Generator().manual_seed(0))
    kind = draw(
        st.sampled_from(
            ["hidden", "gate_up_proj", "down_proj", "weights", "ids", "activation", "gate_up_bias", "down_bias"]
        )
    )
    choices = {
        "hidden": [torch.ones(num_tokens, 8, dtype=torch.int32), torch.ones(num_tokens, 8, 1), torch.ones(8)],
        "gate_up_proj": [torch.ones(num_experts, 7, 8), torch.ones(num_experts, 8, 9), torch.ones(num_experts, 8)],
        "down_proj": [torch.ones(num_experts, 8, 5), torch.ones(num_experts + 1, 8, 4), p["down_proj"].double()],
        "weights": [
            torch.ones(num_tokens, k + 1),
            torch.ones(num_tokens, k, dtype=torch.int32),
            p["weights"].double(),
        ],
        "ids": [
            p["ids"].float(),
            p["ids"][:, :1],
            p["ids"].reshape(-1),
            draw(one_bad_value(p["ids"], [-2, num_experts, -(2**31), 2**31 - 1, 2**40])),
        ],
        "activation": ["relu", "SILU", None],
        "gate_up_bias": [torch.ones(num_experts, 7), torch.ones(num_experts, 8, dtype=torch.float64), [0.0]],
        "down_bias": [torch.ones(num_experts, 4), torch.ones(num_experts + 1, 8), torch.ones(num_experts, 8).half()],
    }
    p[kind] = draw(st.sampled_from(choices[kind]))
    return "fused_experts", lambda: mk.fused_experts(**{**p, "activation": p.get("activation", "silu")}), kind


@st.composite
def bad_alignment_call(draw):
    op = draw(st.sampled_from(["moe_align", "expert_counts"]))
    num_tokens, num_experts = draw(st.sampled_from([1, 5])), draw(st.sampled_from([1, 4]))
    ids = torch.randint(-1, num_experts, (num_tokens, 2), generator=torch.Generator().manual_seed(1))
    kind = draw(st.sampled_from(["ids", "num_experts"]))
    if kind == "ids":
        bad = [ids.float(), ids.reshape(-1), ids[None], draw(one_bad_value(ids, [-2, num_experts, 2**40])), [[0]]]
        ids = draw(st.sampled_from(bad))
    else:
        num_experts = draw(st.sampled_from([0, -1, 1.5, True, None, "4"]))
    function = mk.moe_align if op == "moe_align" else mk.expert_counts
    return op, lambda: function(ids, num_experts), kind


@settings(max_examples=examples(200))
@given(call=st.one_of(bad_grouped_mm_call(), bad_fused_experts_call(), bad_alignment_call()))
def test_property_bad_input_names_the_argument(call):
    op, run, argument = call
    assert_refused(run, op, argument)
