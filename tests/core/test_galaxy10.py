"""Galaxy10-layout reader: validation, lazy access, DataLoader workers, CLI inspect."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from galmorph.cli import main
from galmorph.core.data.galaxy10 import GALAXY10_CLASS_NAMES, Galaxy10Error, Galaxy10File


def write_file(
    path: Path,
    *,
    n: int = 12,
    size: int = 8,
    labels: np.ndarray | None = None,
    images: np.ndarray | None = None,
    class_names: list[str] | None = None,
    columns: dict[str, np.ndarray] | None = None,
) -> Path:
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as handle:
        handle["images"] = (
            images if images is not None else rng.integers(0, 256, (n, size, size, 3), np.uint8)
        )
        handle["ans"] = labels if labels is not None else np.arange(n) % 10
        for name, values in (columns or {}).items():
            handle[name] = values
        if class_names is not None:
            handle.attrs["class_names"] = class_names
    return path


def test_reads_layout_and_columns(tmp_path: Path) -> None:
    path = write_file(
        tmp_path / "g.h5", columns={"ra": np.linspace(0, 1, 12), "pxscale": np.full(12, 0.262)}
    )
    with Galaxy10File(path) as data:
        assert data.num_images == 12 and len(data) == 12
        assert data.image_shape == (8, 8, 3)
        assert data.class_names == GALAXY10_CLASS_NAMES and data.num_classes == 10
        assert data.labels.dtype == np.int64
        np.testing.assert_array_equal(data.labels, np.arange(12) % 10)
        assert data.columns == ("ra", "pxscale")
        ra = data.column("ra")
        assert ra is not None
        np.testing.assert_allclose(ra, np.linspace(0.0, 1.0, 12))
        assert data.column("dec") is None
        with h5py.File(path, "r") as raw:
            expected = raw["images"][()]
        np.testing.assert_array_equal(data.image(3), expected[3])
        order = [7, 2, 2, 11, 0, 1]
        np.testing.assert_array_equal(data.images(order), expected[order])
        assert data.images([]).shape == (0, 8, 8, 3)
        with pytest.raises(IndexError):
            data.image(12)
        with pytest.raises(IndexError):
            data.images([0, -1])


def test_class_names_attribute_allows_any_k(tmp_path: Path) -> None:
    path = write_file(tmp_path / "k3.h5", n=9, labels=np.arange(9) % 3, class_names=["a", "b", "c"])
    data = Galaxy10File(path)
    assert data.class_names == ("a", "b", "c") and data.num_classes == 3
    np.testing.assert_array_equal(data.class_counts(), [3, 3, 3])
    path = write_file(
        tmp_path / "k3bad.h5", n=4, labels=np.array([0, 1, 2, 3]), class_names=["a", "b", "c"]
    )
    with pytest.raises(Galaxy10Error, match=r"outside 0\.\.2"):
        Galaxy10File(path)


def malformed(tmp_path: Path, case: str) -> Path:
    path = tmp_path / f"{case}.h5"
    rng = np.random.default_rng(1)
    good = rng.integers(0, 256, (4, 8, 8, 3), np.uint8)
    with h5py.File(path, "w") as handle:
        if case == "no_images":
            handle["ans"] = np.zeros(4, np.uint8)
        elif case == "no_labels":
            handle["images"] = good
        elif case == "float_images":
            handle["images"] = good.astype(np.float32)
            handle["ans"] = np.zeros(4, np.uint8)
        elif case == "rank3_images":
            handle["images"] = good[..., 0]
            handle["ans"] = np.zeros(4, np.uint8)
        elif case == "four_channels":
            handle["images"] = np.zeros((4, 8, 8, 4), np.uint8)
            handle["ans"] = np.zeros(4, np.uint8)
        elif case == "float_labels":
            handle["images"] = good
            handle["ans"] = np.zeros(4, np.float64)
        elif case == "label_2d":
            handle["images"] = good
            handle["ans"] = np.zeros((4, 1), np.int64)
        elif case == "label_10":
            handle["images"] = good
            handle["ans"] = np.array([0, 1, 10, 2])
        elif case == "negative_label":
            handle["images"] = good
            handle["ans"] = np.array([0, -1, 2, 3])
        elif case == "length_mismatch":
            handle["images"] = good
            handle["ans"] = np.zeros(5, np.uint8)
        elif case == "empty":
            handle["images"] = np.zeros((0, 8, 8, 3), np.uint8)
            handle["ans"] = np.zeros(0, np.uint8)
        elif case == "bad_column":
            handle["images"] = good
            handle["ans"] = np.zeros(4, np.uint8)
            handle["ra"] = np.zeros(3)
        elif case == "group_images":
            handle.create_group("images")
            handle["ans"] = np.zeros(4, np.uint8)
    return path


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no_images", "missing dataset 'images'"),
        ("no_labels", "missing dataset 'ans'"),
        ("float_images", "must be uint8"),
        ("rank3_images", r"shape \(N, H, W, 3\)"),
        ("four_channels", r"shape \(N, H, W, 3\)"),
        ("float_labels", "integer class ids"),
        ("label_2d", "must be 1-D"),
        ("label_10", r"outside 0\.\.9.*class_names"),
        ("negative_label", r"outside 0\.\.9 \(first at row 1: -1\)"),
        ("length_mismatch", "4 images but 5 labels"),
        ("empty", "empty"),
        ("bad_column", "column 'ra'"),
        ("group_images", "is a group"),
    ],
)
def test_malformed_files_raise_clear_errors(tmp_path: Path, case: str, message: str) -> None:
    with pytest.raises(Galaxy10Error, match=message):
        Galaxy10File(malformed(tmp_path, case))


def test_not_hdf5(tmp_path: Path) -> None:
    text = tmp_path / "fake.h5"
    text.write_text("images,ans\n1,2\n")
    with pytest.raises(Galaxy10Error, match="not an HDF5 file"):
        Galaxy10File(text)
    with pytest.raises(Galaxy10Error, match="no such file"):
        Galaxy10File(tmp_path / "missing.h5")


def test_huge_sparse_file_is_read_lazily(tmp_path: Path) -> None:
    """A 200 GB virtual images dataset (unwritten chunks): reading it whole would fail."""
    path = tmp_path / "huge.h5"
    n = 1_000_000
    with h5py.File(path, "w") as handle:
        images = handle.create_dataset(
            "images", (n, 256, 256, 3), np.uint8, chunks=(1, 256, 256, 3)
        )
        images[123_456] = 7
        handle["ans"] = np.arange(n, dtype=np.int64) % 10
    assert path.stat().st_size < 50_000_000
    data = Galaxy10File(path)
    assert data.num_images == n
    assert int(data.image(123_456).min()) == 7
    batch = data.images([5, 123_456, 999_999])
    assert batch.shape == (3, 256, 256, 3)
    assert batch[1].min() == 7 and batch[0].max() == 0
    fingerprint = data.fingerprint()
    assert fingerprint["num_images"] == n


def test_fingerprint_is_stable_and_content_sensitive(tmp_path: Path) -> None:
    a = Galaxy10File(write_file(tmp_path / "a.h5")).fingerprint()
    copy = tmp_path / "renamed.h5"
    copy.write_bytes((tmp_path / "a.h5").read_bytes())
    b = Galaxy10File(copy).fingerprint()
    assert a["digest"] == b["digest"] and a["file_name"] != b["file_name"]
    labels = np.arange(12) % 10
    labels[0] = 9
    c = Galaxy10File(write_file(tmp_path / "c.h5", labels=labels)).fingerprint()
    assert c["digest"] != a["digest"] and c["labels_sha256"] != a["labels_sha256"]


class _TorchView(torch.utils.data.Dataset):
    def __init__(self, data: Galaxy10File) -> None:
        self.data = data

    def __len__(self) -> int:
        return self.data.num_images

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.data.image(index)), int(self.data.labels[index])


@pytest.mark.parametrize("context", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_works_in_dataloader_workers(tmp_path: Path, context: str) -> None:
    torch.set_num_threads(1)
    path = write_file(tmp_path / "dl.h5", n=16)
    data = Galaxy10File(path)
    data.image(0)  # the parent holds an open handle when the workers fork
    loader = torch.utils.data.DataLoader(
        _TorchView(data), batch_size=4, num_workers=2, multiprocessing_context=context
    )
    batches = list(loader)
    images = torch.cat([batch for batch, _ in batches])
    labels = torch.cat([label for _, label in batches])
    np.testing.assert_array_equal(images.numpy(), data.images(range(16)))
    np.testing.assert_array_equal(labels.numpy(), data.labels)
    assert data.image(3).shape == (8, 8, 3)  # the parent's handle still works


def test_cli_inspect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_file(
        tmp_path / "i.h5", n=20, size=16, columns={"redshift": np.linspace(0.01, 0.1, 20)}
    )
    sheet = tmp_path / "sheet.png"
    assert main(["data", "inspect", str(path), "--out", str(sheet), "--per-class", "2"]) == 0
    out = capsys.readouterr().out
    assert "Unbarred Loose Spiral" in out and "(20, 16, 16, 3)" in out
    assert "redshift:" in out and "dec:" in out and "absent" in out
    with Image.open(sheet) as image:
        assert image.width >= 2 * 128 and image.height > 10 * 128
    bad = tmp_path / "bad.h5"
    bad.write_text("nope")
    assert main(["data", "inspect", str(bad)]) == 2
    assert "not an HDF5 file" in capsys.readouterr().err
