"""Aligned text tables for the command line, the benchmarks and the AOT report."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def format_cell(value: Any) -> str:
    """A value's text: None as "-", floats to 3 significant digits (whole numbers from 100 up)."""
    if value is None:
        return "-"
    if isinstance(value, float) and math.isfinite(value) and value != 0:
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def format_table(rows: Sequence[dict], columns: Sequence[str], titles: Sequence[str] | None = None) -> str:
    """``rows`` as an aligned table of ``columns`` (headed by ``titles``, default the column
    names), numeric columns right-aligned, a rule under the header."""
    titles = list(titles or columns)
    cells = [[format_cell(row.get(column)) for column in columns] for row in rows]
    widths = [max([len(title)] + [len(line[i]) for line in cells]) for i, title in enumerate(titles)]
    numeric = [all(_is_number(row.get(c)) for row in rows if row.get(c) is not None) for c in columns]

    def line(values: Sequence[str]) -> str:
        padded = (v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric))
        return "  ".join(padded).rstrip()

    return "\n".join([line(titles), line(["-" * w for w in widths]), *(line(values) for values in cells)])
