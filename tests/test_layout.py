"""The package's architecture: the optimizer library below, the harness above, no cycles.

The import graph is read from the source with ``ast`` (function-local imports included, since
those are how a cycle hides), not from what happens to be loaded at run time.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "sophia_pytorch"
HARNESS_ONLY = ("matplotlib", "tqdm", "tokenizers", "argparse", "tomllib", "datasets")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its source."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == 1:
                return stack[stack.index(child):] + [child]
            if child not in state and (cycle := visit(child)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    graph = _import_graph()
    assert "sophia_pytorch.optimizer" in graph and len(graph) > 15
    assert _find_cycle(graph) is None, " -> ".join(_find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_library_never_imports_the_harness():
    graph = _import_graph()
    library = [m for m in graph if not m.startswith("sophia_pytorch.harness")]
    offenders = {m: sorted(t for t in graph[m] if t.startswith("sophia_pytorch.harness"))
                 for m in library}
    assert not {m: t for m, t in offenders.items() if t}


def test_importing_the_library_loads_no_harness_dependency():
    script = (
        "import json, sys, torch; before = set(sys.modules); import sophia_pytorch; "
        "print(json.dumps(sorted(set(sys.modules) - before)))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True)
    added = json.loads(done.stdout.strip().splitlines()[-1])
    assert "sophia_pytorch.optimizer" in added
    harness = [m for m in added if m.startswith("sophia_pytorch.harness")]
    third_party = [m for m in added if m.split(".")[0] in HARNESS_ONLY]
    assert not harness and not third_party, (harness, third_party)


# Standard-library modules newer than Python 3.10, with the version that added them.
_STDLIB_ADDED = {"tomllib": (3, 11)}


def _floor(spec: str) -> tuple[int, int]:
    major, minor = spec.removeprefix(">=").split(".")[:2]
    return int(major), int(minor)


def test_the_declared_python_floor_has_every_stdlib_module_the_package_imports():
    """requires-python is at least the version that added each standard-library module the
    source imports (the harness reads TOML with tomllib, new in 3.11), and ruff and mypy
    check against that same floor."""
    import tomllib

    pyproject = tomllib.loads((PACKAGE.parents[1] / "pyproject.toml").read_text())
    floor = _floor(pyproject["project"]["requires-python"])
    needed = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                top = name.partition(".")[0]
                if top in _STDLIB_ADDED:
                    needed[top] = _STDLIB_ADDED[top]
    too_new = {name: version for name, version in needed.items() if version > floor}
    assert not too_new, f"requires-python {floor} lacks {too_new}; raise the floor"
    assert pyproject["tool"]["ruff"]["target-version"] == f"py{floor[0]}{floor[1]}"
    assert _floor(pyproject["tool"]["mypy"]["python_version"]) == floor


ROOT = PACKAGE.parents[1]
MAX_LINES = 800
# "Issue 16", "issue 16 §3", "#16": a reader of the product does not have the tracker.
ISSUE_REFERENCE = re.compile(r"issue[ _]?\d+|§\s?\d", re.IGNORECASE)


def test_no_module_of_the_product_or_its_tools_is_over_800_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for folder in ("src", "benchmarks")
            for p in (ROOT / folder).rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"split these into modules of at most {MAX_LINES} lines: {long}"


def test_the_product_and_the_test_names_cite_no_issue_numbers() -> None:
    found = [f"{p.relative_to(ROOT)}:{i}" for p in (ROOT / "src").rglob("*.py")
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
             if ISSUE_REFERENCE.search(line)]
    for path in (ROOT / "tests").rglob("test_*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        named = [node for node in ast.walk(tree)
                 if isinstance(node, ast.Module | ast.FunctionDef | ast.ClassDef)]
        for node in named:
            text = f"{getattr(node, 'name', '')} {ast.get_docstring(node) or ''}"
            if ISSUE_REFERENCE.search(text):
                found.append(f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 1)}")
    assert not found, f"say what the code does, not which issue asked for it: {found}"


def test_a_check_for_issue_references_finds_one() -> None:
    assert ISSUE_REFERENCE.search("def test_small_preset_is_the_issue_16_scale_step")
    assert ISSUE_REFERENCE.search("# Issue 16 §3: a step towards")
    assert not ISSUE_REFERENCE.search("an issue with the scale; 16 steps")
