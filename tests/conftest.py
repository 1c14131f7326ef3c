"""Shared fixtures and markers.

Markers (declared in pyproject.toml):
- ``kernel``: runs the Triton kernels, on CUDA or, on a CPU machine, through the interpreter
  (``TRITON_INTERPRET=1`` set before Python starts). The CPU test command runs these in a second
  pytest pass with the interpreter on.
- ``gpu``: needs a CUDA device (bf16 kernels, CUDA graphs); skipped on CPU machines.
- ``aot``: ahead-of-time compiles kernels for sm_90/sm_80 (not under the interpreter).

Hypothesis profiles of the property tests (``HYPOTHESIS_PROFILE`` selects one):
- ``ci`` (the default): derandomised, so every run draws the same examples; no deadline (a
  shared CI host is slow at times); each test's budget is its ``examples(n)`` (strategies.py).
- ``dev``: ten times the examples, drawn afresh on every run.
Neither writes an example database into the tree (a failure prints its reproduction blob).
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from hypothesis import HealthCheck, settings
from strategies import CI_MAX_EXAMPLES, DEV_MAX_EXAMPLES

from moe_kernels._compat import interpreter_enabled, triton_importable

_PROFILE_COMMON = dict(
    deadline=None,
    database=None,
    print_blob=True,
    # The autouse seed fixture below runs once per test, not per example: harmless, since every
    # property test draws its own seeds.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _examples_independent_of_the_loaded_modules() -> None:
    """Hypothesis (6.13x on) mixes literal constants of every loaded local module into its draws,
    so which examples a derandomised test draws would depend on which modules the other selected
    tests imported first: a failure of the whole suite might not recur in a run of its file. Turn
    that off (private API, pinned version; left alone if it moved)."""
    try:
        from hypothesis.internal.conjecture import providers
    except ImportError:  # pragma: no cover
        return
    if hasattr(providers, "_get_local_constants") and hasattr(providers, "_local_constants"):
        providers._get_local_constants = lambda: providers._local_constants  # the empty initial set


_examples_independent_of_the_loaded_modules()
settings.register_profile("ci", derandomize=True, max_examples=CI_MAX_EXAMPLES, **_PROFILE_COMMON)
settings.register_profile("dev", max_examples=DEV_MAX_EXAMPLES, **_PROFILE_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@contextlib.contextmanager
def _intra_op_threads(count: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# Tiny tensors over many steps, or tiny models: intra-op threads only add fork/join overhead and
# OpenMP spin-waits (CPU softmax forks even for a few rows), and on a busy shared 2-core machine
# each can wait milliseconds (test_hf_integration.py ran 7x slower with them: 95 s vs 14 s).
@pytest.fixture
def one_thread():
    """One intra-op thread for the test that asks for it."""
    with _intra_op_threads(1):
        yield


@pytest.fixture(scope="module")
def one_thread_per_module():
    """One intra-op thread for a whole module: ``pytestmark = pytest.mark.usefixtures(...)``."""
    with _intra_op_threads(1):
        yield


def _kernel_device() -> str | None:
    if not triton_importable():
        return None
    if torch.cuda.is_available():
        return "cuda"
    if interpreter_enabled():
        return "cpu"
    return None


@pytest.fixture
def kernel_device() -> str:
    """Device on which ``backend="triton"`` runs: cuda, or cpu under the interpreter."""
    device = _kernel_device()
    if device is None:
        pytest.skip("needs CUDA, or TRITON_INTERPRET=1 on CPU (the test command's second pass)")
    return device


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
