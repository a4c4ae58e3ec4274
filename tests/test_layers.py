"""The import rule of CONTRIBUTING.md, checked on the source (AST, nothing imported): a module may
import only its own layer or the layers below it, and no modules form an import circle - lazy
imports inside functions included, since they are how circles hide.

Layers, bottom to top: ops < models < generation < data / config < feedback < trainers <
loop / demo / report < cli.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "python" / "fastrlhf"

# module-name prefix (after "fastrlhf.") -> layer; the longest matching prefix wins
LAYERS: dict[str, int] = {
    "_ext": 0,
    "runtime": 0,
    "ops": 0,
    "models": 1,
    "generation": 2,
    "data": 3,
    "config": 3,
    "feedback": 4,
    "trainers": 5,
    "report": 6,
    "loop": 6,
    "demo": 6,
    "runs": 6,
    "cli": 7,
    "__main__": 7,
}
COMPILED = {"fastrlhf._C"}  # the extension module: no source to parse, imports nothing of ours
LAYER_NAMES = ["ops", "models", "generation", "data/config", "feedback", "trainers", "loop/demo/report/runs",
               "cli"]


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int | None:
    """None for the package root (``fastrlhf/__init__.py`` re-exports; it is nobody's dependency)."""
    rest = module.split(".", 1)[1] if "." in module else ""
    if not rest:
        return None
    best = None
    for prefix, layer in LAYERS.items():
        if (rest == prefix or rest.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, layer)
    if best is None:
        raise AssertionError(f"{module}: no layer assigned; add its top-level name to LAYERS in {__file__}")
    return best[1]


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """fastrlhf modules imported by ``module`` (anywhere in the file), with line numbers. ``from X
    import Y`` counts as an import of ``X.Y`` when that is a module, else of ``X``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.startswith("fastrlhf")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = module.split(".")
                base = base if is_pkg else base[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("fastrlhf"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in COMPILED:
                    continue
                found.append((sub if sub in modules else target, node.lineno))
    return [(name, line) for name, line in found if name != module]


@pytest.fixture(scope="module")
def graph():
    modules = all_modules()
    return modules, {m: imports_of(m, p, modules) for m, p in modules.items()}


def test_every_module_has_a_layer(graph):
    modules, _ = graph
    for m in modules:
        layer_of(m)


def test_imports_only_go_down_the_layers(graph):
    modules, edges = graph
    bad = []
    for m, targets in edges.items():
        lm = layer_of(m)
        for target, line in targets:
            lt = layer_of(target)
            if lm is not None and lt is not None and lt > lm:
                bad.append(f"{modules[m].relative_to(PACKAGE.parent)}:{line}: {m} ({LAYER_NAMES[lm]}) imports "
                           f"{target} ({LAYER_NAMES[lt]}), a higher layer")
            if lm is not None and lt is None:
                bad.append(f"{modules[m].relative_to(PACKAGE.parent)}:{line}: {m} imports the package root "
                           "'fastrlhf' (import the module it re-exports instead)")
    assert not bad, "imports that run up the layers:\n" + "\n".join(bad)


def test_no_import_circles(graph):
    """Tarjan's strongly connected components over module -> imported module. A package's
    ``__init__`` importing its own submodules is normal; a submodule importing its package's
    ``__init__`` back closes a circle, as any other."""
    modules, edges = graph
    adj = {m: sorted({t for t, _ in targets if t in modules}) for m, targets in edges.items()}
    index, low, on_stack, stack, sccs = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in adj[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    for v in sorted(adj):
        if v not in index:
            visit(v)
    assert not sccs, "import circles:\n" + "\n".join(" <-> ".join(c) for c in sccs)


def test_the_checker_sees_a_planted_violation(tmp_path):
    """The rule is enforced, not vacuous: an upward import and a circle are reported."""
    pkg = tmp_path / "fastrlhf"
    (pkg / "ops").mkdir(parents=True)
    (pkg / "models").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "ops" / "__init__.py").write_text("")
    (pkg / "models" / "__init__.py").write_text("")
    (pkg / "ops" / "a.py").write_text("def f():\n    from fastrlhf.models import b\n")
    (pkg / "models" / "b.py").write_text("from fastrlhf.ops import a\n")
    global PACKAGE
    saved = PACKAGE
    PACKAGE = pkg
    try:
        modules = all_modules()
        edges = {m: imports_of(m, p, modules) for m, p in modules.items()}
        with pytest.raises(AssertionError, match="a higher layer"):
            test_imports_only_go_down_the_layers((modules, edges))
        with pytest.raises(AssertionError, match="import circles"):
            test_no_import_circles((modules, edges))
    finally:
        PACKAGE = saved
