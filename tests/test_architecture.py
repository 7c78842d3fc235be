"""The shape of the code: no import cycle among components/, no reaching into another module's
private names. Read from the source with `ast` (nothing is imported), so a failure names files."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("components", "flows")


def module_files() -> dict[str, Path]:
    """{'components.families.base': Path(...), ...} for every module of PACKAGES."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = module_files()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: module and class bodies, if/try/with blocks;
    not inside functions, not under `if TYPE_CHECKING:`."""
    found, todo = [], list(tree.body)
    while todo:
        node = todo.pop(0)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        elif isinstance(node, ast.If) and _is_type_checking(node):
            todo.extend(node.orelse)
        else:
            todo.extend(child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt))
    return found


def _base(module: str, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    is_package = MODULES[module].name == "__init__.py"
    parts = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
    return ".".join(parts + ([node.module] if node.module else []))


def imported_modules(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The project modules an import statement loads (a `from pkg import mod` loads pkg.mod)."""
    if isinstance(node, ast.Import):
        targets = {alias.name for alias in node.names}
    else:
        base = _base(module, node)
        targets = {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    return {t for t in targets if t in MODULES and t != module}


def all_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import a module can run, those inside functions included (not under `if TYPE_CHECKING:`)."""
    found, todo = [], list(tree.body)
    while todo:
        node = todo.pop(0)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If) and _is_type_checking(node):
            todo.extend(node.orelse)
        else:
            todo.extend(child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt))
    return found


def import_graph(reader=top_level_imports) -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        graph[module] = set().union(*(imported_modules(module, n) for n in reader(tree)))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> b -> ... -> a) for each strongly connected group of modules (Tarjan)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_a_cycle(graph, group) for group in groups]


def _a_cycle(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """The shortest path from the group's first module back to itself, inside the group."""
    start = min(group)
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for w in sorted(graph[path[-1]] & group):
            if w == start:
                return path + [start]
            if w not in seen:
                seen.add(w)
                paths.append(path + [w])
    raise AssertionError(f"no cycle through {start}")  # a strongly connected group always has one


def test_no_import_cycle_among_components():
    graph = import_graph()
    components = {m: {t for t in targets if t.startswith("components")}
                  for m, targets in graph.items() if m.startswith("components")}
    found = [" -> ".join(c) for c in cycles(components)]
    assert found == [], "import cycles among components/ (module-level imports):\n  " + "\n  ".join(found)


def test_no_import_cycle_among_components_even_through_imports_inside_functions():
    """A lazy import only hides a cycle until the function runs: two modules that need each other
    belong together, or the shared piece belongs in a third."""
    graph = import_graph(all_imports)
    components = {m: {t for t in targets if t.startswith("components")}
                  for m, targets in graph.items() if m.startswith("components")}
    found = [" -> ".join(c) for c in cycles(components)]
    assert found == [], "import cycles among components/ (imports inside functions included):\n  " + "\n  ".join(found)


def test_no_module_imports_another_modules_private_names():
    """`from components.x import _y` couples to what x may change freely; make it public or move it."""
    found = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                base = _base(module, node)
                if base.split(".")[0] not in PACKAGES or base == module:
                    continue
                found += [f"{path.relative_to(ROOT)}:{node.lineno}: from {base} import {a.name}"
                          for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
            elif isinstance(node, ast.Import):
                found += [f"{path.relative_to(ROOT)}:{node.lineno}: import {a.name}" for a in node.names
                          if a.name.split(".")[0] in PACKAGES and any(p.startswith("_") and not p.startswith("__")
                                                                       for p in a.name.split("."))]
    assert found == [], "private names imported from another module:\n  " + "\n  ".join(found)


def test_the_graph_reader_sees_module_level_imports_only():
    """The checks above are only as good as the reader: a function's import is not an edge, a
    TYPE_CHECKING import is not an edge, a `from pkg import module` is an edge to the module."""
    tree = ast.parse("from __future__ import annotations\n"
                     "from typing import TYPE_CHECKING\n"
                     "from components import config\n"
                     "if TYPE_CHECKING:\n    from components import registry\n"
                     "try:\n    import components.tracking\nexcept ImportError:\n    pass\n"
                     "def f():\n    from components import data\n")
    edges = set().union(*(imported_modules("components.files", n) for n in top_level_imports(tree)))
    assert edges == {"components.config", "components.tracking"}
    every = set().union(*(imported_modules("components.files", n) for n in all_imports(tree)))
    assert every == {"components.config", "components.tracking", "components.data"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
