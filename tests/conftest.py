"""Shared test fixtures.

The machine has 2 shared cores: torch and OpenMP read these before their thread pools start;
onnxruntime sessions in tests set intra_op_num_threads explicitly.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Real galaxy images beside the checkout (read-only); missing data fails, never skips."""
    assert SHARED_DATA.is_dir(), f"reference data not found at {SHARED_DATA}"
    return SHARED_DATA
