"""The main job, exactly as the README's first command runs it (``./scripts/demo.sh``), in its
quick mode: it must exit 0 and write its report, every number finite, and a second run with the
same seed must give the same numbers, so no change can break it unseen."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The stages whose numbers a second run must reproduce (the seeds' runs, the model, the methods,
# the dynamics).
RERUN_STAGES = ("experiments", "language_model", "distribution_shift", "load_dynamics")
CLAIM_KEYS = {"paper", "claim", "criterion", "verdict", "reason", "estimate", "interval", "seeds", "settings"}


def _numbers(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from _numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from _numbers(item)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


def test_readme_main_command_quick(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [str(REPO / "scripts" / "demo.sh"), "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = (out / "report.md").read_text()
    results = json.loads((out / "results.json").read_text())
    assert results["environment"]["mode"] == "quick"
    assert set(results["stages"]) >= {"validation", "microbenchmarks", *RERUN_STAGES}
    assert all(stage["status"] == "ok" for stage in results["stages"].values()), results["stages"]
    for stage in results["stages"].values():
        assert all(math.isfinite(number) for number in _numbers(stage["numbers"]))
        for plot in stage["plots"]:
            assert (out / plot).stat().st_size > 1000 and f"]({plot})" in report
    assert results["stages"]["validation"]["numbers"]["failed"] == 0
    claims = results["claims"]
    assert {claim["paper"].split(" (")[0] for claim in claims} == {
        "kNN-MoE",
        "ProbMoE",
        "Counterfactual Routing",
        "Minimal bifurcation model of load imbalance",
    }
    for claim in claims:
        assert set(claim) == CLAIM_KEYS and claim["claim"] and claim["criterion"] and claim["reason"]
        assert claim["verdict"] in ("supported", "not supported", "inconclusive", "not testable")
        # Two seeds in the quick run: no claim can be decided either way.
        assert claim["verdict"] in ("inconclusive", "not testable"), claim
        assert len(claim["seeds"]) == 2 and all(math.isfinite(n) for n in _numbers(claim["seeds"]))
        assert all(s["source"] in ("paper", "ours") and s["reason"] for s in claim["settings"].values())
    assert "## Claims" in report and "### Every seed's numbers" in report and "not task accuracy" in report

    again = tmp_path / "again"
    rerun = subprocess.run(
        [sys.executable, "-m", "moe_kernels.cli", "demo", "--quick", "--out", str(again), "--stages", *RERUN_STAGES],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert rerun.returncode == 0, rerun.stdout[-4000:] + rerun.stderr[-4000:]
    second = json.loads((again / "results.json").read_text())
    for name in RERUN_STAGES:
        assert second["stages"][name]["numbers"] == results["stages"][name]["numbers"], name
