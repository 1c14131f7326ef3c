"""Smoke test of the benchmark harness on the CPU: the routing benchmark runs, and its results land
in a CSV with the columns, sizes and derived fields later analysis reads. Speed is not checked."""

from __future__ import annotations

import csv

import pytest
import torch

import moe_kernels
from benchmarks import bench_routing
from benchmarks.common import RESULTS_DIR_ENV, environment, write_results
from moe_kernels.shapes import ROUTING_SHAPES

MIXTRAL = next(s for s in ROUTING_SHAPES if s.model == "Mixtral-8x7B")
DEEPSEEK_V3 = next(s for s in ROUTING_SHAPES if s.model == "DeepSeek-V3")
# torch_compile is left out: a cold inductor build alone takes longer than this test may.
PROVIDERS = ("moe_kernels", "torch_eager", "torch_topk_chain")
# The columns later analysis reads: where and with what the run was made, the case, its timing,
# the bandwidth derived from it, and the comparisons with the baselines.
RUN_COLUMNS = {"device_name", "device_slug", "date_utc", "torch_threads"}
SOFTWARE_COLUMNS = {"torch", "triton", "python", "moe_kernels", "git_commit"}
CASE_COLUMNS = {"op", "model", "E", "k", "T", "dtype", "provider"}
TIMING_COLUMNS = {"median_us", "p20_us", "p80_us", "timer"}
BANDWIDTH_COLUMNS = {"bytes", "gb_per_s", "pct_bw", "measured_bw_gbs"}
COMPARISON_COLUMNS = {"ids_match", "speedup_vs_eager", "speedup_vs_compile"}
EXPECTED_COLUMNS = (
    RUN_COLUMNS | SOFTWARE_COLUMNS | CASE_COLUMNS | TIMING_COLUMNS | BANDWIDTH_COLUMNS | COMPARISON_COLUMNS
)


@pytest.fixture(scope="module")
def rows():
    return bench_routing.run(quick=True, device="cpu", shapes=[MIXTRAL], tokens=(1, 33), providers=PROVIDERS)


def test_run_measures_every_provider_and_token_count(rows):
    assert {(row["provider"], row["T"]) for row in rows} == {(p, t) for p in PROVIDERS for t in (1, 33)}
    assert all(row["dtype"] == "float32" and row["timer"] == "wall" for row in rows)
    assert all(row["ids_match"] is True for row in rows)


def test_results_csv(rows, tmp_path, monkeypatch):
    monkeypatch.setenv(RESULTS_DIR_ENV, str(tmp_path))
    env = environment("cpu")
    csv_path, png_path = write_results(bench_routing.OP_NAME, rows, env)
    assert csv_path == tmp_path / env["device_slug"] / "softmax_topk.csv"
    assert png_path is None or png_path.is_file()
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        records = list(reader)
    assert EXPECTED_COLUMNS <= set(reader.fieldnames)
    assert len(records) == len(rows)
    for record in records:
        assert 0 < float(record["p20_us"]) <= float(record["median_us"]) <= float(record["p80_us"])
        assert float(record["gb_per_s"]) > 0 and float(record["pct_bw"]) > 0
        # Mixtral float32: T * 8 experts * 4 B of logits + T * k=2 * (4 B weight + 4 B id).
        assert int(record["bytes"]) == int(record["T"]) * (8 * 4 + 2 * 8)
        ours = record["provider"] == "moe_kernels"
        assert (record["speedup_vs_eager"] != "") == ours
        assert record["speedup_vs_compile"] == ""  # torch_compile was not run
    # A second run appends below the same header.
    write_results(bench_routing.OP_NAME, rows, env)
    with csv_path.open(newline="") as f:
        assert len(list(csv.DictReader(f))) == 2 * len(rows)


def test_routing_bytes_counts_bias():
    # DeepSeek-V3 bf16: logits 256 * 2 B per token, k=8 weights + ids, and the float32 bias once.
    assert bench_routing.routing_bytes(DEEPSEEK_V3, torch.bfloat16, 10) == 10 * (256 * 2 + 8 * 8) + 256 * 4


def test_main_no_write(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv(RESULTS_DIR_ENV, str(tmp_path))
    argv = [
        "--quick",
        "--device",
        "cpu",
        "--models",
        "mixtral",
        "--tokens",
        "4",
        "--providers",
        "moe_kernels",
        "torch_eager",
        "--no-write",
    ]
    assert bench_routing.main(argv) == 0
    out = capsys.readouterr().out
    assert "speedup_vs_eager" in out and "Mixtral-8x7B" in out
    assert not any(tmp_path.iterdir())


def test_knn_benchmark_rows():
    from benchmarks import bench_knn

    rows = bench_knn.run(quick=True, device="cpu", tokens=(1, 9))
    assert {(row["E"], row["T"], row["provider"]) for row in rows} == {
        (e, t, p) for e in (64, 256) for t in (1, 9) for p in ("moe_kernels", "torch_eager")
    }
    for row in rows:
        # router + 8 neighbours float32 read, float32 sims read, float32 mixed + conf written
        assert row["bytes"] == row["T"] * (row["E"] * 9 * 4 + 8 * 4 + (row["E"] + 1) * 4)
        assert row["median_us"] > 0 and (row["speedup_vs_eager"] is not None) == (row["provider"] == "moe_kernels")


def test_cli_bench_selects_op(capsys):
    from moe_kernels import cli

    assert cli.main(["bench", "--op", "knn_mix", "--quick", "--device", "cpu", "--tokens", "3", "--no-write"]) == 0
    out = capsys.readouterr().out
    assert "knn_mix on" in out and "softmax_topk on" not in out


def test_probmoe_benchmark_rows():
    from benchmarks import bench_probmoe

    rows = bench_probmoe.run(quick=True, device="cpu", tokens=(1, 5))
    assert {(row["E"], row["k"], row["T"], row["direction"], row["provider"]) for row in rows} == {
        (e, k, t, d, p)
        for e, k in ((8, 2), (64, 8))
        for t in (1, 5)
        for d in ("fwd", "fwd+bwd")
        for p in ("moe_kernels", "torch_eager", "softmax_topk")
    }
    for row in rows:
        # float32 logits: forward reads them and writes marginals, log Z and k ids; the backward
        # also reads logits and the marginals' gradient and writes the logits' gradient.
        forward = row["T"] * (row["E"] * 8 + 4 + row["k"] * 4)
        assert row["bytes"] == forward + (row["T"] * row["E"] * 12 if row["direction"] == "fwd+bwd" else 0)
        is_ours = row["provider"] == "moe_kernels"
        assert row["median_us"] > 0 and (row["x_softmax_topk"] is not None) == is_ours


def test_experts_benchmark_rows():
    from benchmarks import bench_experts

    rows = bench_experts.run(quick=True, device="cpu", tokens=(3,))
    shape = bench_experts.QUICK_CPU_SHAPE
    assert {(row["direction"], row["provider"]) for row in rows} == {
        (d, p) for d in ("fwd", "fwd+bwd") for p in ("moe_kernels", "torch_eager", "hf_eager")
    }
    for row in rows:
        # 6*H*I FLOPs per routed slot forward, three times that with the backward.
        forward = 6 * shape.hidden * shape.intermediate * 3 * shape.k
        assert row["flops"] == forward * (3 if row["direction"] == "fwd+bwd" else 1)
        assert row["median_us"] > 0 and row["tflops"] > 0
        assert (row["speedup_vs_hf"] is not None) == (row["provider"] == "moe_kernels")


def test_hf_loop_baseline_matches_reference():
    from benchmarks import bench_experts
    from moe_kernels import reference

    shape = bench_experts.QUICK_CPU_SHAPE
    generator = torch.Generator().manual_seed(0)
    weights, ids = bench_experts.route(shape, 9, "skewed", "cpu", generator)
    ids[2, 1] = -1
    hidden = torch.randn(9, shape.hidden, generator=generator)
    gate_up = torch.randn(shape.num_experts, 2 * shape.intermediate, shape.hidden, generator=generator) * 0.1
    down = torch.randn(shape.num_experts, shape.hidden, shape.intermediate, generator=generator) * 0.1
    got = bench_experts.hf_eager_experts(hidden, gate_up, down, weights, ids)
    torch.testing.assert_close(got, reference.fused_experts(hidden, gate_up, down, weights, ids))


def test_retrieval_benchmark_rows():
    from benchmarks import bench_retrieval
    from moe_kernels.knn import faiss_available

    rows = bench_retrieval.run(quick=True, entries=(500,), dims=(32,), num_queries=40, device="cpu")
    indexes = list(bench_retrieval.PRESETS) if faiss_available() else ["torch"]
    assert [row["index"] for row in rows] == list(indexes)
    exact = {row["index"]: row["recall"] for row in rows}
    assert exact["torch"] == 1.0 and exact.get("flat", 1.0) == 1.0  # exact searches agree
    assert all(0.0 <= row["recall"] <= 1.0 and row["queries_per_s"] > 0 for row in rows)


def test_recall_counts_found_neighbours():
    from benchmarks.bench_retrieval import recall_at

    exact = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    found = torch.tensor([[4, 3, 9, 9], [5, 6, 7, 8]])
    assert recall_at(found, exact) == pytest.approx((2 / 4 + 1) / 2)


def test_knn_route_benchmark_rows():
    from benchmarks import bench_knn_route

    rows = bench_knn_route.run(quick=True, device="cpu", tokens=(3,), entries=(50,))
    assert {row["provider"] for row in rows} == {"moe_kernels", "softmax_topk", "torch_eager"}
    for row in rows:
        assert row["bytes"] == bench_knn_route.route_bytes(3, row["E"], 8, row["k"], torch.float32)
        assert (row["extra_us_vs_softmax_topk"] is not None) == (row["provider"] == "moe_kernels")


def test_hf_block_benchmark_rows():
    pytest.importorskip("transformers")  # the [hf] extra, installed by the CI setup
    from benchmarks import bench_hf

    rows = bench_hf.run(quick=True, device="cpu", tokens=(3,), families=("qwen3_moe", "gpt_oss"), directions=("fwd",))
    assert [(row["family"], row["provider"]) for row in rows] == [
        ("qwen3_moe", "hf_eager"),
        ("qwen3_moe", "moe_kernels"),
        ("gpt_oss", "hf_eager"),
        ("gpt_oss", "moe_kernels"),
    ]
    assert all(row["median_us"] > 0 for row in rows)
    assert [row["speedup_vs_hf"] is not None for row in rows] == [False, True, False, True]


def test_hf_generate_benchmark_rows():
    pytest.importorskip("transformers")
    from benchmarks import bench_hf_generate

    rows = bench_hf_generate.run(quick=True, device="cpu", families=("mixtral",), batches=(2,), new_tokens=3)
    assert [row["provider"] for row in rows] == ["hf_eager", "moe_kernels"]
    assert all(row["tokens_per_s"] > 0 for row in rows)
    assert rows[1]["same_tokens"] == 1.0  # float32: the patched model generates HF's tokens


def test_replay_benchmark_rows():
    from benchmarks import bench_replay

    rows = bench_replay.run(quick=True, device="cpu")
    providers = {(row["group"], row["provider"]) for row in rows}
    assert providers == {
        ("replay", "plain"),
        ("replay", "record"),
        ("replay", "record_open"),
        ("replay", "replay"),
        ("batch_invariant", "default"),
        ("batch_invariant", "invariant"),
    }
    assert {row["op"] for row in rows if row["group"] == "batch_invariant"} == {
        "softmax_topk",
        "knn_mix",
        "knn_route",
        "probmoe_route",
        "fused_experts",
    }
    assert all(row["median_us"] > 0 and row["ratio"] > 0 for row in rows)
    assert not moe_kernels.is_batch_invariant()  # the mode was left as it was


def test_overhead_benchmark_rows_and_stub():
    from benchmarks import bench_overhead
    from moe_kernels.ops import routing

    rows = bench_overhead.run(device="cpu", ops=("softmax_topk",))
    assert [row["provider"] for row in rows] == list(bench_overhead.PROVIDERS)
    assert all(row["median_us"] > 0 for row in rows) and rows[0]["overhead_us"] == rows[0]["boundary_us"] == 0
    # The stub replaces the op's forward behind the public function and the registered op (so
    # the boundary rows time no work), and is undone afterwards.
    import moe_kernels

    real = routing.SOFTMAX_TOPK.forward
    logits = torch.randn(1, 64)
    stub_outputs = (torch.full((1, 8), 7.0), torch.full((1, 8), 3, dtype=torch.int32))
    with bench_overhead.stubbed_forward(routing.SOFTMAX_TOPK, stub_outputs) as stub:
        assert routing.SOFTMAX_TOPK.forward is stub
        weights, ids = moe_kernels.softmax_topk(logits, 8)
        assert torch.equal(weights, stub_outputs[0]) and torch.equal(ids, stub_outputs[1])
        with torch.no_grad():
            weights, _ = torch.ops.moe_kernels.softmax_topk(logits, 8, None, "softmax", False, 0, 0, "max", 1.0, False)
        assert torch.equal(weights, stub_outputs[0])
    assert routing.SOFTMAX_TOPK.forward is real
    assert not torch.equal(moe_kernels.softmax_topk(logits, 8)[0], stub_outputs[0])


@pytest.mark.kernel
def test_liger_baseline_computes_the_same_experts(kernel_device, monkeypatch):
    """The liger-kernel baseline is wired with the right layout and routing: it equals the
    float64 reference (through the Triton interpreter on a CPU)."""
    pytest.importorskip("liger_kernel")  # installed by the CI set-up; optional for users
    monkeypatch.setenv("LIGER_FUSED_MOE_AUTOTUNE", "0")  # one config: no autotuning under the interpreter
    from benchmarks import bench_experts
    from moe_kernels import reference, testing

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 32, generator=generator)
    gate_up = torch.randn(4, 32, 32, generator=generator) / 6
    down = torch.randn(4, 32, 16, generator=generator) / 4
    weights, ids = bench_experts.route(bench_experts.ExpertShape("tiny", 4, 2, 32, 16), 7, "uniform", "cpu", generator)
    args = [t.to(kernel_device) for t in (hidden, gate_up, down, weights, ids)]
    got = bench_experts.liger_experts(*args)
    want = reference.fused_experts(hidden.double(), gate_up.double(), down.double(), weights.double(), ids)
    testing.assert_close(got.cpu(), want, op="fused_experts")


def test_cpu_goal_benchmark_rows():
    # The CPU goal table (moe-kernels bench --op cpu): one section at one thread, every row a
    # finite ratio of a baseline measured in the same run, judged against its target.
    import math

    from benchmarks import bench_cpu

    rows = bench_cpu.run(quick=True, threads_list=[1], sections=["knn"])
    assert {(row["goal"], row["T"]) for row in rows} == {
        (goal, t) for goal in ("knn_mix", "knn_route") for t in bench_cpu.QUICK["knn_tokens"]
    }
    for row in rows:
        assert row["threads"] == 1 and row["target"] == ">= 1.0x"
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0
        assert row["met"] == (row["ratio"] >= 1.0)
        assert row["baseline_us"] > 0 and row["ours_us"] > 0


def test_cpu_goal_baselines_compute_the_ops_result():
    # A ratio means something only if the baseline computes what the op does: every provider of
    # every CPU goal point (T = 7, the quick shapes) against ours, ids exactly.
    from benchmarks import cpu_points
    from benchmarks.bench_cpu import QUICK

    shapes = [s for s in ROUTING_SHAPES if s.model in QUICK["routing_shapes"]]
    points = [
        *cpu_points.routing_points(shapes, (7,)),
        *cpu_points.knn_points((7,)),
        *cpu_points.probmoe_points(((16, 4),), (7,), (7,)),
        *cpu_points.expert_points(QUICK["expert_shapes"], (7,)),
    ]
    assert {p.goal for p in points} == {
        "softmax_topk", "knn_mix", "knn_route", "exact_k fwd", "exact_k fwd+bwd", "fused_experts fwd",
        "fused_experts fwd+bwd",
    }  # fmt: skip
    for point in points:
        ours = point.calls[cpu_points.OURS]()
        ours = ours if isinstance(ours, tuple) else (ours,)
        for name, call in point.calls.items():
            theirs = call()
            theirs = theirs if isinstance(theirs, tuple) else (theirs,)
            assert len(theirs) == len(ours), (point.case, name)
            for mine, other in zip(ours, theirs):
                message = f"{point.goal} {point.case}: {name}"
                if mine.dtype in (torch.int32, torch.int64):
                    assert torch.equal(mine.long(), other.long()), message
                else:
                    torch.testing.assert_close(mine, other, rtol=1e-4, atol=1e-5, msg=message)


def test_cpu_decode_benchmark_rows(tmp_path):
    from benchmarks import bench_cpu_decode as bench

    rows = bench.run(quick=True, threads_list=[1], plot_dir=str(tmp_path))
    layer = [row for row in rows if row["section"] == "layer"]
    assert {(row["case"], row["dtype"], row["T"]) for row in layer} == {
        (case, dtype, t) for case in bench.LAYERS for dtype in ("float32", "bfloat16") for t in bench.QUICK["tokens"]
    }
    for row in layer:
        # The loop computes the op's result: float32 to rounding, bfloat16 to a few of its ulps.
        assert row["agree"] < (1e-5 if row["dtype"] == "float32" else 3e-2), row
        assert 0 < row["floor_us"] and 0 < row["pct_floor"] and row["read_gbs"] > 0 and row["copy_gbs"] > 0
        assert row["ratio"] > 0 and ("floor" in row["target"]) == (row["T"] in bench.DECODE_TOKENS)
    model = [row for row in rows if row["section"] == "model"]
    assert {(row["dtype"], row["baseline"]) for row in model} == {
        (dtype, base) for dtype in ("float32", "bfloat16") for base in ("hf_grouped_mm", "hf_eager")
    }
    assert (tmp_path / "cpu_decode_floor.png").stat().st_size > 0
