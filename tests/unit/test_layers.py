"""Imports run one way: ``wire ← core ← broker ← edge, node ← fakes ← bench ← claw``.

Every import counts -- at module level, inside functions and under ``if TYPE_CHECKING:`` -- because each is a
dependency a reader has to follow. A package may import its own layer's modules and any lower layer, never a
higher one nor a sibling of its layer (edge and node know nothing of each other), and no set of modules imports
itself round a circle. docs/architecture.md draws the picture.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Lowest first. Packages on one line are siblings: neither may import the other.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("wire",),
    ("core",),
    ("broker",),
    ("edge", "node"),
    ("fakes",),
    ("bench",),
    ("claw",),
)
RANK = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in RANK for p in sorted((ROOT / pkg).rglob("*.py"))}


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute name an ``ImportFrom`` names (relative imports resolved against ``module``)."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if path.name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _edges(known: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the repository modules it imports (anywhere in the file)."""
    graph: dict[str, set[str]] = {}
    for module, path in known.items():
        out: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, path, node)
                names = [f"{base}.{a.name}" for a in node.names] + [base]
            for name in names:
                # the longest prefix that is one of ours: "from edge import api" names the module edge.api
                parts = name.split(".")
                for i in range(len(parts), 0, -1):
                    cand = ".".join(parts[:i])
                    if cand in known:
                        if cand != module:
                            out.add(cand)
                        break
        graph[module] = out
    return graph


GRAPH = _edges(_modules())


def test_the_scan_sees_the_code() -> None:
    assert len(GRAPH) > 50
    assert "wire" in GRAPH["edge.api"] or any(m.startswith("wire") for m in GRAPH["edge.api"])
    assert any(m.startswith("core.") for m in GRAPH["node.worker"])


@pytest.mark.parametrize("pkg", list(RANK))
def test_imports_only_downwards(pkg: str) -> None:
    bad = []
    for module, deps in sorted(GRAPH.items()):
        if module.split(".")[0] != pkg:
            continue
        for dep in sorted(deps):
            top = dep.split(".")[0]
            if top != pkg and RANK[top] >= RANK[pkg]:
                bad.append(f"{module} imports {dep}")
    assert not bad, f"{pkg}/ imports upwards or sideways:\n  " + "\n  ".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_circles() -> None:
    # a package's __init__ re-exporting its modules is not a circle of design: leave the package node out
    graph = {m: {d for d in deps if d not in RANK} for m, deps in GRAPH.items() if m not in RANK}
    assert not _cycles(graph), f"import circles: {_cycles(graph)}"


def test_the_circle_finder_finds_circles() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
