"""The real images the project carries: complete, unchanged, and inside the repository."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.support.real_data import REAL_DATA, REPO_ROOT, listed_real_files, missing_real_files


def test_every_listed_file_is_present_and_unchanged() -> None:
    listed = listed_real_files(REAL_DATA)
    assert len(listed) == 26, "20 Galaxy10 images and 6 HST FITS files"
    for path, digest in listed.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, path


def test_the_data_lives_inside_the_repository() -> None:
    assert REAL_DATA.resolve().is_relative_to(REPO_ROOT.resolve())


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "SHA256SUMS").write_text(f"{'0' * 64}  galaxy10-real/gone.jpg\n")
    assert missing_real_files(tmp_path) == [tmp_path / "galaxy10-real" / "gone.jpg"]


@pytest.mark.parametrize(
    "licence", ["MIT-astroNN", "MIT-GalaxyMorphologyClassifier", "BSD-3-Clause-petrofit"]
)
def test_licence_texts_are_carried(licence: str) -> None:
    assert "Copyright" in (REAL_DATA / "licenses" / f"{licence}.txt").read_text()
