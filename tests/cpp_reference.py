"""Build and load the independent C++ oracles (``csrc_ref/*.cpp``: routing, experts) for tests.

The extension is compiled on first use with ``torch.utils.cpp_extension.load`` into
``<repo>/build/csrc_ref`` (ninja reuses the objects across runs) and loaded once per process.
It is a test-only oracle and is not shipped in the wheel.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SOURCES = [REPO_ROOT / "csrc_ref" / name for name in ("routing_ref.cpp", "experts_ref.cpp", "bindings.cpp")]
BUILD_DIR = REPO_ROOT / "build" / "csrc_ref"


def _find_cxx() -> str | None:
    # torch.utils.cpp_extension compiles with $CXX, falling back to "c++".
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")


@functools.cache
def load_cpp_reference():
    """The compiled ``moe_kernels_csrc_ref`` module (``softmax_topk_ref``,
    ``softmax_topk_backward_ref``, ``grouped_mm_ref``, ``fused_experts_ref``), built once per process.

    Raises ``RuntimeError`` when no C++ compiler is available: the oracle tests must fail loudly
    rather than skip on a machine that is expected to build them.
    """
    if _find_cxx() is None:
        raise RuntimeError(
            "tests/cpp_reference.py: no C++ compiler found ($CXX, c++, g++ or clang++ on PATH); "
            "the C++ oracles in csrc_ref/ need one to build (install g++)"
        )
    from torch.utils.cpp_extension import load

    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    return load(
        name="moe_kernels_csrc_ref",
        sources=[str(path) for path in SOURCES],
        build_directory=str(BUILD_DIR),
        extra_cflags=["-O2"],
        verbose=False,
    )
