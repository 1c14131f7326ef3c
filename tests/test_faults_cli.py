"""The command line under bad input: one usage line and exit status 2, never a traceback; the
version; each benchmark's own help; ``info`` naming the optional packages; ``validate`` covering
every op (one row family per op) with progress on stderr."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from moe_kernels import cli, validation


@pytest.mark.parametrize(
    "argv,message",
    [
        (["validate", "--device", "foo"], "argument --device: invalid choice: 'foo'"),
        (["validate", "--tokens", "-3"], "argument --tokens: expected an int >= 1, got -3"),
        (["validate", "--tokens", "0"], "argument --tokens: expected an int >= 1, got 0"),
        (["validate", "--tokens", "x"], "argument --tokens: expected an int >= 1, got 'x'"),
        (["demo", "--stages", "bogus"], "argument --stages: invalid choice: 'bogus'"),
        (["demo", "--out", "/proc/moe_kernels_x"], "argument --out: cannot write in '/proc/moe_kernels_x'"),
        (["info", "--bogus"], "unrecognized arguments: --bogus"),
        (["bench", "--op", "nope"], "argument --op: invalid choice: 'nope'"),
    ],
)
def test_bad_values_are_one_usage_line_and_status_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no CUDA")
def test_cuda_is_refused_where_there_is_none(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["validate", "--device", "cuda"])
    assert exited.value.code == 2 and "no CUDA device is available here" in capsys.readouterr().err


def test_version_and_info(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.startswith("moe-kernels 0.")
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for package in ("numba", "faiss", "safetensors", "transformers", "matplotlib"):
        assert f"\n{package} " in out
    assert "fast CPU path" in out


def test_a_benchmarks_help_is_its_own():
    result = subprocess.run(
        [sys.executable, "-m", "moe_kernels.cli", "bench", "--op", "knn_mix", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "--neighbors" in result.stdout and "bench_knn" in result.stdout


def test_validate_covers_every_op_with_progress(capsys):
    assert cli.main(["validate", "--device", "cpu", "--tokens", "3", "--dtype", "float32"]) == 0
    captured = capsys.readouterr()
    ops = {line.split()[0] for line in captured.out.splitlines() if line.endswith(" ok")}
    assert ops == {
        "softmax_topk",
        "knn_mix",
        "knn_route",
        "exact_k",
        "probmoe_route",
        "fused_experts",
        "grouped_mm",
        "moe_align",
    }
    assert "validate [" in captured.err
    assert validation.number_of_rows(torch.device("cpu"), ["float32"], [3]) == 8 * 8
