"""Who imports whom among galmorph's parts, read from the source with `ast` (nothing imported).

    python tools/import_graph.py [ROOT]          package graph: edges with the modules behind them
    python tools/import_graph.py [ROOT] --core   the same one level down, among core's sub-packages
    python tools/import_graph.py [ROOT] --json   the same as JSON

Every import counts, including the ones inside functions: a lazy import is still a dependency.
Parts are the installed packages: core, model, training, service, scoring, api (the Python API),
and `galmorph` for the root modules (cli, demo). Old trees with top-level
`service`/`model`/`training` packages are
read the same way, so the graph before and after a move can be compared.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

PARTS = ("core", "model", "training", "service", "scoring", "api", "similarity")
# Folders that hold each part's modules, relative to the repository root.
PART_FOLDERS = {
    "core": "galmorph/core",
    "model": "model",
    "training": "training",
    "service": "service",
    "scoring": "scoring",
    "api": "galmorph/api",
    "similarity": "galmorph/similarity",
}
CORE_PACKAGES = ("cutouts", "sky", "data", "modelfile")
EXTERNAL_WATCHED = ("torch",)


def part_of_module(name: str) -> str | None:
    """The part an imported module name belongs to, for the new and the old layouts alike."""
    parts = name.split(".")
    if parts[0] == "galmorph":
        return parts[1] if len(parts) > 1 and parts[1] in PARTS else "galmorph"
    if parts[0] in PARTS:
        return parts[0]
    return parts[0] if parts[0] in EXTERNAL_WATCHED else None


def core_package_of_module(name: str) -> str | None:
    """`core.cutouts` for galmorph.core.cutouts.decode; `core` for core's own modules (files,
    version); None outside the core."""
    parts = name.split(".")
    if parts[:2] != ["galmorph", "core"]:
        return None
    return f"core.{parts[2]}" if len(parts) > 2 and parts[2] in CORE_PACKAGES else "core"


def module_name(root: Path, path: Path) -> str:
    relative = path.relative_to(root).with_suffix("")
    for part, folder in PART_FOLDERS.items():
        if relative.is_relative_to(folder):
            inner = relative.relative_to(folder).parts
            return ".".join(("galmorph", part, *inner)).removesuffix(".__init__")
    return ".".join(relative.parts).removesuffix(".__init__")


def source_files(root: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for folder in ("galmorph", *PART_FOLDERS.values()):
        for path in sorted((root / folder).rglob("*.py")) if (root / folder).is_dir() else []:
            files.setdefault(module_name(root, path), path)
    return files


def imports_of(path: Path, module: str) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved)."""
    names: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def module_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the project modules (and watched externals) it imports."""
    files = source_files(root)
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        targets = set()
        for name in imports_of(path, module):
            normalised = module_name_for_import(name)
            if normalised in files and normalised != module:
                targets.add(normalised)
            elif name.split(".")[0] in EXTERNAL_WATCHED:
                targets.add(name.split(".")[0])
        graph[module] = targets
    return graph


def module_name_for_import(name: str) -> str:
    """`service.engine` (old layout) and `galmorph.service.engine` name the same module."""
    first = name.split(".")[0]
    return f"galmorph.{name}" if first in PARTS else name


def part_graph(
    graph: dict[str, set[str]], part_of: Callable[[str], str | None] = part_of_module
) -> dict[tuple[str, str], list[str]]:
    """(importer part, imported part) -> the module edges behind it."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for module, targets in graph.items():
        source = part_of(module)
        for target in sorted(targets):
            imported = part_of(target)
            if source and imported and imported != source:
                edges[(source, imported)].append(f"{module} -> {target}")
    return dict(edges)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", nargs="?", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument(
        "--core", action="store_true", help="the graph among core's sub-packages instead"
    )
    args = parser.parse_args(argv)
    graph = module_graph(args.root)
    edges = part_graph(graph, core_package_of_module if args.core else part_of_module)
    package_cycles = cycles({a: {b for (x, b) in edges if x == a} for (a, _) in edges})
    module_cycles = cycles(graph)
    if args.json:
        print(
            json.dumps(
                {
                    "edges": {f"{a} -> {b}": mods for (a, b), mods in sorted(edges.items())},
                    "package_cycles": package_cycles,
                    "module_cycles": module_cycles,
                },
                indent=2,
            )
        )
        return 0
    for (source, target), modules in sorted(edges.items()):
        print(f"{source} -> {target}  ({len(modules)} imports)")
    print(f"package cycles: {package_cycles or 'none'}")
    print(f"module cycles: {module_cycles or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
