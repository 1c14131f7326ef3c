"""A dependency-free progress bar for long work (training, memory building, calibration, the demo).

On a terminal it redraws one line (``\\r``); elsewhere (CI logs, files) it prints a line at every
tenth of the work, so logs stay short. It writes to stderr, so stdout stays the command's output.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """``with Progress(total, "training") as bar: ... bar.update(status={"loss": 1.23})``.

    ``update(n=1, status=None)`` advances by ``n`` steps and shows ``status`` (a dict; numbers
    formatted to 4 significant digits) after the count and the elapsed seconds. ``enabled=False``
    silences it.
    """

    def __init__(
        self, total: int, description: str, *, stream: TextIO | None = None, enabled: bool = True, width: int = 24
    ):
        self.total = max(int(total), 0)
        self.description = description
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.width = width
        self.done = 0
        self.start = time.perf_counter()
        self._interactive = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last_tenth = -1

    def __enter__(self) -> Progress:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled and self._interactive:
            self.stream.write("\n")
            self.stream.flush()

    def update(self, n: int = 1, status: dict | None = None) -> None:
        self.done = min(self.done + n, self.total) if self.total else self.done + n
        if not self.enabled:
            return
        tenth = 10 * self.done // self.total if self.total else 0
        if not self._interactive and tenth == self._last_tenth and self.done != self.total:
            return
        self._last_tenth = tenth
        self.stream.write(("\r" if self._interactive else "") + self.line(status) + ("" if self._interactive else "\n"))
        self.stream.flush()

    def line(self, status: dict | None = None) -> str:
        """The text of the bar: description, bar, count, elapsed seconds and ``status``."""
        fraction = self.done / self.total if self.total else 1.0
        filled = int(round(fraction * self.width))
        bar = "#" * filled + "." * (self.width - filled)
        extra = " ".join(
            f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
            for key, value in (status or {}).items()
        )
        elapsed = time.perf_counter() - self.start
        return f"{self.description} [{bar}] {self.done}/{self.total} {elapsed:.1f}s {extra}".rstrip()
