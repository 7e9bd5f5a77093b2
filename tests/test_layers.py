"""The package's import rule (docs/design.md): a module imports only from its own layer or the
layers below it, and no two modules import each other (directly or through others); nor do two
packages (``diffmic.trust`` and ``diffmic.reporting``, say), through any of their modules.

Imports inside functions count too: a lazy import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).parents[1] / "src"

# lowest first; a module's layer is that of the longest matching prefix
LAYERS: dict[str, int] = {
    # the package root: __version__; its module __getattr__ re-exports diffmic.fit / diffmic.test from
    # diffmic.api on first use (a package's __init__ may re-export its submodules, and
    # test_the_root_imports_nothing_when_imported keeps import diffmic itself at layer 0)
    "diffmic": 0,
    "diffmic.atomic": 0,  # atomic file writes (standard library only): every layer writes through it
    "diffmic.devices": 1,  # the default device of single-process jobs (torch only)
    "diffmic.diffusion": 1,
    "diffmic.losses": 1,
    "diffmic.nn": 2,
    "diffmic.metrics": 2,
    "diffmic.data": 3,
    "diffmic.outputs": 3,
    "diffmic.provenance": 3,
    "diffmic.trust": 3,
    "diffmic.config": 4,
    "diffmic.reporting": 4,  # draws and writes what trust measures (reliability diagram, lesion crops)
    "diffmic.training": 5,
    "diffmic.inference": 6,
    "diffmic.experiment": 6,  # runs training, reads run folders
    "diffmic.api": 6,  # diffmic.fit / diffmic.test: the fit and test commands as functions
    "diffmic.cli": 7,
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / "diffmic").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _layer(name: str) -> int | None:
    best = None
    for prefix, layer in LAYERS.items():
        # the root entry names the package's __init__ only, not every module below it
        under = name.startswith(prefix + ".") and prefix != "diffmic"
        if (name == prefix or under) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, layer)
    return None if best is None else best[1]


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            if not t.startswith("diffmic"):
                continue
            # the longest known module that t names (``from diffmic.nn import DCG`` -> diffmic.nn)
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, set(mods)) for m, p in mods.items()}


def test_every_module_has_a_layer():
    missing = [m for m in _modules() if _layer(m) is None]
    assert not missing, f"add these modules to LAYERS (and docs/design.md): {missing}"


def test_no_module_imports_upward():
    bad = []
    for mod, deps in _graph().items():
        for dep in deps:
            # a package's __init__ may re-export its own submodules
            if dep.startswith(mod + "."):
                continue
            if _layer(dep) > _layer(mod):
                bad.append(f"{mod} (layer {_layer(mod)}) imports {dep} (layer {_layer(dep)})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph = _graph()
    # package __init__ re-exports are edges parent -> child; ignore those and child -> parent
    # edges that only reach the package for a re-exported name of a sibling
    edges = {
        m: {d for d in deps if not d.startswith(m + ".") and not m.startswith(d + ".")} for m, deps in graph.items()
    }
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in edges.get(m, ()):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d) :] + [d]) if d in stack else f"{m} -> {d}")
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def _package(name: str) -> str:
    """The package of the layer table a module belongs to (``diffmic.trust.evaluate`` -> ``diffmic.trust``)."""
    return ".".join(name.split(".")[:2])


def _package_cycles(graph: dict[str, set[str]]) -> list[str]:
    """Cycles of the package graph: package A -> B when some module of A imports some module of B."""
    edges: dict[str, set[str]] = {}
    for mod, deps in graph.items():
        a = _package(mod)
        edges.setdefault(a, set()).update(_package(d) for d in deps if _package(d) not in (a, "diffmic"))
    state: dict[str, int] = {}
    cycles: list[str] = []

    def visit(p: str, stack: list[str]) -> None:
        state[p] = 1
        for d in sorted(edges.get(p, ())):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d) :] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[p] = 2

    for p in sorted(edges):
        if p not in state:
            visit(p, [p])
    return cycles


def test_no_package_import_cycles():
    """Modules may form no cycle and still tie two packages together (trust.evaluate importing
    reporting while reporting.overlay imports trust.lesions): packages may not import each other."""
    cycles = _package_cycles(_graph())
    assert not cycles, "package import cycles:\n" + "\n".join(cycles)


def test_the_package_rule_catches_a_cycle_through_two_modules():
    """The checker itself: two module edges that meet in no module cycle still make a package cycle."""
    graph = {
        "diffmic.trust.evaluate": {"diffmic.reporting.figures"},
        "diffmic.reporting.figures": set(),
        "diffmic.reporting.overlay": {"diffmic.trust.lesions"},
        "diffmic.trust.lesions": set(),
    }
    assert _package_cycles(graph) == ["diffmic.reporting -> diffmic.trust -> diffmic.reporting"]
    del graph["diffmic.trust.evaluate"]
    assert _package_cycles(graph) == []


def test_a_module_outside_the_table_has_no_layer():
    assert _layer("diffmic") == 0 and _layer("diffmic.nn.guidance") == 2
    assert _layer("diffmic.somewhere_new") is None


def test_the_rule_catches_an_upward_import(tmp_path):
    """The checker itself: a layer-1 module importing the training layer is flagged."""
    fake = tmp_path / "m.py"
    fake.write_text("def f():\n    from diffmic.training.module import DiffMICModule\n")
    deps = _imports("diffmic.diffusion.fake", fake, set(_modules()))
    assert deps == {"diffmic.training.module"}
    assert _layer("diffmic.training.module") > _layer("diffmic.diffusion.fake")


def test_the_root_imports_nothing_when_imported():
    """Layer 0's one exception: ``diffmic/__init__.py`` imports diffmic modules only inside its
    module-level ``__getattr__`` (``diffmic.fit`` / ``diffmic.test``, imported on first use), so
    ``import diffmic`` loads neither another diffmic module nor torch; the first ``diffmic.fit``
    returns ``diffmic.api.fit``."""
    import os
    import subprocess
    import sys

    root = SRC / "diffmic" / "__init__.py"
    tree = ast.parse(root.read_text())
    lazy = {id(n) for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "__getattr__" for n in ast.walk(f)}
    eager = [
        ast.unparse(n)
        for n in ast.walk(tree)
        if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in lazy and "diffmic" in ast.unparse(n)
    ]
    assert not eager, eager
    code = (
        "import sys, diffmic; assert 'torch' not in sys.modules, 'torch'; "
        "assert not [m for m in sys.modules if m.startswith('diffmic.')], sorted(sys.modules); "
        "import diffmic.api; assert diffmic.fit is diffmic.api.fit and diffmic.test is diffmic.api.test"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(SRC)})
