"""The grouped GEMM's launch configuration (host code, no kernel runs): the tile heuristic, a
pinned configuration, and the tuned-config store with its fallback to the heuristic past the
tuned range."""

from __future__ import annotations

import json

import pytest
import torch
from experts_cases import SMALL

from moe_kernels.ops import tuned_configs as tuned


def test_meta_heuristic_and_pinned_config():
    for m, n, k, dtype in [
        (1, 1, 1, torch.float32),
        (64, 2048, 7168, torch.bfloat16),
        (100000, 4096, 1536, torch.float16),
    ]:
        for weight_grad in (False, True):
            meta = tuned.grouped_mm_meta(m, n, k, dtype, weight_grad=weight_grad)
            blocks = [value for key, value in meta.items() if key.startswith("BLOCK_") and key != "BLOCK_G"]
            assert all(v >= 16 and v & (v - 1) == 0 for v in blocks), meta
            assert meta["num_warps"] in (4, 8) and meta["INPUT_PRECISION"] == (
                "ieee" if dtype == torch.float32 else "tf32"
            )
    big = tuned.grouped_mm_meta(100000, 4096, 1536, torch.bfloat16)
    assert (big["BLOCK_M"], big["BLOCK_N"], big["BLOCK_K"], big["num_warps"]) == (128, 128, 64, 8)
    with tuned.pinned_config(**SMALL):
        assert {k: tuned.grouped_mm_meta(1000, 1000, 1000, torch.float16)[k] for k in SMALL} == SMALL
        grad_meta = tuned.grouped_mm_meta(1000, 1000, 1000, torch.float16, weight_grad=True)
        assert (grad_meta["BLOCK_M"], grad_meta["BLOCK_N"], grad_meta["BLOCK_K_OUT"]) == (16, 16, 16)
        with tuned.pinned_config(BLOCK_G=2):
            assert tuned.grouped_mm_meta(1, 1, 1, torch.float32)["BLOCK_G"] == 2
            assert tuned.grouped_mm_meta(1, 1, 1, torch.float32)["BLOCK_M"] == 16
    assert tuned._PINNED_CONFIG is None
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'BLOCK_X'"):
        with tuned.pinned_config(BLOCK_X=16):
            pass
    with pytest.raises(ValueError, match=r"BLOCK_M must be a power of two >= 16, got 24"):
        with tuned.pinned_config(BLOCK_M=24):
            pass


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
        heuristic = tuned.grouped_mm_meta(100, 1536, 2048, torch.bfloat16)
        for rows, want in ((100, small), (512, small), (4096, large), (32768, large)):
            meta = tuned.grouped_mm_meta(rows, 1536, 2048, torch.bfloat16, device_name=name)
            assert {k: meta[k] for k in want} == want
        # Past the tuned range the heuristic applies, not the largest tuned tile.
        assert tuned.grouped_mm_meta(10**6, 1536, 2048, torch.bfloat16, device_name=name) == tuned.grouped_mm_meta(
            10**6, 1536, 2048, torch.bfloat16
        )
        # Another GPU, another shape or no device: the heuristic.
        assert tuned.grouped_mm_meta(100, 1536, 2048, torch.bfloat16, device_name="NVIDIA A100") == heuristic
        assert tuned.grouped_mm_meta(100, 1024, 2048, torch.bfloat16, device_name=name) == tuned.grouped_mm_meta(
            100, 1024, 2048, torch.bfloat16
        )
        # The gated kernel of the same (N, K) has its own entries.
        assert tuned.grouped_mm_meta(
            100, 1536, 2048, torch.bfloat16, gated=True, device_name=name
        ) == tuned.grouped_mm_meta(100, 1536, 2048, torch.bfloat16, gated=True)
        # A second tuning run merges its tables into the file.
        other = tuned.tuned_key("weight_grad", torch.bfloat16, 768, 2048)
        tuned.write_tuned_table(name, {other: [[512, dict(BLOCK_M=32)]]}, "3.9.0")
        tables = json.loads(path.read_text())["tables"]
        assert tables[key]["triton"] == "3.6.0" and tables[other]["triton"] == "3.9.0"
        with pytest.raises(ValueError, match="kernel must be one of"):
            tuned.tuned_key(False, torch.bfloat16, 1, 1)
        with tuned.pinned_config(BLOCK_M=16):  # a pinned config still wins
            assert tuned.grouped_mm_meta(100, 1536, 2048, torch.bfloat16, device_name=name)["BLOCK_M"] == 16
    finally:
        tuned.tuned_table.cache_clear()
