"""Build the installed `galmorph` layout as a tree of links, for tools that cannot follow
setuptools' package-dir mapping (mypy, editors' static analysis).

    python tools/layout_tree.py [OUT]     default .cache/layout; then OUT/galmorph is the package

The mapping is read from pyproject.toml ([tool.setuptools.package-dir]), the one place it is
stated, so a new part needs no change here. Folders are linked, not files, so a module added
to any part is seen at once; `make install` builds the tree and `make typecheck` checks it.
Setuptools' strict editable mode would build a similar tree, but only of the files present at
install time: a module added later stays invisible until the next install.
"""

from __future__ import annotations

import shutil
import sys
import tomllib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def build(out: Path, root: Path = REPO_ROOT) -> Path:
    """Link `root`'s folders into `out/galmorph` as they are installed; returns the package."""
    mapping = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_dirs: dict[str, str] = mapping.get("package-dir", {})
    package = out / "galmorph"
    if out.exists():
        shutil.rmtree(out)
    package.mkdir(parents=True)
    mapped = {name.removeprefix("galmorph."): folder for name, folder in package_dirs.items()}
    for entry in sorted((root / "galmorph").iterdir()):
        if entry.name != "__pycache__" and entry.name not in mapped:
            (package / entry.name).symlink_to(entry)
    for inner, folder in mapped.items():
        if "." in inner:
            raise SystemExit(f"nested package-dir entries are not supported: galmorph.{inner}")
        (package / inner).symlink_to(root / folder, target_is_directory=True)
    return package


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0]) if args else REPO_ROOT / ".cache" / "layout"
    print(build(out.resolve()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
