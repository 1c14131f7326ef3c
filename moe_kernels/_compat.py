"""Optional-dependency guards, evaluated once at import so no op pays for them per call (and
``torch.compile`` traces plain constants).

Importing ``moe_kernels`` must work without a GPU and without Triton: nothing here imports
Triton; ``find_spec`` only looks for it.
"""

from __future__ import annotations

import importlib.util
import os

# Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be in the environment
# before Python starts; reading it once here matches what Triton will do.
_INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1`` was set when ``moe_kernels`` was imported."""
    return _INTERPRETER


def triton_importable() -> bool:
    """True when the ``triton`` package is installed (its import is deferred to the kernels)."""
    return _TRITON_IMPORTABLE


def triton_version() -> str | None:
    if not _TRITON_IMPORTABLE:
        return None
    import triton

    return triton.__version__
