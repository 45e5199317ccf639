"""scripts/real_data/build_real_sets.py: gz2-sdss-all, read from a repository's history."""

from __future__ import annotations

import subprocess
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from galmorph.core.data.galaxy10 import Galaxy10File
from tests.support.real_data import build_real_sets_module

BRIGHT, DARK = 200, 50  # spirals/ images are bright, non_spirals/ dark, so a label can be checked


def _git(repo: Path, *args: str) -> None:
    identity = ("-c", "user.name=test", "-c", "user.email=test@example.org")
    subprocess.run(["git", "-C", str(repo), *identity, *args], check=True, capture_output=True)


def _save(repo: Path, folder: str, galaxy: int, shade: int, quality: int = 90) -> None:
    target = repo / "data" / folder
    target.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (424, 424), (shade, shade, shade))
    image.save(target / f"{galaxy}.jpg", quality=quality)


def _cosmic_like_history(repo: Path) -> None:
    """As Cosmic-Compendium did: every labelled image first, then a 2-folder split of a few.

    Galaxy 6 sits under both labels (once each) and must be dropped; galaxies 2 and 4 are in
    the validation split, so they belong to the test file and never to gz2-sdss-all's train file.
    """
    repo.mkdir()
    _git(repo, "init", "-q")
    for galaxy, folder, shade in (
        (1, "spirals", BRIGHT),
        (2, "spirals", BRIGHT),
        (6, "spirals", BRIGHT),
        (3, "non_spirals", DARK),
        (4, "non_spirals", DARK),
        (5, "non_spirals", DARK),
    ):
        _save(repo, folder, galaxy, shade)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "all labelled images")
    _git(repo, "rm", "-q", "-r", "data/spirals", "data/non_spirals")
    # Re-encoded (another blob, same galaxy): must still give one row.
    _save(repo, "galaxies/train/spirals", 1, BRIGHT, quality=70)
    _save(repo, "galaxies/train/non_spirals", 3, DARK)
    _save(repo, "galaxies/train/non_spirals", 6, DARK)
    _save(repo, "galaxies/validation/spirals", 2, BRIGHT)
    _save(repo, "galaxies/validation/non_spirals", 4, DARK)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "keep a split")


def test_gz2_all_takes_every_labelled_image_of_the_history_but_the_test_split(
    tmp_path: Path,
) -> None:
    repo = tmp_path / "cosmic"
    _cosmic_like_history(repo)
    bare = tmp_path / "cosmic.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(repo), str(bare)], check=True)
    build = build_real_sets_module()
    for source, out in ((repo, tmp_path / "from_tree"), (bare, tmp_path / "from_bare")):
        assert build.main(["--cosmic-compendium", str(source), "--out", str(out)]) == 0
        data = Galaxy10File(out / "gz2_sdss_all_train.h5")
        with h5py.File(out / "gz2_sdss_all_train.h5", "r") as handle:
            galaxies = [Path(p).stem for p in handle["source_id"].asstr()[()]]
            assert handle["source"].asstr()[0] == "gz2-sdss-all"
        assert galaxies == ["1", "3", "5"]  # not 2 or 4 (test split), not 6 (both labels)
        assert data.class_names == ("non-spiral", "spiral")
        bright = data.images(np.arange(3)).reshape(3, -1).mean(1) > 128
        assert (bright == (data.labels == 1)).all()
        assert data.labels.tolist() == [1, 0, 0]
        assert Galaxy10File(out / "gz2_sdss_test.h5").num_images == 2


def test_gz2_all_is_skipped_for_a_folder_without_git_history(tmp_path: Path) -> None:
    repo = tmp_path / "cosmic"
    for split in ("train", "validation"):
        _save(repo, f"galaxies/{split}/spirals", 1, BRIGHT)
        _save(repo, f"galaxies/{split}/non_spirals", 2, DARK)
    build = build_real_sets_module()
    assert build.main(["--cosmic-compendium", str(repo), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "gz2_sdss_train.h5").exists()
    assert not (tmp_path / "out" / "gz2_sdss_all_train.h5").exists()
