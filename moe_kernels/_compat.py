"""Optional-dependency guards, read once so no op pays for them per call.

Importing ``moe_kernels`` must work without a GPU and without Triton, so nothing here imports
Triton at module import time; :func:`triton_importable` tries once and caches the answer.
"""

from __future__ import annotations

import functools
import importlib.util
import os


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1`` was set (Triton reads it when a kernel is decorated, so it
    must be in the environment before Python starts; setting it later has no effect)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    """True when the ``triton`` package is installed (its import is deferred to the kernels)."""
    return importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=None)
def triton_version() -> str | None:
    if not triton_importable():
        return None
    import triton

    return triton.__version__
