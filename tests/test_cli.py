"""The ``moe-kernels`` command line on this machine's device."""

from __future__ import annotations

from moe_kernels import cli


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "softmax_topk backend" in out


def test_validate_passes_and_prints_every_model(capsys):
    assert cli.main(["validate", "--tokens", "5", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    for model in ("Mixtral-8x7B", "DeepSeek-V3", "Qwen3-Next-80B-A3B"):
        assert model in out
    assert "8 passed, 0 failed" in out


def test_validate_reports_failure(capsys, monkeypatch):
    # A wrong op must turn validate red: swap the weights' order the op returns.
    real = cli.moe_kernels.softmax_topk

    def broken(*args, **kwargs):
        weights, ids = real(*args, **kwargs)
        return weights.flip(-1), ids

    monkeypatch.setattr(cli.moe_kernels, "softmax_topk", broken)
    assert cli.main(["validate", "--tokens", "5", "--dtype", "float32"]) == 1
    assert "FAIL" in capsys.readouterr().out
