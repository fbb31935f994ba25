"""The package layout: folders by domain, no import cycle, old public names still importable."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import alignkit

PACKAGE = Path(alignkit.__file__).parent
# Loose modules allowed at the top: the command line, test helpers, and re-exports of names earlier issues use.
TOP_LEVEL = {"__init__", "__main__", "cli", "testing", "labels", "metrics", "tracking"}
DOMAINS = {"cai", "core", "data", "evaluation", "generation", "maths", "modeling", "ppo", "rewards", "run", "stages"}


def _modules() -> dict[str, tuple[Path, bool]]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        if "_shipped" in path.parts:
            continue
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return mods


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        test = getattr(node, "test", None)
        if isinstance(node, ast.If) and getattr(test, "id", getattr(test, "attr", None)) == "TYPE_CHECKING":
            skip.update(id(n) for body in node.body for n in ast.walk(body))
    return skip


def import_graph() -> dict[str, set[str]]:
    """module -> alignkit modules it imports, at module level or inside functions (both run at some point);
    ``if TYPE_CHECKING:`` imports are left out (they never run)."""
    mods = _modules()

    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, (path, is_pkg) in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_nodes(tree)
        package = name if is_pkg else name.rpartition(".")[0]
        deps: set[str | None] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                deps.update(owner(a.name) for a in node.names if a.name.startswith("alignkit"))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                if module.startswith("alignkit"):
                    for alias in node.names:
                        full = f"{module}.{alias.name}"
                        deps.add(full if full in mods else owner(module))
        graph[name] = {d for d in deps if d and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_planted_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert "alignkit.generation.spec" in graph["alignkit.generation"]  # the graph sees package re-exports
    assert cycles(graph) == []


def test_top_level_is_the_command_line_and_the_domain_folders():
    loose = {p.stem for p in PACKAGE.glob("*.py")}
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file() and p.name != "_shipped"}
    assert loose == TOP_LEVEL
    assert folders == DOMAINS


def test_names_earlier_issues_spelled_out_still_import():
    from alignkit.labels import step_labels
    from alignkit.metrics import pairwise_ranking, selection_curve
    from alignkit.rewards import check_scores, load_reward
    from alignkit.tracking import read_offline_run

    assert step_labels([[True], [False]]).hard == [True, False]
    assert pairwise_ranking([[0.9, 0.1]], [[True, False]])[0] == 1.0
    assert all(callable(f) for f in (selection_curve, load_reward, check_scores, read_offline_run))


def test_every_module_imports():
    for name in sorted(_modules()):
        if not name.endswith("__main__"):
            importlib.import_module(name)
