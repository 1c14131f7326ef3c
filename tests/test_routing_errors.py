"""Routing family, bad input: every bad argument to ``softmax_topk`` gets a clear ``ValueError`` /
``TypeError`` naming the op and the argument."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from helpers import assert_refused
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import INF, NAN, examples, token_counts

import moe_kernels

LOGITS = torch.randn(4, 16)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(k=0), ValueError, r"k must be an int in \[1, 16\].*got 0"),
        (dict(k=17), ValueError, r"k must be an int in \[1, 16\].*got 17"),
        (dict(k=2.0), TypeError, r"k must be an int, got float 2.0"),
        (dict(k=True), TypeError, r"k must be an int, got bool True"),
        (
            dict(k=7, num_groups=4, topk_groups=1),
            ValueError,
            r"k must be an int in \[1, 4\] \(the 4 experts of the kept groups\), got 7",
        ),
        (dict(k=2, num_groups=5, topk_groups=1), ValueError, r"num_groups must be a positive int dividing E=16, got 5"),
        (dict(k=2, num_groups=0, topk_groups=1), ValueError, r"num_groups must be a positive int dividing E=16, got 0"),
        (
            dict(k=2, num_groups=4, topk_groups=0),
            ValueError,
            r"topk_groups must be an int in \[1, num_groups=4\], got 0",
        ),
        (
            dict(k=2, num_groups=4, topk_groups=5),
            ValueError,
            r"topk_groups must be an int in \[1, num_groups=4\], got 5",
        ),
        (dict(k=2, num_groups=4), ValueError, r"topk_groups must be an int .*got None"),
        (dict(k=2, topk_groups=2), ValueError, r"topk_groups=2 needs num_groups"),
        (
            dict(k=2, num_groups=16, topk_groups=2),
            ValueError,
            r"group_score='top2_sum' needs at least 2 experts per group",
        ),
        (dict(k=2, score_func="tanh"), ValueError, r"score_func must be one of \('softmax', 'sigmoid'\), got 'tanh'"),
        (dict(k=2, num_groups=4, topk_groups=2, group_score="mean"), ValueError, r"group_score must be one of"),
        (dict(k=2, scale=float("nan")), ValueError, r"scale must be a finite number, got nan"),
        (dict(k=2, scale=float("inf")), ValueError, r"scale must be a finite number"),
        (dict(k=2, renormalize=1), TypeError, r"renormalize must be a bool, got int"),
        (dict(k=2, bias=torch.zeros(15)), ValueError, r"bias must have shape \(E,\) = \(16,\), got \(15,\)"),
        (dict(k=2, bias=torch.zeros(1, 16)), ValueError, r"bias must have shape \(E,\)"),
        (dict(k=2, bias=torch.zeros(16, dtype=torch.float16)), TypeError, r"bias must be float32, got torch.float16"),
        (dict(k=2, bias=[0.0] * 16), TypeError, r"bias must be a torch.Tensor or None, got list"),
        (dict(k=2, backend="cuda"), ValueError, r"backend must be one of \('auto', 'triton', 'torch'\), got 'cuda'"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        moe_kernels.softmax_topk(LOGITS, **kwargs)


def test_validation_does_not_depend_on_earlier_calls():
    # Regression: the validation caches keyed on values, and 1 == 1.0 == True: after a valid call
    # a bad k or renormalize of an equal value skipped validation.
    moe_kernels.softmax_topk(LOGITS, 1, renormalize=True)
    moe_kernels.softmax_topk(LOGITS, 1)  # a call without options: remembered by routing_call
    moe_kernels.softmax_topk(LOGITS[:, :9], 9)
    with pytest.raises(ValueError, match=r"softmax_topk: k must be an int in \[1, 8\]"):
        moe_kernels.softmax_topk(LOGITS[:, :8], 9)
    with pytest.raises(ValueError, match=r"softmax_topk: backend must be one of"):
        moe_kernels.softmax_topk(LOGITS, 1, backend="cuda")
    with pytest.raises(TypeError, match=r"softmax_topk: logits must be float32"):
        moe_kernels.softmax_topk(LOGITS.int(), 1)
    for bad in (1.0, True):
        with pytest.raises(TypeError, match=r"softmax_topk: k must be an int"):
            moe_kernels.softmax_topk(LOGITS, bad)
    with pytest.raises(TypeError, match=r"softmax_topk: renormalize must be a bool, got int"):
        moe_kernels.softmax_topk(LOGITS, 1, renormalize=1)
    ids = torch.zeros(4, 1, dtype=torch.int64)
    moe_kernels.knn_route(LOGITS, ids, torch.ones(4, 1), LOGITS, 1)
    with pytest.raises(TypeError, match=r"knn_route: k must be an int"):
        moe_kernels.knn_route(LOGITS, ids, torch.ones(4, 1), LOGITS, 1.0)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.complex64])
def test_non_float_logits(dtype):
    with pytest.raises(TypeError, match=r"logits must be float32, float16 or bfloat16.*got torch\."):
        moe_kernels.softmax_topk(torch.ones(4, 8, dtype=dtype), 2)


def test_logits_shape_and_type():
    with pytest.raises(ValueError, match=r"logits must have shape \(\.\.\., E\) with E >= 1, got \(\)"):
        moe_kernels.softmax_topk(torch.tensor(1.0), 1)
    with pytest.raises(ValueError, match=r"got \(4, 0\)"):
        moe_kernels.softmax_topk(torch.ones(4, 0), 1)
    with pytest.raises(TypeError, match=r"logits must be a torch.Tensor, got list"):
        moe_kernels.softmax_topk([[1.0, 2.0]], 1)


@pytest.mark.kernel
def test_float64_rejected_by_triton_backend(kernel_device):
    with pytest.raises(TypeError, match=r"backend='triton' takes float32/float16/bfloat16 logits, got torch.float64"):
        moe_kernels.softmax_topk(torch.randn(3, 8, dtype=torch.float64, device=kernel_device), 2, backend="triton")


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    import os

    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    environment.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=120)


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error():
    result = _run_python(
        "import torch, moe_kernels\n"
        "try:\n"
        "    moe_kernels.softmax_topk(torch.randn(3, 8), 2, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print('ERROR', e)\n"
    )
    assert result.returncode == 0, result.stderr
    assert "ERROR softmax_topk: backend='triton' got CPU tensors" in result.stdout
    assert "TRITON_INTERPRET=1" in result.stdout


def test_import_and_cpu_path_without_triton():
    # sys.modules['triton'] = None makes `import triton` fail and find_spec('triton') return None,
    # as on a machine where it is not installed.
    result = _run_python(
        "import sys\n"
        "sys.modules['triton'] = None\n"
        "import torch, moe_kernels\n"
        "w, i = moe_kernels.softmax_topk(torch.randn(5, 8), 2, renormalize=True)\n"
        "assert i.shape == (5, 2)\n"
        "try:\n"
        "    moe_kernels.softmax_topk(torch.randn(5, 8), 2, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print('ERROR', e)\n"
    )
    assert result.returncode == 0, result.stderr
    assert "ERROR softmax_topk: backend='triton' needs the triton package" in result.stdout


# ------------------------------------------------------------------------------------------------
# Property: any bad argument raises ValueError / TypeError naming the op and the argument, never
# an IndexError or a RuntimeError from inside.

BAD_KS = [0, -1, -(2**40), 2**40, 2.0, True, None, "2"]


@st.composite
def bad_softmax_topk_call(draw):
    """``(kwargs, the argument the error must name)`` for a call on ``(T, E)`` logits."""
    num_tokens, num_experts = draw(token_counts), draw(st.sampled_from([1, 2, 8, 60, 257]))
    kwargs = dict(logits=torch.randn(num_tokens, num_experts), k=1)
    kind = draw(
        st.sampled_from(
            ["k", "bias", "logits", "num_groups", "topk_groups", "scale", "score_func", "group_score", "renormalize"]
            + ["routing"]
        )
    )
    if kind == "k":
        kwargs["k"] = draw(st.sampled_from([*BAD_KS, num_experts + 1]))
    elif kind == "bias":
        kwargs["bias"] = draw(
            st.sampled_from(
                [
                    torch.zeros(num_experts + 1),
                    torch.zeros(1, num_experts),
                    torch.zeros(()),
                    torch.zeros(num_experts, dtype=torch.float16),
                    torch.zeros(num_experts, dtype=torch.int64),
                    torch.zeros(num_experts, dtype=torch.float64),
                    torch.zeros(num_experts, device="meta"),
                    [0.0] * num_experts,
                ]
            )
        )
    elif kind == "logits":
        kwargs["logits"] = draw(
            st.sampled_from(
                [
                    torch.ones(num_tokens, num_experts, dtype=torch.int32),
                    torch.ones(num_tokens, num_experts, dtype=torch.bool),
                    torch.ones(num_tokens, num_experts, dtype=torch.complex64),
                    torch.ones(num_tokens, 0),
                    torch.tensor(1.0),
                    [[1.0] * num_experts],
                    None,
                ]
            )
        )
    elif kind == "num_groups":
        bad = [
            g
            for g in (0, -2, num_experts + 1, 2 * num_experts, 1.5)
            if not (isinstance(g, int) and g > 0 and num_experts % g == 0)
        ]
        kwargs.update(num_groups=draw(st.sampled_from(bad)), topk_groups=1)
    elif kind == "topk_groups":
        num_groups = draw(st.sampled_from([g for g in (1, 2, 4) if num_experts % g == 0]))
        kwargs.update(
            num_groups=num_groups, group_score="max", topk_groups=draw(st.sampled_from([0, -1, num_groups + 1, 1.0]))
        )
        if num_groups == 1 and kwargs["topk_groups"] == 1.0:
            kwargs["topk_groups"] = 2
    elif kind == "scale":
        kwargs["scale"] = draw(st.sampled_from([NAN, INF, -INF, "1", True, 1j]))
    elif kind == "score_func":
        kwargs["score_func"] = draw(st.sampled_from(["tanh", "", "SOFTMAX", 1]))
    elif kind == "group_score":
        kwargs["group_score"] = draw(st.sampled_from(["mean", "top3_sum", 2]))
    elif kind == "renormalize":
        kwargs["renormalize"] = draw(st.sampled_from([1, 0, "yes", 1.0]))
    else:
        kwargs["routing"] = draw(st.sampled_from([{"renormalize": True}, "default", 1]))
    return kwargs, kind


@settings(max_examples=examples(200))
@given(call=bad_softmax_topk_call())
def test_property_bad_input_names_the_argument(call):
    kwargs, argument = call
    assert_refused(lambda: moe_kernels.softmax_topk(**kwargs), "softmax_topk", argument)


@st.composite
def bad_routing_config(draw):
    """``(fields, the field the error must name)`` that RoutingConfig refuses."""
    field = draw(st.sampled_from(["score_func", "renormalize", "num_groups", "topk_groups", "group_score", "scale"]))
    bad = {
        "score_func": [dict(score_func=v) for v in ("tanh", None, 1)],
        "renormalize": [dict(renormalize=v) for v in (1, "yes", None)],
        "num_groups": [dict(num_groups=v, topk_groups=1) for v in (0, -4, 1.5, True, "8")],
        "topk_groups": [dict(topk_groups=2)] + [dict(num_groups=4, topk_groups=v) for v in (0, 5, 1.0, None)],
        "group_score": [dict(group_score=v) for v in ("mean", None)],
        "scale": [dict(scale=v) for v in (NAN, INF, -INF, "1", None)],
    }
    return draw(st.sampled_from(bad[field])), field


@settings(max_examples=examples(30))
@given(call=bad_routing_config())
def test_property_bad_routing_config_names_the_field(call):
    fields, field = call
    assert_refused(lambda: moe_kernels.RoutingConfig(**fields), "RoutingConfig", field)
