"""Ahead-of-time compile check: build every registered kernel configuration for real GPU targets.

The Triton interpreter accepts code the GPU compiler rejects and says nothing about registers or
spills. Triton compiles for a GPU target without a GPU: each :class:`~moe_kernels.aot.catalog.
KernelCase` is compiled to PTX and a cubin for ``sm_90`` / ``sm_80`` and the
``cuobjdump -res-usage`` bundled with Triton reports its registers, stack, local and shared memory.

Entry points: :func:`compile_case` (one case, one arch), :func:`compile_all` (every case, a process
pool) and :func:`format_table` (``moe-kernels info --kernels``). Compiled binaries land in Triton's
own cache (``TRITON_CACHE_DIR``, default ``~/.triton/cache``), so a second run is fast.

Everything that depends on the Triton version is in :func:`_compile`.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterable, Sequence

from moe_kernels import _table
from moe_kernels._compat import interpreter_enabled

DEFAULT_ARCHS: tuple[int, ...] = (90, 80)

_INTERPRETER_ERROR = (
    "the ahead-of-time compile check cannot run under the Triton interpreter: TRITON_INTERPRET=1 "
    "is set, so @triton.jit builds interpreted functions that cannot be compiled for a GPU; run "
    "it in a process started without TRITON_INTERPRET"
)


def _check_not_interpreted() -> None:
    if interpreter_enabled():
        raise RuntimeError(_INTERPRETER_ERROR)


# ------------------------------------------------------------------------------------------------
# Version-dependent part (Triton 3.6 and 3.9 tested)
# ------------------------------------------------------------------------------------------------


def _compile(fn, signature: dict, constexprs: dict, num_warps: int, arch: int, divisible: tuple):
    """``triton.compile`` ``fn`` for ``GPUTarget("cuda", arch, 32)``; returns the compiled kernel
    (``.asm["ptx"]``, ``.asm["cubin"]``, ``.metadata``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # Triton 3.6 and 3.9 (the GPU machines and CI): the signature is keyed by argument name over
    # *all* arguments, constexpr ones typed "constexpr"; constexprs are keyed by name.
    full_sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            full_sig[name] = "constexpr"
        elif name in signature:
            full_sig[name] = signature[name]
        else:
            raise KeyError(f"{fn.__name__}: argument {name!r} is in neither signature nor constexprs")
    # As the JIT specialises them for torch's (256-byte aligned) allocations: every pointer, and
    # the integer arguments in ``divisible``, are multiples of 16; this is what lets the compiler
    # emit vector loads.
    aligned = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if full_sig[name].startswith("*") or name in divisible
    }
    # A case's ``num_stages`` (software pipelining depth) rides in its constexprs, as the
    # launchers' meta dicts carry it, and is a compile option, not a kernel argument.
    constexprs = dict(constexprs)
    options = {"num_warps": num_warps}
    if "num_stages" in constexprs:
        options["num_stages"] = constexprs.pop("num_stages")
    src = ASTSource(fn=fn, signature=full_sig, constexprs=constexprs, attrs=aligned)
    target = GPUTarget("cuda", arch, 32)
    return triton.compile(src, target=target, options=options)


def _cuobjdump_path() -> str:
    import triton

    env = os.environ.get("TRITON_CUOBJDUMP_PATH")
    candidates = [env] if env else []
    try:  # Triton >= 3.4 resolves its bundled NVIDIA tools through knobs
        candidates.append(triton.knobs.nvidia.cuobjdump.path)
    except Exception:
        pass
    candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    candidates.append(shutil.which("cuobjdump"))
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise RuntimeError(
        "cuobjdump not found: expected the copy bundled with Triton (triton/backends/nvidia/bin), "
        "TRITON_CUOBJDUMP_PATH, or one on PATH"
    )


# ------------------------------------------------------------------------------------------------
# Resource usage
# ------------------------------------------------------------------------------------------------

_FUNCTION_RE = re.compile(r"^\s*Function\s+([^\s:]+)\s*:", re.MULTILINE)
_FIELDS = {"regs": "REG", "stack": "STACK", "shared": "SHARED", "local": "LOCAL"}


def parse_res_usage(text: str) -> dict[str, dict[str, int]]:
    """``cuobjdump -res-usage`` output -> ``{function: {regs, stack, shared, local}}``."""
    out: dict[str, dict[str, int]] = {}
    matches = list(_FUNCTION_RE.finditer(text))
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        block = text[m.end() : end]
        usage = {}
        for key, tag in _FIELDS.items():
            found = re.search(rf"\b{tag}\s*:\s*(\d+)", block)
            usage[key] = int(found.group(1)) if found else 0
        out[m.group(1)] = usage
    return out


def res_usage(cubin: bytes) -> dict[str, dict[str, int]]:
    """Run the bundled ``cuobjdump -res-usage`` on a cubin."""
    fd, path = tempfile.mkstemp(suffix=".cubin")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(cubin)
        proc = subprocess.run([_cuobjdump_path(), "-res-usage", path], capture_output=True, text=True)
    finally:
        os.unlink(path)
    if proc.returncode != 0:
        raise RuntimeError(f"cuobjdump -res-usage failed ({proc.returncode}): {proc.stderr.strip()}")
    usage = parse_res_usage(proc.stdout)
    if not usage:
        raise RuntimeError(f"cannot parse cuobjdump -res-usage output:\n{proc.stdout}")
    return usage


# ------------------------------------------------------------------------------------------------
# One case
# ------------------------------------------------------------------------------------------------


def _load_fn(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _compile_spec(spec: tuple) -> dict:
    """Worker body (picklable arguments only: the kernel is re-imported by ``module:name``)."""
    kernel_name, fn_path, label, signature, constexprs, num_warps, arch, divisible = spec
    _check_not_interpreted()
    fn = _load_fn(fn_path)
    start = time.perf_counter()
    with warnings.catch_warnings():
        # Triton 3.9 warns once per process that the FP-fusion default will change; the check
        # compiles with the default, as the launchers do.
        warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
        compiled = _compile(fn, signature, constexprs, num_warps, arch, divisible)
    seconds = time.perf_counter() - start
    usage = res_usage(compiled.asm["cubin"])
    name = getattr(compiled, "name", None) or fn.__name__
    own = usage.get(name) or next(iter(usage.values()))
    row = {
        "kernel": kernel_name,
        "config": label,
        "arch": arch,
        "num_warps": num_warps,
        "regs": own["regs"],
        # Spill / stack usage anywhere in the binary (non-inlined helpers included).
        "stack": max(u["stack"] for u in usage.values()),
        "local": max(u["local"] for u in usage.values()),
        "shared": own["shared"],  # static shared memory, as cuobjdump reports it
        "dyn_shared": int(getattr(compiled.metadata, "shared", 0) or 0),  # what a launch requests
        "wgmma": ("wgmma" in compiled.asm["ptx"]) if arch >= 90 else None,
        "compile_s": round(seconds, 2),
    }
    return row


def _spec(case, arch: int) -> tuple:
    from moe_kernels.aot.catalog import fn_path

    label = case.label or ", ".join(f"{k}={v}" for k, v in case.constexprs.items())
    return (
        case.kernel_name,
        fn_path(case.fn),
        label,
        dict(case.signature),
        dict(case.constexprs),
        int(case.num_warps),
        int(arch),
        tuple(case.divisible),
    )


def compile_case(case, arch: int) -> dict:
    """Compile one :class:`KernelCase` for ``sm_<arch>`` and report its resource usage.

    Returns ``{kernel, config, arch, num_warps, regs, stack, local, shared, dyn_shared, wgmma,
    compile_s}`` (``wgmma``: whether the PTX uses Hopper's warp-group MMA, ``None`` below sm_90).
    """
    return _compile_spec(_spec(case, arch))


# ------------------------------------------------------------------------------------------------
# Every case
# ------------------------------------------------------------------------------------------------


def _cost(case) -> int:
    # Longest first keeps the pool busy to the end: bigger tiles and more warps compile slower.
    size = 1
    for value in case.constexprs.values():
        if isinstance(value, int) and not isinstance(value, bool) and value > 1:
            size *= value
    return case.num_warps * size


def _failure(spec: tuple, exc: Exception) -> RuntimeError:
    """The error naming which compilation failed (``spec`` as built by :func:`_spec`)."""
    kernel, _, label, _, _, num_warps, arch, _ = spec
    return RuntimeError(
        f"AOT compile failed: {kernel} [{label}] num_warps={num_warps} sm_{arch}: {type(exc).__name__}: {exc}"
    )


def compile_all(
    archs: Sequence[int] = DEFAULT_ARCHS,
    workers: int | None = None,
    cases: Iterable | None = None,
) -> list[dict]:
    """Compile every registered case (or ``cases``) for every arch in a spawn process pool of
    ``workers`` (default ``os.cpu_count()``) processes; rows ordered as cases x archs.

    Workers are spawned (not forked), so a script calling this needs the usual
    ``if __name__ == "__main__":`` guard. Raises ``RuntimeError`` under ``TRITON_INTERPRET=1``
    and on the first case that fails to compile (naming kernel, config, num_warps and arch)."""
    _check_not_interpreted()
    from moe_kernels.aot.cases import all_cases

    case_list = list(all_cases() if cases is None else cases)
    specs = [_spec(case, arch) for case in case_list for arch in archs]
    order = sorted(range(len(specs)), key=lambda i: (-_cost(case_list[i // len(archs)]), specs[i][6]))
    workers = max(1, min(workers or os.cpu_count() or 1, len(specs)))
    if workers == 1:
        rows = {}
        for i in order:
            try:
                rows[i] = _compile_spec(specs[i])
            except Exception as exc:
                raise _failure(specs[i], exc) from exc
    else:
        import concurrent.futures as cf
        import multiprocessing

        # Spawned workers inherit this environment, checked above to be interpreter-free (and
        # each worker checks again before compiling).
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = {pool.submit(_compile_spec, specs[i]): i for i in order}
            rows = {}
            for fut in cf.as_completed(futures):
                i = futures[fut]
                try:
                    rows[i] = fut.result()
                except Exception as exc:
                    for other in futures:
                        other.cancel()
                    raise _failure(specs[i], exc) from exc
    return [rows[i] for i in range(len(specs))]


_COLUMNS = (
    ("kernel", "kernel"),
    ("config", "config"),
    ("arch", "sm"),
    ("num_warps", "warps"),
    ("regs", "regs"),
    ("stack", "stack"),
    ("local", "local"),
    ("shared", "shared"),
    ("dyn_shared", "dyn_smem"),
    ("wgmma", "wgmma"),
    ("compile_s", "time_s"),
)


def format_table(rows: Sequence[dict]) -> str:
    """Aligned text table of :func:`compile_all` rows (sorted by kernel, arch, config)."""
    ordered = sorted(rows, key=lambda r: (r["kernel"], -r["arch"], r["config"]))
    return _table.format_table(ordered, [key for key, _ in _COLUMNS], [title for _, title in _COLUMNS])


def summary(rows: Sequence[dict]) -> str:
    """Max registers / stack / local per kernel and arch, one line each."""
    best: dict[tuple, dict] = {}
    for row in rows:
        key = (row["kernel"], row["arch"])
        agg = best.setdefault(key, {"cases": 0, "regs": 0, "stack": 0, "local": 0})
        agg["cases"] += 1
        for field in ("regs", "stack", "local"):
            agg[field] = max(agg[field], row[field])
    return "\n".join(
        f"{kernel} sm_{arch}: {a['cases']} cases, max regs {a['regs']}, max stack {a['stack']}, max local {a['local']}"
        for (kernel, arch), a in sorted(best.items(), key=lambda kv: (kv[0][0], -kv[0][1]))
    )
