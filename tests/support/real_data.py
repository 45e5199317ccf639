"""Where the real test images live, and which of them are missing."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parents[2]
REAL_DATA = REPO_ROOT / "tests" / "data"


def listed_real_files(root: Path) -> dict[Path, str]:
    """Every file `root/SHA256SUMS` lists, with its expected SHA-256."""
    rows = (line.split(maxsplit=1) for line in (root / "SHA256SUMS").read_text().splitlines())
    return {root / name: digest for digest, name in rows}


def missing_real_files(root: Path) -> list[Path]:
    return [path for path in listed_real_files(root) if not path.is_file()]


def build_real_sets_module() -> ModuleType:
    """scripts/real_data/build_real_sets.py (a tool, not a package module)."""
    path = REPO_ROOT / "scripts" / "real_data" / "build_real_sets.py"
    spec = importlib.util.spec_from_file_location("build_real_sets", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
