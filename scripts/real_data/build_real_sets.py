"""Build Galaxy10-layout HDF5 files of real labelled galaxies for tuning the small-data recipe.

Not shipped with galmorph: a tool for the benchmark (benchmarks/bench_small_data.py --real)
and for anyone re-checking it. docs/real_data.md says where each source comes from, its
licence, and how its labels map onto the classes written here.

Sources (each writes its own files; a source whose input is missing is skipped, said so):

- gz2-sdss: 2,000 SDSS colour cutouts of the Galaxy Zoo 2 Kaggle challenge (424 px JPEG),
  sorted into `spirals/` and `non_spirals/` by the GitHub repository isi-mube/Cosmic-Compendium
  (its own 1,400-image train and 600-image validation folders). Written as a 2-class
  train/test pair: `gz2_sdss_train.h5` (1,400 rows) and `gz2_sdss_test.h5` (600 rows).
- gz2-sdss-all: the same repository's earlier commits hold every image its notebook labelled
  (6,507: 1,549 spirals and 4,958 non-spirals; the last commit keeps 2,000). Written as
  `gz2_sdss_all_train.h5`: all of them except the 600 galaxies of `gz2_sdss_test.h5`, so that
  file stays the test file of both sources. Needs the repository with its history (a full
  clone or a bare git directory).
- galaxy10-decals: the 20 Galaxy10 DECaLS images that galmorph carries in tests/data,
  merged into the 4 classes of the outside benchmark (elliptical, spiral, edge-on, merger):
  `galaxy10_decals_4class.h5`, a cross-survey test file only (far too small to train on).

Every row records where it came from: `source` (the source's name), `source_id` (the file
path in that source) and the file attributes `licence`, `origin` and `class_mapping`.

    git clone https://github.com/isi-mube/Cosmic-Compendium /tmp/cosmic   # or a bare mirror
    .venv/bin/python scripts/real_data/build_real_sets.py --cosmic-compendium /tmp/cosmic \
        --out /work/data/real --size 128
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[2]
CARRIED_GALAXY10 = REPO_ROOT / "tests" / "data" / "galaxy10-real"

GZ2_CLASSES = ("non-spiral", "spiral")
GZ2_FOLDERS = {"non_spirals": 0, "spirals": 1}
GZ2_ORIGIN = (
    "GitHub isi-mube/Cosmic-Compendium, data/galaxies/{train,validation}/{spirals,non_spirals}: "
    "Galaxy Zoo 2 Kaggle challenge images (SDSS DR7 gri colour composites, 424x424 JPEG)"
)
GZ2_LICENCE = (
    "No licence file in the repository. Images: SDSS (DR7), whose image policy allows any "
    "use with acknowledgement; labels: Galaxy Zoo 2 vote fractions (Willett et al. 2013). "
    "Used here to measure, never redistributed."
)
GZ2_MAPPING = {
    "spiral": "the repository's spirals/: Class1.2 > 0.5 and Class4.1 > 0.5 and Class6.1 > 0.5 "
    "(featured, spiral arms, and - by the challenge's column names - 'something odd')",
    "non-spiral": "the repository's non_spirals/: every other galaxy (smooth, edge-on, and "
    "featured galaxies that missed one of the three thresholds)",
}
GZ2_ALL_ORIGIN = (
    "GitHub isi-mube/Cosmic-Compendium, every {spirals,non_spirals}/ image of its git history "
    "(data/spirals, data/non_spirals, data/galaxies/...), less the 600 of data/galaxies/validation"
)
# The Kaggle cutouts frame a galaxy in the central ~half of 424 px (Galaxy10 SDSS crops 207).
GZ2_CROP = 212

DECALS_CLASSES = ("elliptical", "spiral", "edge-on", "merger")
# Galaxy10 DECaLS label -> 4-class label (as the synthetic low-data benchmark merges them).
DECALS_TO_FOUR = {0: 3, 1: 3, 2: 0, 3: 0, 4: 0, 5: 1, 6: 1, 7: 1, 8: 2, 9: 2}
DECALS_ORIGIN = (
    "galmorph tests/data/galaxy10-real (from GitHub Shy4n7/GalaxyMorphologyClassifier and "
    "henrysky/astroNN): 20 Galaxy10 DECaLS images, 2 per Galaxy10 class"
)
DECALS_LICENCE = "MIT (both repositories; texts in tests/data/licenses/)"
DECALS_MAPPING = {
    "elliptical": "Galaxy10 2 round smooth, 3 in-between round smooth, 4 cigar-shaped smooth",
    "spiral": "Galaxy10 5 barred spiral, 6 unbarred tight spiral, 7 unbarred loose spiral",
    "edge-on": "Galaxy10 8 edge-on without bulge, 9 edge-on with bulge",
    "merger": "Galaxy10 0 disturbed, 1 merging",
}


@dataclass(frozen=True)
class Row:
    image: np.ndarray  # uint8 (size, size, 3)
    label: int
    source_id: str


@dataclass(frozen=True)
class SetInfo:
    source: str
    class_names: tuple[str, ...]
    origin: str
    licence: str
    mapping: dict[str, str]


def to_square(image: Image.Image, size: int, crop: int | None = None) -> np.ndarray:
    """RGB uint8 size x size: centre crop (when `crop` is given), then an antialiased resize."""
    image = image.convert("RGB")
    if crop is not None and min(image.size) > crop:
        left = (image.width - crop) // 2
        top = (image.height - crop) // 2
        image = image.crop((left, top, left + crop, top + crop))
    return np.asarray(image.resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)


def write_set(path: Path, rows: Sequence[Row], info: SetInfo) -> Path:
    """A Galaxy10-layout file (`images`, `ans`, `class_names`) with each row's provenance."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.h5")
    with h5py.File(tmp, "w") as handle:
        handle.create_dataset("images", data=np.stack([r.image for r in rows]))
        handle.create_dataset("ans", data=np.asarray([r.label for r in rows], np.uint8))
        text = h5py.string_dtype()
        handle.create_dataset("source", data=[info.source] * len(rows), dtype=text)
        handle.create_dataset("source_id", data=[r.source_id for r in rows], dtype=text)
        handle.attrs["class_names"] = list(info.class_names)
        handle.attrs["origin"] = info.origin
        handle.attrs["licence"] = info.licence
        handle.attrs["class_mapping"] = json.dumps(info.mapping)
        handle.attrs["generator"] = "scripts/real_data/build_real_sets.py"
    tmp.replace(path)  # a build that stops half-way leaves no file that looks finished
    return path


class TreeReader:
    """Files of a repository given as a work tree or as a bare git directory (`fetch`)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bare = not (root / "data").is_dir() and (root / "HEAD").is_file()
        self.git_dir = root if self.bare else root / ".git"
        self.has_history = self.bare or self.git_dir.exists()

    def list(self, folder: str) -> list[str]:
        if not self.bare:
            return sorted(
                str(p.relative_to(self.root)) for p in (self.root / folder).glob("*") if p.is_file()
            )
        listing = self._git("ls-tree", "-r", "--name-only", "HEAD", folder + "/")
        return sorted(listing.decode().split())

    def read(self, path: str) -> bytes:
        return (
            (self.root / path).read_bytes() if not self.bare else self._git("show", f"HEAD:{path}")
        )

    def history(self) -> dict[str, str]:
        """Path -> blob id of every file of every commit (a path changed later keeps one blob).

        Commit by commit, not `rev-list --objects`: that names each blob once, under one path,
        so two files with the same bytes would be one.
        """
        files: dict[str, str] = {}
        for commit in self._git("rev-list", "--all").decode().split():
            for entry in self._git("ls-tree", "-r", "-z", commit).decode().split("\0"):
                if not entry:
                    continue
                meta, path = entry.split("\t", 1)  # <mode> <type> <id>\t<path>, unquoted (-z)
                _mode, kind, blob = meta.split()
                if kind == "blob":
                    files.setdefault(path, blob)
        return files

    def read_blobs(self, blob_ids: Sequence[str]) -> Iterator[bytes]:
        """The blobs' contents in order, from one `git cat-file --batch` (not one git a file)."""
        request = "".join(f"{blob}\n" for blob in blob_ids).encode()
        answer = io.BytesIO(self._git("cat-file", "--batch", stdin=request))
        for _ in blob_ids:
            header = answer.readline().split()  # <id> blob <size>, or <id> missing
            if len(header) != 3:
                raise SystemExit(f"{self.root}: git object {header[0].decode()} is missing")
            yield answer.read(int(header[2]))
            answer.readline()

    def _git(self, *args: str, stdin: bytes | None = None) -> bytes:
        return subprocess.run(
            ["git", "--git-dir", str(self.git_dir), *args],
            check=True,
            capture_output=True,
            input=stdin,
        ).stdout


def gz2_rows(reader: TreeReader, split: str, size: int) -> Iterator[Row]:
    for folder, label in GZ2_FOLDERS.items():
        for path in reader.list(f"data/galaxies/{split}/{folder}"):
            if path.lower().endswith(".jpg"):
                image = Image.open(io.BytesIO(reader.read(path)))
                yield Row(to_square(image, size, GZ2_CROP), label, path)


def build_gz2(repo: Path, out: Path, size: int) -> list[Path]:
    reader = TreeReader(repo)
    info = SetInfo("gz2-sdss", GZ2_CLASSES, GZ2_ORIGIN, GZ2_LICENCE, GZ2_MAPPING)
    written = []
    for split, name in (("train", "gz2_sdss_train.h5"), ("validation", "gz2_sdss_test.h5")):
        rows = list(gz2_rows(reader, split, size))
        if not rows:
            raise SystemExit(f"{repo}: no images under data/galaxies/{split}/")
        written.append(write_set(out / name, rows, info))
    return written


def gz2_history_labels(reader: TreeReader) -> dict[str, tuple[int, str, str]]:
    """GalaxyID -> (label, blob id, path) for every image ever under a spirals/non_spirals folder.

    A galaxy's image was committed under several paths (and re-encoded, same pixels) as the
    repository was reorganised; the folder name is its label wherever it sits. A galaxy found
    under both labels would be dropped (none is, in the repository's history).
    """
    found: dict[str, tuple[int, str, str]] = {}
    clashing: set[str] = set()
    for path, blob in sorted(reader.history().items()):
        label = GZ2_FOLDERS.get(Path(path).parent.name)
        if label is None or not path.lower().endswith(".jpg"):
            continue
        galaxy = Path(path).stem
        if galaxy in found and found[galaxy][0] != label:
            clashing.add(galaxy)
        found.setdefault(galaxy, (label, blob, path))
    return {galaxy: entry for galaxy, entry in found.items() if galaxy not in clashing}


def build_gz2_all(repo: Path, out: Path, size: int) -> list[Path]:
    reader = TreeReader(repo)
    held_out = {
        Path(path).stem
        for folder in GZ2_FOLDERS
        for path in reader.list(f"data/galaxies/validation/{folder}")
    }
    labels = gz2_history_labels(reader)
    kept = sorted((g for g in labels if g not in held_out), key=int)
    if not kept:
        raise SystemExit(f"{repo}: no labelled images in its git history")
    blobs = reader.read_blobs([labels[g][1] for g in kept])
    rows = [
        Row(to_square(Image.open(io.BytesIO(data)), size, GZ2_CROP), labels[g][0], labels[g][2])
        for g, data in zip(kept, blobs, strict=True)
    ]
    info = SetInfo("gz2-sdss-all", GZ2_CLASSES, GZ2_ALL_ORIGIN, GZ2_LICENCE, GZ2_MAPPING)
    return [write_set(out / "gz2_sdss_all_train.h5", rows, info)]


def decals_rows(folder: Path, size: int) -> Iterator[Row]:
    """The carried images are named sample_{k}_{Name}.jpg (label k-1) or class{c}_{Name}.png."""
    for path in sorted(folder.iterdir()):
        stem = path.stem
        if stem.startswith("sample_"):
            label = int(stem.split("_")[1]) - 1
        elif stem.startswith("class"):
            label = int(stem[len("class") :].split("_")[0])
        else:
            continue
        with Image.open(path) as image:
            yield Row(to_square(image, size), DECALS_TO_FOUR[label], f"tests/data/{path.name}")


def build_decals(out: Path, size: int) -> list[Path]:
    info = SetInfo("galaxy10-decals", DECALS_CLASSES, DECALS_ORIGIN, DECALS_LICENCE, DECALS_MAPPING)
    rows = list(decals_rows(CARRIED_GALAXY10, size))
    return [write_set(out / "galaxy10_decals_4class.h5", rows, info)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cosmic-compendium",
        type=Path,
        help="isi-mube/Cosmic-Compendium as a clone or a bare git directory (else skipped)",
    )
    parser.add_argument("--out", type=Path, default=Path("/work/data/real"))
    parser.add_argument("--size", type=int, default=128, help="image size written (px)")
    args = parser.parse_args(argv)
    if args.size < 16:
        parser.error("--size must be at least 16")
    written = build_decals(args.out, args.size)
    if args.cosmic_compendium is None:
        print("gz2-sdss skipped: give --cosmic-compendium", file=sys.stderr)
    else:
        written += build_gz2(args.cosmic_compendium, args.out, args.size)
        if TreeReader(args.cosmic_compendium).has_history:
            written += build_gz2_all(args.cosmic_compendium, args.out, args.size)
        else:
            print("gz2-sdss-all skipped: --cosmic-compendium has no git history", file=sys.stderr)
    for path in written:
        with h5py.File(path, "r") as handle:
            counts = np.bincount(handle["ans"][()], minlength=len(handle.attrs["class_names"]))
            names = list(handle.attrs["class_names"])
        print(f"{path}: {dict(zip(names, counts.tolist(), strict=True))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
