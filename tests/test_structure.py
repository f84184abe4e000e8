"""The shape of the code base, kept as it was agreed (read from the source, nothing imported):
the import graph, module and function sizes, and one spelling of each run-folder file name."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "bso_cache"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
# the modules every wing may use, which use no wing
GROUND = ("config", "errors", "losses", "models", "quantize", "hashing", "schemas", "__init__")


def modules() -> dict[str, tuple[Path, ast.Module]]:
    """Every module of the package by its dotted name under bso_cache ("cache.writer"; a package's
    __init__ by the package's name)."""
    out = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        parts = list(p.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts) or "__init__"] = (p, ast.parse(p.read_text()))
    return out


def internal_imports(path: Path, tree: ast.Module, known: set[str]) -> set[str]:
    """bso_cache modules a module imports, at any depth of its body (function-level imports too):
    `from bso_cache.training import parallel` is an import of training.parallel."""
    package = list(path.relative_to(PACKAGE).parent.parts)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[:len(package) - (node.level - 1)] + ([node.module] if node.module else []))
            elif node.module == "bso_cache" or (node.module or "").startswith("bso_cache."):
                base = node.module.removeprefix("bso_cache").lstrip(".")
            else:
                continue
            for a in node.names:
                name = f"{base}.{a.name}" if base else a.name
                out.add(name if name in known else base or "__init__")
        elif isinstance(node, ast.Import):
            out.update(a.name.removeprefix("bso_cache.") for a in node.names if a.name.startswith("bso_cache."))
    return out


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: internal_imports(p, tree, set(found)) - {name} for name, (p, tree) in found.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles (strongly connected components of more than one module)."""
    index, low, stack, found = {}, {}, [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = stack[stack.index(v):]
            del stack[stack.index(v):]
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def closure(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_import_graph():
    """No circle anywhere, the CLI included; the wings depend on the ground, never the other way."""
    graph = import_graph()
    assert not circles(graph), circles(graph)
    build, train = "cache.build", "training.train"
    assert build not in closure(graph, "cache.verify") and build not in closure(graph, train)
    # evaluation in one home: train's --eval-cache, eval and the demo all use evaluate.py's
    assert "reporting.evaluate" in closure(graph, train) and "reporting.evaluate" in closure(graph, "reporting.demo")
    assert "scoring.scorer" not in graph["training.metrics"]
    # library modules never import the CLI (only `python -m bso_cache`, the entry point, does)
    assert [m for m, deps in graph.items() if not m.startswith("cli") and any(d.startswith("cli") for d in deps)] \
        == ["__main__"]
    # the one pair scorer: build, train, evaluate and verify all reach it
    for user in (build, train, "reporting.evaluate", "cache.verify"):
        assert "scoring.scorer" in closure(graph, user), user
    # the ground (configuration, errors, losses, models, the contract) stands on no wing
    ground = [m for m in graph if m.split(".")[0] in GROUND]
    assert not {m: sorted(d for d in graph[m] if d.split(".")[0] not in GROUND) for m in ground
                if any(d.split(".")[0] not in GROUND for d in graph[m])}


def test_the_cache_has_one_writer():
    """One storage layer: only cache/writer.py writes into a cache folder (shards, sidecars, state,
    manifest), only build.py drives it, and the walk of build's --out from the CLI to the shard
    writer touches three files: cli/cache_cmds.py -> build.py -> cache/writer.py."""
    graph = import_graph()
    texts = {name: p.read_text() for name, (p, _) in modules().items()}
    writers = sorted(n for n, text in texts.items() if "write_shard(" in text or "S.SHARD_PREFIX" in text
                     or "S.SHARD_PATTERN" in text or "S.BUILD_LOCK_NAME" in text)
    assert writers == ["cache.writer"], writers
    assert sorted(n for n, text in texts.items() if "CacheWriter(" in text and n != "cache.writer") == ["cache.build"]
    assert not [n for n, text in texts.items() if '"part-' in text and n != "schemas"], \
        "the shard prefix is spelled in schemas.py only"
    assert "cache.writer" in closure(graph, "cache.build") and "cache.build" not in closure(graph, "cache")
    cli = {p.name: p.read_text() for p in (PACKAGE / "cli").glob("*.py")}
    assert [n for n, text in cli.items() if "bso_cache.cache.build import build_cache" in text] == ["cache_cmds.py"]
    assert not [n for n, text in cli.items() if "CacheWriter" in text or "write_shard" in text]


def test_module_and_function_sizes():
    """bso_cache/ and cli/ alike."""
    too_long = []
    for p in sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "cli").glob("*.py")):
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
    source = {p.name: p.read_text() for p in PACKAGE.rglob("*.py") if p != PACKAGE / "schemas.py"}
    schemas = (PACKAGE / "schemas.py").read_text()
    for name in ('"metrics.jsonl"', '"summary.json"', '"run_config.json"', '"build.json"', '"checkpoints"'):
        assert schemas.count(name) == 1, name
        assert not [n for n, s in source.items() if name in s], (name, [n for n, s in source.items() if name in s])


def test_option_names_are_listed_only_where_they_are_declared():
    """No literal list, tuple, set or dict of five or more of TrainConfig's option names outside
    config/train.py: the sweep's grid, the resume rules, the card and plan read the fields' metadata."""
    from bso_cache.config import TrainConfig, options

    train_names = {o.name for o in options(TrainConfig)}
    found = []
    files = [p for p in sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "cli").glob("*.py"))
             + sorted((ROOT / "scripts").glob("*.py")) if p != PACKAGE / "config" / "train.py"]
    for p in files:
        for node in ast.walk(ast.parse(p.read_text())):
            items = (node.elts if isinstance(node, (ast.List, ast.Tuple, ast.Set))
                     else node.keys if isinstance(node, ast.Dict) else [])
            strings = {e.value for e in items if isinstance(e, ast.Constant) and isinstance(e.value, str)}
            if len(strings & train_names) >= 5:
                found.append(f"{p.relative_to(ROOT)}:{node.lineno}")
    assert not found, found


def test_docs_tell_one_truth_in_pages_a_person_reads():
    """The README is a landing page (<= 250 lines) whose relative links resolve; no docs page is over
    500 lines or keeps a History; nothing the project ships cites the specification files a user does
    not have (the project's own words are in docs/LOSSES.md)."""
    import re

    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if not target.startswith(("http://", "https://")):
                assert (page.parent / target).exists(), (page.name, target)
        if page.parent.name == "docs":
            assert len(text.splitlines()) <= 500, page.name
            assert not re.search(r"^#+ History", text, re.M), page.name
    shipped = [p for p in ROOT.rglob("*") if p.is_file() and p.suffix in (".py", ".md", ".yaml", ".toml", ".sh")
               and not {"tests", ".git", ".venv", "build"} & set(p.relative_to(ROOT).parts)
               and ".egg-info" not in str(p)]
    assert not [p.name for p in shipped if re.search(r"\b(BSO|DESIGN)\.md", p.read_text())]


def test_the_figures_in_the_docs_are_their_results():
    """Every benchmark section of docs/ is rendered from its JSON result (docs/results/) by the one
    renderer, scripts/results.py: a figure edited by hand, or a result not rendered, fails."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "results.py"), "--check"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
