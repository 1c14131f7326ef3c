"""The demo's outputs: ``results.json`` (every number, the environment, each stage's wall time and
status) and ``report.md`` (the same as tables, plots inline).

A stage returns a :class:`StageResult`: ``numbers`` are deterministic for a given seed (a second
run must reproduce them), ``timings`` are not (wall clock, benchmark medians), ``tables`` are
markdown tables for the report, ``plots`` PNG paths relative to the output folder, ``claims`` the
rows of the claims table.
"""

from __future__ import annotations

import datetime
import json
import math
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import torch

import moe_kernels
from moe_kernels._compat import triton_version


@dataclass
class StageResult:
    """What one stage measured (see the module doc)."""

    name: str
    title: str
    status: str = "ok"  # "ok" | "failed"
    seconds: float = 0.0
    numbers: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    tables: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    claims: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """``rows`` as a markdown table of ``columns`` (floats to 4 significant digits)."""

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "-" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(column)) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


def environment(device: torch.device, seed: int, quick: bool) -> dict:
    """Device, versions, commit, seed and mode of a run."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} thread(s)"
    return {
        "device": name,
        **software_versions(),
        "commit": _git_commit(),
        "date_utc": utc_now(),
        "seed": seed,
        "mode": "quick" if quick else "full",
    }


def software_versions() -> dict:
    """``torch``, ``triton`` ("none" when not installed), ``python`` and ``moe_kernels`` versions:
    what a run's numbers depend on beside the device (the demo's and the benchmarks' records)."""
    return {
        "torch": torch.__version__,
        "triton": triton_version() or "none",
        "python": platform.python_version(),
        "moe_kernels": moe_kernels.__version__,
    }


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        result = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=30, check=True
        )
        return result.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _json_safe(value):
    """Non-finite floats become strings ("nan", "inf"): JSON has no literal for them, and a reader
    should see them rather than a silently dropped value."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_outputs(out: Path, env: dict, stages: list[StageResult]) -> tuple[Path, Path]:
    """Write ``results.json`` and ``report.md`` into ``out``; returns their paths."""
    claims = [claim for stage in stages for claim in stage.claims]
    results = {
        "environment": env,
        "stages": {
            stage.name: {
                "title": stage.title,
                "status": stage.status,
                "seconds": stage.seconds,
                "numbers": stage.numbers,
                "timings": stage.timings,
                "plots": stage.plots,
                "notes": stage.notes,
                "error": stage.error,
            }
            for stage in stages
        },
        "claims": claims,
    }
    json_path = out / "results.json"
    json_path.write_text(json.dumps(_json_safe(results), indent=1, sort_keys=True) + "\n")
    md_path = out / "report.md"
    md_path.write_text(_report(env, stages, claims))
    return json_path, md_path


def _number(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def claims_table(claims: list[dict]) -> str:
    """The claims as a markdown table: paper, claim, criterion, estimate [one-sided 95% bounds],
    seeds, verdict."""
    rows = []
    for c in claims:
        interval = c.get("interval")
        bounds = "" if interval is None else f" [{_number(interval[0])}, {_number(interval[1])}]"
        verdict = c["verdict"] if c["verdict"] == "supported" else f"**{c['verdict']}**"
        rows.append(
            {
                "paper": c["paper"],
                "claim": c["claim"],
                "criterion": c["criterion"],
                "estimate [95% bounds]": _number(c.get("estimate")) + bounds,
                "seeds": len(c["seeds"]),
                "verdict": f"{verdict}: {c['reason']}",
            }
        )
    return markdown_table(rows, ["paper", "claim", "criterion", "estimate [95% bounds]", "seeds", "verdict"])


def _flat(row: dict) -> dict:
    """A per-seed row with nested dicts flattened (``a.b``) and lists shortened to text."""
    flat = {}
    for key, value in row.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in _flat(value).items()})
        elif isinstance(value, list):
            flat[key] = "[" + ", ".join(_number(v) if isinstance(v, float) else str(v) for v in value) + "]"
        else:
            flat[key] = value
    return flat


def claim_details(claims: list[dict]) -> list[str]:
    """Per claim: its verdict and reason, then its per-seed table."""
    lines = []
    for c in claims:
        rows = [_flat(row) for row in c["seeds"]]
        lines += ["", f"**{c['paper']}: {c['claim']}.** {c['verdict']} ({c['reason']}). Criterion: {c['criterion']}."]
        if rows:
            lines += ["", markdown_table(rows, list(dict.fromkeys(k for row in rows for k in row)))]
    return lines


def scale_note(stages: list[StageResult]) -> str:
    """What scale the claims were tested at (the model's size from the language-model stage)."""
    sizes = [s.numbers.get("parameters") for s in stages if s.name == "language_model" and s.status == "ok"]
    size = f"{sizes[0] / 1e6:.2f} M-parameter" if sizes else "small"
    return (
        f"Scale: every claim is tested on a {size} character-level MoE language model trained here on Python's "
        "standard-library source with rare English prose; the metric is next-character LM loss in nats on held-out "
        "text, not task accuracy. A verdict says what held at this scale under this protocol."
    )


def _report(env: dict, stages: list[StageResult], claims: list[dict]) -> str:
    lines = [
        "# moe_kernels demo report",
        "",
        f"{env['device']}; torch {env['torch']}, triton {env['triton']}, moe_kernels {env['moe_kernels']} "
        f"({env['commit']}); seed {env['seed']}, {env['mode']} mode; {env['date_utc']}.",
        "",
        markdown_table(
            [{"stage": s.title, "status": s.status, "seconds": round(s.seconds, 1)} for s in stages],
            ["stage", "status", "seconds"],
        ),
    ]
    if claims:
        lines += [
            "",
            "## Claims",
            "",
            scale_note(stages),
            "",
            claims_table(claims),
            "",
            "### Every seed's numbers",
            *claim_details(claims),
        ]
    for stage in stages:
        lines += ["", f"## {stage.title}", ""]
        if stage.status != "ok":
            lines += [f"**Failed**: `{stage.error}`", ""]
        lines += [f"- {note}" for note in stage.notes]
        for table in stage.tables:
            lines += ["", table]
        for plot in stage.plots:
            lines += ["", f"![{Path(plot).stem}]({plot})"]
    return "\n".join(lines) + "\n"
