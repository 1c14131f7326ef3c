"""The main job, exactly as the README's first command runs it (``./scripts/demo.sh``), in its
quick mode: it must exit 0 and write its report, so no change can break it unseen."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


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
    assert all(stage["status"] == "ok" for stage in results["stages"].values()), results["stages"]
    for stage in results["stages"].values():
        assert all(math.isfinite(number) for number in _numbers(stage["numbers"]))
        for plot in stage["plots"]:
            assert (out / plot).stat().st_size > 1000 and f"]({plot})" in report
    assert results["stages"]["validation"]["numbers"]["failed"] == 0
    assert any(stage["plots"] for stage in results["stages"].values())
