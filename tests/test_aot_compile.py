"""Ahead-of-time compile check: every registered kernel configuration builds for sm_90 and sm_80
(no GPU needed) without register spills, and every kernel of ``moe_kernels.kernels`` is registered.

Runs in its own non-interpreter pytest pass (``pytest -m aot``); ``pytest -s`` prints the
resource table. Compiled binaries are kept in Triton's cache, so a rerun takes seconds.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import time

import pytest

from moe_kernels._compat import interpreter_enabled

if interpreter_enabled():
    pytest.skip(
        "AOT compile check needs real Triton compilation; TRITON_INTERPRET=1 is set (this test "
        "runs in the separate non-interpreter pass)",
        allow_module_level=True,
    )

pytestmark = pytest.mark.aot

ARCHS = (90, 80)

# Stack bytes a kernel may use. The ProbMoE kernels' persistent loop keeps per-program values
# (scratch pointers, seed) live across the whole kernel; in some configurations ptxas parks one
# of them in an 8-byte stack slot (one STL before the tile loop, one LDL per tile, none in the
# per-expert loops), and which configurations do it changes with the arch and the dtype.
ALLOWED_STACK = {"exact_k_fwd": 8, "exact_k_bwd": 8}


def _defined_kernels() -> set[str]:
    """``module:name`` of every ``@triton.jit`` ``*_kernel`` in a ``moe_kernels.kernels._*`` module."""
    from triton.runtime.jit import JITFunction

    import moe_kernels.kernels as pkg
    from moe_kernels.aot.catalog import fn_path

    found = set()
    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, JITFunction) and name.endswith("_kernel"):
                found.add(fn_path(obj))
    return found


def test_aot_compile_all_kernels():
    from moe_kernels import aot
    from moe_kernels.aot import catalog as registry

    cases = aot.all_cases()

    # Every registered kernel has at least one configuration ...
    per_kernel = {name: len(aot.cases(name)) for name in registry.KERNELS}
    empty = sorted(name for name, n in per_kernel.items() if n == 0)
    assert not empty, f"registered kernels without any case: {empty}"

    # ... and every kernel the package defines is registered.
    registered = {registry.fn_path(case.fn) for case in cases}
    defined = _defined_kernels()
    assert defined, "found no @triton.jit *_kernel in moe_kernels.kernels._* modules"
    missing = sorted(defined - registered)
    assert not missing, (
        f"kernels without AOT cases (add a @register_kernel generator to moe_kernels/aot/cases/ covering "
        f"every configuration their launchers choose): {missing}"
    )

    start = time.perf_counter()
    rows = aot.compile_all(archs=ARCHS)
    elapsed = time.perf_counter() - start
    print()
    print(aot.format_table(rows))
    print(aot.summary(rows))
    print(f"{len(cases)} cases x {len(ARCHS)} archs = {len(rows)} compilations in {elapsed:.1f} s")

    assert len(rows) == len(cases) * len(ARCHS)
    spills = [r for r in rows if r["stack"] > ALLOWED_STACK.get(r["kernel"], 0) or r["local"] != 0]
    assert not spills, "kernels using stack / local memory (register spills):\n" + "\n".join(
        f"  {r['kernel']} [{r['config']}] num_warps={r['num_warps']} sm_{r['arch']}: "
        f"regs={r['regs']} stack={r['stack']} local={r['local']}"
        for r in spills
    )

    # The grouped GEMMs' main loops run on Hopper's warpgroup MMA for 16-bit inputs.
    no_wgmma = [
        r
        for r in rows
        if r["kernel"].startswith("grouped_mm")
        and r["arch"] == 90
        and r["config"].startswith("bf16")
        and not r["wgmma"]
    ]
    assert not no_wgmma, "bf16 grouped GEMMs without wgmma on sm_90: " + ", ".join(r["config"] for r in no_wgmma)


def test_aot_compile_failure_names_the_configuration():
    from moe_kernels import aot

    case = next(iter(aot.cases("softmax_topk_fwd")))
    broken = dataclasses.replace(case, constexprs={**case.constexprs, "BLOCK_T": 3})  # not a power of 2
    with pytest.raises(RuntimeError, match=r"AOT compile failed: softmax_topk_fwd \[.*\] num_warps=\d+ sm_90"):
        aot.compile_all(archs=(90,), workers=1, cases=[broken])
