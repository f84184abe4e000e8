"""The shape of the code base, kept as it was agreed (read from the source, nothing imported):
the import graph, module and function sizes, and one spelling of each run-folder file name."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "bso_cache"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text()) for p in sorted(PACKAGE.glob("*.py"))}


def internal_imports(tree: ast.Module) -> set[str]:
    """bso_cache modules a module imports, at any depth of its body (function-level imports too)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                if node.module:
                    out.add(node.module.split(".")[0])
                else:
                    out.update(a.name for a in node.names)
            elif node.module and node.module.startswith("bso_cache"):
                parts = node.module.split(".")
                out.add(parts[1] if len(parts) > 1 else parts[0])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("bso_cache."))
    return out


def closure(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_import_graph():
    graph = {name: internal_imports(tree) for name, tree in modules().items()}
    assert "build" not in closure(graph, "verify") and "build" not in closure(graph, "train")
    # evaluation in one home: train's --eval-cache, eval and the demo all use evaluate.py's
    assert "evaluate" in closure(graph, "train") and "evaluate" in closure(graph, "demo")
    assert "scoring" not in graph["metrics"]
    # library modules never import the CLI (only `python -m bso_cache`, the entry point, does)
    assert [m for m, deps in graph.items() if "cli" in deps] == ["__main__"]
    # the one pair scorer: build, train, evaluate and verify all reach scoring
    for user in ("build", "train", "evaluate", "verify"):
        assert "scoring" in closure(graph, user), user


def test_module_and_function_sizes():
    too_long = []
    for p in sorted(PACKAGE.glob("*.py")):
        text = p.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{p.name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    too_long.append(f"{p.name}:{node.lineno} {node.name}: {n} lines")
    assert not too_long, too_long


def test_file_names_are_spelled_once():
    source = {p.name: p.read_text() for p in PACKAGE.glob("*.py")}
    schemas = (ROOT / "schemas" / "__init__.py").read_text()
    for name in ('"metrics.jsonl"', '"summary.json"', '"run_config.json"', '"build.json"', '"checkpoints"'):
        assert schemas.count(name) == 1, name
        assert not [n for n, s in source.items() if name in s], (name, [n for n, s in source.items() if name in s])
