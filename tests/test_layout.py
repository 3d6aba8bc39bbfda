"""The package's import graph: one way, no cycles, and no package import hidden in a function."""

import ast
from pathlib import Path

import ph2p_lit

PACKAGE = Path(ph2p_lit.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The package modules an import names ("from .x import y" -> ph2p_lit.x, or ph2p_lit.x.y if a module)."""
    if node.level:
        base = module.split(".")
        base = base[: len(base) - node.level + (1 if is_package else 0)]
        target = ".".join(base + ([node.module] if node.module else []))
    elif (node.module or "").startswith("ph2p_lit"):
        target = node.module
    else:
        return []
    names = [f"{target}.{a.name}" for a in node.names]
    return [n for n in names if _exists(n)] or [target]


def _exists(name: str) -> bool:
    path = PACKAGE.parent / Path(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    graph, hidden = {}, []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        tree = ast.parse(path.read_text())
        graph[module] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                graph[module] |= set(_imported(node, module, path.name == "__init__.py"))
        for function in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(function):
                if isinstance(node, ast.ImportFrom) and _imported(node, module, path.name == "__init__.py"):
                    hidden.append(f"{module}.{function.name}")
    return graph, hidden


def test_no_package_module_is_imported_inside_a_function():
    _, hidden = _graph()
    assert hidden == []


def test_the_import_graph_has_no_cycle():
    graph, _ = _graph()
    graph = {m: {d for d in deps if d != m and d != "ph2p_lit"} for m, deps in graph.items() if m != "ph2p_lit"}
    state = {}

    def visit(module: str, path: list[str]) -> None:
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", " -> ".join(path + [module])
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            visit(dep, path + [module])
        state[module] = "done"

    for module in sorted(graph):
        visit(module, [])
