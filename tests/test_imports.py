"""The layers import only the ones above them: no import cycle anywhere in distopt/, and
nothing below the runtime imports Ray (DESIGN.md, "Layers")."""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent / "distopt"


def _module(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, modules: set[str]) -> set[str]:
    """Every distopt module ``path`` imports, wherever the import sits (a function-level
    import still makes a cycle); ``if TYPE_CHECKING`` blocks included."""
    out = set()
    me = _module(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rsplit(".", 1)[0] if "." in name else ""
            if name and name != me:
                out.add(name)
    return out


def _graph() -> dict[str, set[str]]:
    files = sorted(ROOT.rglob("*.py"))
    modules = {_module(f) for f in files}
    graph = {_module(f): _imports(f, modules) for f in files}
    for name in graph:  # importing a.b.c runs a/__init__ and a/b/__init__ first
        graph[name] |= {p for p in _parents(name) if p in graph and p != name}
    return graph


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if m in _parents(n):
                continue  # a package importing its own parent's __init__ is the loader's order, not a cycle
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None
    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycles_in_distopt():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_walk_finds_a_cycle_when_there_is_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


LAYERS = {  # DESIGN.md's table: layer -> its modules, in order (a layer imports only those before it)
    "gradients": ("distopt.gradients", "distopt.backends", "distopt._nest"),
    "collectives": ("distopt.collectives",),
    "optim": ("distopt.optim",),
    "ft": ("distopt.ft",),
    "checkpoint": ("distopt.checkpoint",),
    "data": ("distopt.data",),
    "runtime": ("distopt.runtime",),
}
ALLOWED = {"gradients": set(), "collectives": set(), "optim": {"gradients", "collectives"},
           "ft": {"optim", "collectives", "gradients"}, "checkpoint": {"optim", "collectives", "gradients"},
           "data": set(),  # torch only
           "runtime": {"gradients", "collectives", "optim", "ft", "checkpoint", "data"}}


def _layer(module: str) -> str | None:
    return next((k for k, prefixes in LAYERS.items()
                 if any(module == p or module.startswith(p + ".") for p in prefixes)), None)


def test_layers_import_only_the_layers_above_them():
    for name, deps in _graph().items():
        layer = _layer(name)
        if layer is None:  # distopt/__init__ re-exports every layer
            continue
        for dep in deps:
            other = _layer(dep)
            assert other is None or other == layer or other in ALLOWED[layer], \
                f"{name} (layer {layer}) imports {dep} (layer {other}), which is not above it"


def test_nothing_below_the_runtime_imports_ray():
    for path in ROOT.rglob("*.py"):
        if "runtime" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "ray" or n.startswith("ray.") for n in names), f"{path} imports ray"


def test_nothing_outside_the_optimizer_reads_its_private_fields():
    import re
    reach_in = re.compile(r"\b(?:opt|optimizer|self\.opt|self\.optimizer)\._[a-z]\w*")
    for path in ROOT.rglob("*.py"):
        if "optim" in path.relative_to(ROOT).parts[:1]:
            continue
        hits = reach_in.findall(path.read_text())
        assert not hits, f"{path.relative_to(ROOT.parent)} reads the optimizer's private fields: {sorted(set(hits))}"
