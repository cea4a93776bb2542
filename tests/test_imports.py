"""The import graph of loratune/, read from the source: no cycles, and layers that point one way.

The graph is built with ``ast`` (nothing is imported), so a test failure names the file and line
of the offending import. Every ``import``/``from ... import`` of a loratune module counts, wherever
it stands: at module level, inside a function (a lazy import), or under ``if TYPE_CHECKING``. A
lazy import still couples the two modules; hiding a cycle inside a function only moves its failure
to run time. Implicit imports of a parent package's ``__init__`` are not edges (every submodule
would otherwise be in a cycle with its package); an explicit ``from ..data import X`` is an edge to
``loratune.data`` (the ``__init__``), and ``from . import x`` to the submodule ``x``.

The layers, top (imports everything below) to bottom (imports nothing of loratune):

    __main__
    cli                       one module per command
    train, serve, export      the things a user runs: training, serving, exporting (none imports another)
    recipe                    the training recipe: holds the configs of the layers below
    dist, generate, merge     several processes; sampling; adapters folded into a model (none imports another)
    data                      records -> examples -> batches (generate's chat prompts use it)
    quant                     the frozen base in fewer bits (it wraps adapters' layers)
    adapters                  LoRA and its variants
    models                    the families
    hub                       Hugging Face files: resolve, read, export
    runtime, bounded_yaml     what every stage shares at run time (devices, seeds, finite weights,
                              output directories, complete-or-absent writes); YAML with bounds
    errors                    the user-facing exceptions

This is the issue's cli -> train/serve -> generate/data -> adapters/quant -> models -> hub, with the
small shared modules placed where their imports put them, and two pairs ordered by the one import
between them (generate -> data, quant -> adapters). A package may import its own modules and any
package in a lower layer; never one in its own layer or above.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "loratune"

LAYERS: list[tuple[str, ...]] = [
    ("__main__",),
    ("cli",),
    ("train", "serve", "export"),
    ("recipe",),
    ("dist", "generate", "merge"),
    ("data",),
    ("quant",),
    ("adapters",),
    ("models",),
    ("hub",),
    ("runtime", "bounded_yaml"),
    ("errors",),
]
"""Top to bottom; a package or flat module may import only from layers below its own."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path) -> list[tuple[str, int]]:
    """(imported loratune module, line) for every import statement in the file, lazy ones included."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.split(".")[0] == "loratune"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "loratune":
                continue
            for alias in node.names:  # `from . import x` and `from .pkg import mod` import the submodule
                sub = f"{target}.{alias.name}"
                found.append((sub if sub in MODULES else target, node.lineno))
    return found


GRAPH = {name: imports_of(name, path) for name, path in MODULES.items()}


def top_package(name: str) -> str:
    """loratune.models.gpt2 -> 'models'; loratune.recipe -> 'recipe'; loratune itself -> ''."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as a path [a, b, ..., a], or None (depth-first, iterative)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    for root in sorted(edges):
        if root in state:
            continue
        path, stack = [root], [iter(sorted(edges.get(root, ())))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(edges.get(nxt, ()))))
    return None


def test_the_graph_sees_every_kind_of_import():
    """Relative, absolute, package, submodule and lazy imports all become edges (on a module we know)."""
    samples = {target for target, _ in GRAPH["loratune.cli.common"]}
    assert "loratune.errors" in samples  # from ..errors import
    assert "loratune.adapters.peft_format" in samples  # a lazy import inside load_for_inference
    assert "loratune.models" in samples  # from ..models import (the package's __init__)
    cli = {target for target, _ in GRAPH["loratune.cli"]}
    assert "loratune.cli.train" in cli  # from . import compare, data, ...
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_import_names_a_module_that_exists():
    missing = [(name, target, line) for name, targets in GRAPH.items() for target, line in targets
               if target not in MODULES]
    assert not missing, f"imports of modules that are not in loratune/: {missing}"


def test_no_module_import_cycles():
    edges = {name: {t for t, _ in targets if t != name} for name, targets in GRAPH.items()}
    cycle = find_cycle(edges)
    assert cycle is None, "module import cycle: " + " -> ".join(cycle)


def test_no_package_import_cycles():
    edges: dict[str, set[str]] = {}
    for name, targets in GRAPH.items():
        edges.setdefault(top_package(name), set()).update(
            top_package(t) for t, _ in targets if top_package(t) != top_package(name))
    cycle = find_cycle(edges)
    assert cycle is None, "package import cycle: " + " -> ".join(cycle)


def test_every_package_has_a_layer():
    """A new package or flat module is placed in LAYERS (and its place said in this file's docstring)."""
    placed = {p for layer in LAYERS for p in layer}
    present = {top_package(name) for name in MODULES} - {""}
    assert present <= placed, f"not in LAYERS: {sorted(present - placed)}"
    assert not placed - present, f"LAYERS names packages that do not exist: {sorted(placed - present)}"


def test_imports_point_down_the_layers():
    rank = {p: i for i, layer in enumerate(LAYERS) for p in layer}
    upward = []
    for name, targets in GRAPH.items():
        src = top_package(name)
        for target, line in targets:
            dst = top_package(target)
            if src and dst != src and rank[dst] <= rank[src]:
                upward.append(f"{MODULES[name].relative_to(PACKAGE.parent)}:{line} imports {target} "
                              f"({dst} is {'beside' if rank[dst] == rank[src] else 'above'} {src})")
    assert not upward, "imports that do not point down the layers:\n" + "\n".join(upward)
