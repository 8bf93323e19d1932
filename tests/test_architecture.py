"""The import graph: layers import downward only, and no module imports itself in a cycle.

Every ``import`` statement in the source counts, lazy ones inside functions and
``TYPE_CHECKING`` blocks too: a lazy upward import is still an upward dependency. The layer
table is ``ARCHITECTURE.md``'s; a new module must be given a layer here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fedws"

# (rank, group): a module may import modules of a lower rank, or of its own group.
LAYERS: list[tuple[str, int, str]] = [
    ("fedws.exceptions", 0, "protocol"),
    ("fedws.version", 0, "protocol"),
    ("fedws.protocol", 0, "protocol"),
    ("fedws.node", 1, "node"),
    ("fedws.transport", 1, "transport"),
    ("fedws.client", 2, "client"),
    ("fedws.pointers", 3, "pointers"),
    ("fedws.plans", 4, "plans"),
    ("fedws.smpc", 4, "smpc"),
    ("fedws.fl", 5, "fl"),
    ("fedws.hook", 5, "compose"),
    ("fedws.virtual", 5, "compose"),
    ("fedws.connecting", 5, "compose"),
    ("fedws.node_config", 5, "compose"),
    ("fedws.node_process", 5, "compose"),
    ("fedws.node_host", 5, "compose"),
    ("fedws.grid", 5, "compose"),
    ("fedws.sandbox", 5, "compose"),
    ("fedws.datasets", 5, "compose"),
    ("fedws.optim", 5, "compose"),
    ("fedws.testing", 6, "top"),
    ("fedws.launch", 6, "top"),
    ("fedws.cli", 6, "top"),
    ("fedws.plan_admin", 6, "top"),
    ("fedws.status", 6, "top"),
    ("fedws.logs", 6, "top"),
    ("fedws.__main__", 6, "top"),
    ("fedws", 6, "top"),
]
# Modules whose source must not name an event loop or a socket library: they are the
# sans-I/O core both transports share.
NO_IO = ("fedws.protocol", "fedws.node", "fedws.exceptions", "fedws.version")
IO_MODULES = ("asyncio", "websockets", "uvloop", "socket")


def _modules() -> dict[str, Path]:
    mods = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts)
        mods[name.removesuffix(".__init__")] = f
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The fedws modules ``name`` imports (resolved to the deepest existing module)."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        for t in targets:
            while t and t not in mods:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _external_imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out


def _layer(name: str) -> tuple[int, str]:
    best: tuple[str, int, str] | None = None
    for prefix, rank, group in LAYERS:
        if (name == prefix or name.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, rank, group)
    if best is None:
        raise AssertionError(f"module {name} has no layer: add it to LAYERS and ARCHITECTURE.md")
    return best[1], best[2]


MODS = _modules()
GRAPH = {m: _imports(m, p, MODS) for m, p in MODS.items()}


def test_every_module_has_a_layer() -> None:
    for m in MODS:
        _layer(m)


def test_no_upward_or_sideways_imports() -> None:
    bad = []
    for src, targets in GRAPH.items():
        rank, group = _layer(src)
        for dst in targets:
            if src == "fedws" or src.endswith("__main__"):
                continue
            if dst == "fedws":  # importing the package itself runs its __init__: the top
                bad.append(f"{src} -> fedws (the package root)")
                continue
            drank, dgroup = _layer(dst)
            if drank > rank or (drank == rank and dgroup != group):
                bad.append(f"{src} ({group}, {rank}) -> {dst} ({dgroup}, {drank})")
    assert not bad, "imports against the layers:\n" + "\n".join(sorted(bad))


def test_no_import_cycles() -> None:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                strong(w)
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
                cycles.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            strong(v)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("name", sorted(m for m in MODS if any(m == p or m.startswith(p + ".") for p in NO_IO)))
def test_sans_io_core_imports_no_io(name: str) -> None:
    used = _external_imports(MODS[name]) & set(IO_MODULES)
    assert not used, f"{name} imports {sorted(used)}: the protocol core and the node do no I/O"
