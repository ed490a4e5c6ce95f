"""The package's layers: each sub-package imports only the layers below it, and no module
imports itself back through others (no cycle). Every import counts, deferred ones included.

The map (README, "Layout"): ``core`` at the bottom; ``live`` and ``delivery`` on it, side by
side; ``service`` wires them; ``http`` serves a running service through its own Protocol;
``cli`` is the composition root on top; ``testing`` is for sink authors.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "watcher"

ALLOWED: dict[str, set[str]] = {
    "core": {"core"},
    "live": {"core", "live"},
    "delivery": {"core", "delivery"},
    "service": {"core", "live", "delivery", "service"},
    "http": {"core", "live", "delivery", "http"},
    "cli": {"core", "live", "delivery", "service", "http", "cli"},
    "testing": {"core", "delivery", "testing"},
    "": {"core", "live"},  # watcher/__init__.py: the public front door (awatch: live)
}
ALSO: dict[str, set[str]] = {
    # The parsed configuration is data every edge reads (the API its [api] table); the HTTP
    # layer imports it, never the running service (it reads that through http/view.py).
    "http": {"watcher.service.config"},
}


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every ``watcher`` module ``path`` imports (``from watcher import x`` resolved to
    ``watcher.x`` when that is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("watcher")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if not node.module.startswith("watcher"):
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                is_module = (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").exists()
                is_package = (PACKAGE.parent / sub.replace(".", "/") / "__init__.py").exists()
                found.add(sub if is_module or is_package else node.module)
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


MODULES = {_module(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_only_downward(module: str) -> None:
    """A module imports only its own layer and the layers below it."""
    layer = _layer(module)
    allowed, also = ALLOWED[layer], ALSO.get(layer, set())
    upward = sorted(d for d in MODULES[module] if _layer(d) not in allowed and d not in also)
    assert not upward, f"{module} imports a higher layer: {upward}"


def test_no_import_cycle() -> None:
    """No module reaches itself again by following imports (a package's ``__init__`` that
    re-exports its own modules is the package, not a cycle)."""
    graph = {
        module: {dep for dep in deps if dep in MODULES and not module.startswith(dep + ".")}
        for module, deps in MODULES.items()
    }
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                cycle = [*path[path.index(dep) :], dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    """The check itself works: an upward import in a core module is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("from watcher.service.config import Config\nimport watcher.http.api\n")
    deps = _imports(bad)
    assert {"watcher.service.config", "watcher.http.api"} <= deps
    assert all(_layer(d) not in ALLOWED["core"] for d in deps)
