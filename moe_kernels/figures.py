"""The one place that makes and writes the package's figures (dynamics plots, CoR heat map, the
demo's loss curve): a bare matplotlib ``Figure`` (it renders with the Agg canvas, no pyplot state)
and a PNG. matplotlib is imported when a figure is made, never on package import."""

from __future__ import annotations

import os
from pathlib import Path

DPI = 110


def new_figure(width: float = 6.4, height: float = 4.4):
    """``(figure, axes)``: a ``width`` x ``height`` inch figure with one subplot."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.add_subplot()


def save_png(fig, path: str | os.PathLike) -> Path:
    """Lay ``fig`` out tightly and write it as the PNG ``path`` (its folder made if missing);
    returns ``path`` as a :class:`~pathlib.Path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=DPI)
    return path
