"""The package's layout rules (README "Layout"), checked on the source: no import cycle between its
modules (lazy imports included), the kernels import nothing above them, ``ops`` nothing of ``aot``,
only the layers that may run the oracle import ``moe_kernels.reference``, no public or reference
function hides parameters behind ``**kwargs``, and no module or test file outgrows its limit."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import moe_kernels

PACKAGE = Path(moe_kernels.__file__).resolve().parent
TESTS = Path(__file__).resolve().parent
MAX_MODULE_LINES = 450
MAX_TEST_LINES = 500
# The modules that may import the oracle: the ops (backend="torch" off the CPU), the CPU path (its
# rare fallbacks: tied rows, unaligned operands, rows outside the linear DP range) and the checking
# tools; production code elsewhere owns its numerics.
MAY_IMPORT_REFERENCE = ("moe_kernels.ops", "moe_kernels.cpu", "moe_kernels.reference", "moe_kernels.testing")
MAY_IMPORT_REFERENCE += ("moe_kernels.validation", "moe_kernels.validation_more")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str) -> set[str]:
    """The package's modules ``name`` imports anywhere in its body (function-level imports too)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            # ``from package import submodule`` imports the submodule; ``from module import name``
            # the module.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: _imports(name) for name in MODULES}


def _cycles() -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in GRAPH[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in GRAPH:
        if node not in index:
            visit(node)
    return components


def test_no_import_cycle():
    assert _cycles() == []


def test_the_layers_import_downwards():
    def within(name: str, prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    for name, imported in GRAPH.items():
        if within(name, "moe_kernels.kernels"):  # Triton, the kernels, at most config's option codes
            allowed = ("moe_kernels.kernels", "moe_kernels.config")
            assert all(any(within(other, a) for a in allowed) for other in imported), (name, imported)
        if within(name, "moe_kernels.ops"):
            assert not any(within(other, "moe_kernels.aot") for other in imported), (name, imported)
        if any(within(other, "moe_kernels.reference") for other in imported):
            assert any(within(name, allowed) for allowed in MAY_IMPORT_REFERENCE), f"{name} imports the oracle"
    # The checks can fail: the graph does hold the edges they look at.
    assert "moe_kernels.kernels._routing" in GRAPH["moe_kernels.kernels._knn"]
    assert "moe_kernels.reference.routing" in GRAPH["moe_kernels.ops.routing"]


def test_module_and_test_file_sizes():
    long_modules = {
        name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long_modules == {}, f"modules over {MAX_MODULE_LINES} lines: {long_modules}"
    long_tests = {p.name: n for p in TESTS.glob("*.py") if (n := len(p.read_text().splitlines())) > MAX_TEST_LINES}
    assert long_tests == {}, f"test files over {MAX_TEST_LINES} lines: {long_tests}"


def _public_callables():
    """``(qualified name, callable)`` of every public function, class constructor and public
    method defined in a public module of the package (those whose dotted name has no ``_`` part
    below ``moe_kernels``), the references included. Importing transformers-free modules only."""
    for info in pkgutil.walk_packages(moe_kernels.__path__, "moe_kernels."):
        if any(part.startswith("_") for part in info.name.split(".")[1:]) or info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != info.name:
                continue
            if inspect.isfunction(obj):
                yield f"{info.name}.{name}", obj
            elif inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    if inspect.isfunction(member) and (attr == "__init__" or not attr.startswith("_")):
                        yield f"{info.name}.{name}.{attr}", member


def test_no_public_or_reference_signature_hides_parameters():
    found = dict(_public_callables())
    assert "moe_kernels.reference.routing.softmax_topk" in found and "moe_kernels.cor.calibrate.calibrate" in found
    hidden = [
        name
        for name, fn in found.items()
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())
    ]
    assert hidden == [], f"signatures with **kwargs: {hidden}"
