"""The ``moe-kernels`` command line on this machine's device."""

from __future__ import annotations

import pytest

from moe_kernels import cli


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "ops' backend" in out


def test_validate_passes_and_prints_every_model(capsys):
    assert cli.main(["validate", "--tokens", "5", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    for model in ("Mixtral-8x7B", "DeepSeek-V3", "Qwen3-Next-80B-A3B"):
        assert model in out
    assert "64 passed, 0 failed" in out  # the 8 op families, 8 models each


def test_validate_reports_failure(capsys, monkeypatch):
    # A wrong op must turn validate red: swap the weights' order the op returns.
    real = cli.moe_kernels.softmax_topk

    def broken(*args, **kwargs):
        weights, ids = real(*args, **kwargs)
        return weights.flip(-1), ids

    monkeypatch.setattr(cli.moe_kernels, "softmax_topk", broken)
    assert cli.main(["validate", "--tokens", "5", "--dtype", "float32"]) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.aot
def test_info_kernels_prints_resource_table(capsys):
    # Compiles every registered kernel configuration (cached by Triton after test_aot_compile).
    assert cli.main(["info", "--kernels"]) == 0
    out = capsys.readouterr().out
    assert "softmax_topk_fwd" in out and "softmax_topk_bwd" in out
    assert "regs" in out and "stack" in out
