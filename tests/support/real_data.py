"""Where the real test images live, and which of them are missing."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
REAL_DATA = REPO_ROOT / "tests" / "data"


def listed_real_files(root: Path) -> dict[Path, str]:
    """Every file `root/SHA256SUMS` lists, with its expected SHA-256."""
    rows = (line.split(maxsplit=1) for line in (root / "SHA256SUMS").read_text().splitlines())
    return {root / name: digest for digest, name in rows}


def missing_real_files(root: Path) -> list[Path]:
    return [path for path in listed_real_files(root) if not path.is_file()]
