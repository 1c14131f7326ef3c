"""The README's example is ``examples/quickstart.py``, and prints what the README says it prints."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_readme_example_is_the_script_and_its_output():
    readme = (REPO / "README.md").read_text()
    script = (REPO / "examples" / "quickstart.py").read_text()
    example = next(block for block in _blocks(readme, "python") if "fused_experts" in block)
    code_lines = [line for line in script.splitlines() if line and not line.startswith('"""')]
    assert [line for line in example.splitlines() if line] == code_lines
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    printed = next(block for block in _blocks(readme, "text") if block.startswith("experts of token 0"))
    assert result.stdout == printed
