"""Shared test fixtures.

The machine has 2 shared cores: torch and OpenMP read these before their thread pools start;
onnxruntime sessions in tests set intra_op_num_threads explicitly.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
# Tests compare served answers with fp32 onnxruntime ones to 1e-5; openvino's bf16 engine (which
# `auto` picks on a bf16 CPU where it is installed) is tested on its own in
# tests/core/test_engine_choice.py.
os.environ.setdefault("GALMORPH_ENGINE", "onnxruntime")
# Every openvino load checks parity; tests of its cache set their own folder.
os.environ.setdefault("GALMORPH_PARITY_CACHE", "off")

from tests.support.real_data import REAL_DATA, missing_real_files

if TYPE_CHECKING:
    from tests.support.trained_model import TrainedExport


@pytest.fixture(scope="session", autouse=True)
def synthetic_pretrain_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One session folder for `init_from: synthetic` starting points: each is built once per
    session, and never in the user's ~/.cache."""
    folder = tmp_path_factory.mktemp("synthetic_pretrain_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GALMORPH_PRETRAIN_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="session")
def real_data() -> Path:
    """Real galaxy images carried in the repository (tests/data/README.md); missing data fails."""
    assert (REAL_DATA / "SHA256SUMS").is_file(), f"real test images not found at {REAL_DATA}"
    missing = missing_real_files(REAL_DATA)
    assert not missing, f"real test images missing: {', '.join(map(str, missing))}"
    return REAL_DATA


@pytest.fixture(scope="session")
def trained_export(tmp_path_factory: pytest.TempPathFactory) -> TrainedExport:
    """A tiny model trained on synthetic data, exported calibrated and with its OOD score."""
    import torch

    from tests.support.trained_model import train_and_export

    torch.set_num_threads(1)
    return train_and_export(tmp_path_factory.mktemp("trained_export"))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """How many docs blocks ran and how many are marked not runnable here
    (tests/journeys/test_docs.py)."""
    docs = sys.modules.get("tests.docs_support.blocks")
    if docs is not None and (docs.TALLY.run or docs.TALLY.not_run):
        terminalreporter.write_line(docs.TALLY.summary())
