"""Imports run one way: a table of layers, a walk over every module of launcher/, cluster/ and
trainer/ with ast, and two tests: no module-level import cycle, no import against the layers.

Also a tool (no pytest needed):
    python3 -m tests.test_architecture --graph [--root DIR]     the arrows between packages and layers
    python3 -m tests.test_architecture --largest [N] [--root DIR]  the N largest functions (lines)
--root reads another checkout, e.g. `git worktree add /tmp/before COMMIT` for a before/after.
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("launcher", "cluster", "trainer")

# Bottom to top. A module belongs to the first layer with a pattern that matches its name.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # Config types, their checks and names, errors, paths, the plan's type, file helpers, the
    # instantiation helper, and pure functions of the config that ranks use too (the corpus
    # description, the derived DeepSpeed config, what changes a trajectory).
    ("base", (
        "launcher", "cluster", "trainer",  # the packages' __init__: docstrings only
        "launcher.errors", "launcher.paths", "launcher.registry", "launcher.rules", "launcher.schema",
        "launcher.plan", "launcher.files", "launcher.targets", "launcher.corpus", "launcher.deepspeed_config",
        "launcher.trajectory", "launcher.options", "launcher.hf_config", "launcher.steps",
    )),
    # Where this process runs (torchrun, SLURM, local) and what the host has: read-only.
    ("environment", ("cluster.environment",)),
    # Planning and the backends (render is pure; start/status/cancel/logs touch the world).
    ("planning", (
        "launcher.compose", "launcher.validate", "launcher.memory", "launcher.planner", "launcher.prepare",
        "launcher.rundir", "launcher.tokenize_step", "cluster.*",
    )),
    # The per-rank program, beside planning: never the CLI, never a backend.
    ("trainer", ("trainer.*",)),
    # The command line on top.
    ("cli", ("launcher.__main__", "launcher.cli", "launcher.start", "launcher.verbs", "launcher.sweep", "launcher.migrate")),
]
MAY_IMPORT: dict[str, set[str]] = {
    "base": {"base"},
    "environment": {"base", "environment"},
    "planning": {"base", "environment", "planning"},
    "trainer": {"base", "environment", "trainer"},
    "cli": {"base", "environment", "planning", "trainer", "cli"},
}


def layer_of(module: str) -> str:
    for name, patterns in LAYERS:
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return name
    raise AssertionError(f"{module} is in no layer of tests/test_architecture.py LAYERS; add it where it belongs")


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the three packages, by dotted name (a package by its own name)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports(path: Path, name: str, known: set[str], *, deferred: bool) -> set[str]:
    """The project modules `name` imports: at module level (deferred=False: the top-level
    statements, `if`/`try` blocks included, not `if TYPE_CHECKING:`), or inside functions
    (deferred=True). `from x import y` counts x.y when that is a module, else x."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def walk(nodes: list[ast.stmt], in_function: bool) -> set[str]:
        out: set[str] = set()
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out |= walk(node.body, True)
            elif isinstance(node, ast.ClassDef):
                out |= walk(node.body, in_function)
            elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue  # annotations only
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                if in_function != deferred:
                    continue
                if isinstance(node, ast.Import):
                    targets = [a.name for a in node.names]
                else:
                    base = node.module or ""
                    if node.level:
                        base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                    targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
                for target in targets:
                    while target and target not in known:
                        target = target.rpartition(".")[0]
                    if target and target != name:
                        out.add(target)
            else:
                for field in ("body", "orelse", "finalbody", "handlers"):
                    block = getattr(node, field, None)
                    if isinstance(block, list):
                        out |= walk([n for n in block if isinstance(n, ast.stmt)] + [s for h in block if isinstance(h, ast.ExceptHandler) for s in h.body], in_function)
        return out

    return walk(tree.body, False)


def graph(root: Path = ROOT, *, deferred: bool = False) -> dict[str, set[str]]:
    found = modules(root)
    known = set(found)
    return {name: imports(path, name, known, deferred=deferred) for name, path in found.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
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
                out.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def violations(edges: dict[str, set[str]]) -> list[str]:
    return [
        f"{a} ({layer_of(a)}) imports {b} ({layer_of(b)})"
        for a in sorted(edges) for b in sorted(edges[a])
        if layer_of(b) not in MAY_IMPORT[layer_of(a)]
    ]


def test_every_module_has_a_layer() -> None:
    for name in modules():
        layer_of(name)


def test_no_module_level_import_cycle() -> None:
    assert cycles(graph()) == []


def test_no_import_cycle_even_inside_functions() -> None:
    """A deferred import keeps a module cheap to load; it must not hide a cycle (the CLI, sweeps
    and verbs once imported each other that way)."""
    module_level, deferred = graph(), graph(deferred=True)
    assert cycles({m: module_level[m] | deferred[m] for m in module_level}) == []


def test_imports_follow_the_layers() -> None:
    assert violations(graph()) == []


def test_the_trainer_never_imports_the_cli_or_a_backend() -> None:
    """Not even inside a function: a rank has no business with submission code."""
    edges = graph(deferred=True)
    bad = [f"{a} -> {b}" for a in edges if a.startswith("trainer") for b in edges[a] if layer_of(b) in ("cli", "planning")]
    assert bad == []


# -- the tool ----------------------------------------------------------------------------------------


def package_arrows(edges: dict[str, set[str]], key) -> Counter:
    arrows: Counter = Counter()
    for a, targets in edges.items():
        for b in targets:
            if key(a) != key(b):
                arrows[(key(a), key(b))] += 1
    return arrows


def print_graph(root: Path) -> None:
    for title, deferred in (("module-level imports", False), ("imports inside functions", True)):
        edges = graph(root, deferred=deferred)
        print(f"== {title}: {len(edges)} modules, {sum(map(len, edges.values()))} imports")
        for (a, b), n in sorted(package_arrows(edges, lambda m: m.split(".")[0]).items()):
            print(f"  package {a} -> {b}: {n}")
        try:
            for (a, b), n in sorted(package_arrows(edges, layer_of).items()):
                print(f"  layer {a} -> {b}: {n}" + ("" if b in MAY_IMPORT[a] else "   AGAINST THE LAYERS"))
            for line in violations(edges):
                print(f"  against the layers: {line}")
        except AssertionError as exc:
            print(f"  (layers not applicable to this tree: {exc})")
        for component in cycles(edges):
            print(f"  cycle: {' <-> '.join(component)}")


def largest_functions(root: Path, count: int) -> list[tuple[int, str]]:
    sizes = []
    for name, path in modules(root).items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                sizes.append((node.end_lineno - node.lineno + 1, f"{name}.{node.name}"))
    return sorted(sizes, reverse=True)[:count]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graph", action="store_true")
    parser.add_argument("--largest", type=int, nargs="?", const=10)
    parser.add_argument("--root", type=Path, default=ROOT)
    args = parser.parse_args(argv)
    if args.graph:
        print_graph(args.root)
    if args.largest:
        for lines, name in largest_functions(args.root, args.largest):
            print(f"{lines:5d}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
