"""The numbers docs/architecture.md compares before and after a restructuring, read with `ast`.

    python tools/code_stats.py [ROOT]

Prints modules per folder, the module imports inside the core (arrows), the longest
functions and how many are over 80 lines. Runs on any checkout (e.g. one made with
`git archive REV | tar -x -C DIR`).
"""

from __future__ import annotations

import ast
import sys
from collections import Counter
from pathlib import Path

from tools.import_graph import module_graph, source_files

REPO_ROOT = Path(__file__).resolve().parents[1]


def longest_functions(root: Path, top: int = 8) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for module, path in source_files(root).items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                found.append((length, f"{module}.{node.name}"))
    return sorted(found, reverse=True)[:top]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    root = Path(args[0]).resolve() if args else REPO_ROOT
    files = source_files(root)
    folders = Counter(str(path.parent.relative_to(root)) for path in files.values())
    print("modules per folder:")
    for folder, count in sorted(folders.items()):
        print(f"  {folder}: {count}")
    graph = module_graph(root)
    core_arrows = sum(
        1
        for module, targets in graph.items()
        if module.startswith("galmorph.core")
        for target in targets
        if target.startswith("galmorph.core")
    )
    print(f"imports between core modules: {core_arrows}")
    print("longest functions (lines):")
    lengths = longest_functions(root, top=10_000)
    for length, name in lengths[:8]:
        print(f"  {length:4d}  {name}")
    print(f"functions over 80 lines: {sum(length > 80 for length, _ in lengths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
