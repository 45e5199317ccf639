"""The cutout format registry (galmorph.core.cutouts.formats) and everything that lists formats
from it."""

from __future__ import annotations

import argparse
import io
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from galmorph.core.cutouts import formats
from galmorph.core.cutouts.decode import CutoutError, decode_cutout, sniff_format
from galmorph.core.cutouts.formats import CutoutFormat, Reader
from galmorph.core.cutouts.limits import CutoutErrorKind
from galmorph.core.inputspec import InputSpec
from galmorph.scoring.catalog import CatalogError, CatalogOptions, FileListCatalog
from galmorph.service import cli as service_cli
from galmorph.service.app import create_app
from tests.support.app_client import settings_for, wait_for
from tests.support.cutout_factory import make_grz_fits, make_jpeg, make_png
from tests.support.onnx_factory import write_model

SPEC = InputSpec(input_size=(64, 64))
# A format galmorph does not register; Pillow reads it, so adding it is a registry entry only.
TIFF = CutoutFormat(
    name="tiff",
    label="TIFF",
    magics=(b"II*\x00", b"MM\x00*"),
    signature="the TIFF byte-order mark",
    suffixes=(".tif", ".tiff"),
    content_types=("image/tiff",),
    reader=Reader.PILLOW,
    pillow_format="TIFF",
)


def tiff_bytes() -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="TIFF")
    return buffer.getvalue()


@pytest.fixture
def with_tiff(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(formats, "FORMATS", (*formats.FORMATS, TIFF))
    yield


def page_accept(client: TestClient) -> tuple[str, str]:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    accept = re.search(r'<input id="file-input" type="file" multiple accept="([^"]*)">', page.text)
    drop = re.search(r"<span>Drop an? (.*) cutout here", page.text)
    assert accept and drop, page.text
    return accept.group(1), drop.group(1)


# --- sniffing and hints --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "name", "compression"),
    [
        (make_grz_fits(size=16), "fits", None),
        (make_grz_fits(size=16, gz=True), "fits", "gzip"),
        (make_grz_fits(size=16, fpack=True), "fits", "fpack"),
        (make_png(size=(16, 16)), "png", None),
        (make_jpeg(size=(16, 16)), "jpeg", None),
    ],
    ids=["fits", "fits.gz", "fz", "png", "jpeg"],
)
def test_format_is_sniffed_from_magic_bytes_alone(
    data: bytes, name: str, compression: str | None
) -> None:
    assert sniff_format(data).name == name
    # A misleading name changes nothing but a warning.
    decoded = decode_cutout(data, spec=SPEC, filename="cutout.txt")
    assert decoded.info.format == name and decoded.info.compression == compression
    assert decoded.info.warnings[0].startswith("file name 'cutout.txt' ignored")


@pytest.mark.parametrize("fmt", formats.FORMATS, ids=lambda fmt: fmt.name)
def test_every_registered_suffix_and_content_type_is_a_quiet_hint(fmt: CutoutFormat) -> None:
    data = {"fits": make_grz_fits(size=16), "png": make_png(), "jpeg": make_jpeg()}[fmt.name]
    for suffix in fmt.suffixes:
        for content_type in fmt.content_types:
            decoded = decode_cutout(
                data, spec=SPEC, filename=f"c{suffix.upper()}", content_type=content_type
            )
            assert not any("ignored" in w for w in decoded.info.warnings), (suffix, content_type)
    other = next(f for f in formats.FORMATS if f is not fmt)
    decoded = decode_cutout(
        data,
        spec=SPEC,
        filename=f"c{other.suffixes[0]}",
        content_type=f"{other.content_types[0]}; charset=binary",
    )
    assert decoded.info.warnings[:2] == [
        f"file name 'c{other.suffixes[0]}' ignored: the content is {fmt.label}",
        f"content type '{other.content_types[0]}; charset=binary' ignored: "
        f"the content is {fmt.label}",
    ]


@pytest.mark.parametrize("fmt", formats.FORMATS, ids=lambda fmt: fmt.name)
def test_text_named_like_a_format_is_refused_naming_what_it_lacks(fmt: CutoutFormat) -> None:
    with pytest.raises(CutoutError) as error:
        decode_cutout(b"ra,dec\n1,2\n", spec=SPEC, filename=f"catalog{fmt.suffixes[-1]}")
    assert error.value.kind is CutoutErrorKind.UNSUPPORTED
    assert error.value.message == (
        f"'catalog{fmt.suffixes[-1]}' is named like {fmt.label} but is text: "
        f"it lacks {fmt.signature}"
    )


def test_the_registry_refuses_inconsistent_entries() -> None:
    with pytest.raises(ValueError, match=r"pillow_format goes with Reader\.PILLOW"):
        CutoutFormat("x", "X", (b"X",), "an X", (".x",), (), Reader.PILLOW)
    with pytest.raises(ValueError, match=r"lower case '\.x': \['\.X'\]"):
        CutoutFormat("x", "X", (b"X",), "an X", (".X",), (), Reader.FITS)


def test_accept_list_offers_only_last_extensions() -> None:
    # Browsers compare the last extension only: ".fits.gz" must be offered as ".gz", once.
    assert formats.accept_list() == ".fits,.fit,.fts,.fz,.gz,.png,.jpg,.jpeg"


# --- every surface reads the registry ------------------------------------------------------


def test_defaults_on_every_surface() -> None:
    with TestClient(create_app(settings_for(None))) as client:
        assert page_accept(client) == (formats.accept_list(), "FITS, PNG or JPEG")
        assert client.get("/static/index.html").status_code == 404  # only ever served filled in
        assert client.get("/static/app.js").status_code == 200
        openapi = client.get("/openapi.json").json()
    assert openapi["paths"]["/classify"]["post"]["responses"]["415"]["description"] == (
        "not FITS, PNG or JPEG"
    )
    with pytest.raises(CutoutError, match=re.escape(formats.supported_formats())) as error:
        decode_cutout(b"\x00\x01binary", spec=SPEC)
    assert "send FITS (.fits, .fit, .fts, .fz, .fits.gz, .fit.gz), PNG (.png) or JPEG" in str(
        error.value
    )


def test_a_new_registry_entry_is_read_by_the_decoder(with_tiff: None) -> None:
    decoded = decode_cutout(tiff_bytes(), spec=SPEC, filename="c.tiff", content_type="image/tiff")
    assert decoded.info.format == "tiff" and decoded.info.warnings == []
    assert decoded.image.shape == (64, 64, 3)


def test_a_new_registry_entry_reaches_the_page_and_the_415(with_tiff: None, tmp_path: Path) -> None:
    model = write_model(tmp_path / "model.onnx")
    with TestClient(create_app(settings_for(model))) as client:
        accept, drop = page_accept(client)
        assert accept == ".fits,.fit,.fts,.fz,.gz,.png,.jpg,.jpeg,.tif,.tiff"
        assert drop == "FITS, PNG, JPEG or TIFF"
        wait_for(client)
        refused = client.post("/classify", files={"file": ("c.bin", b"\x00\x01binary")})
        accepted = client.post("/classify", files={"file": ("c.tif", tiff_bytes())})
    assert refused.status_code == 415
    assert refused.json()["detail"].endswith("or TIFF (.tif, .tiff)")
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["preprocessing"]["format"] == "tiff"


def test_a_new_registry_entry_reaches_the_scorer_and_the_cli(
    with_tiff: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cutouts = tmp_path / "cutouts"
    cutouts.mkdir()
    (cutouts / "a.TIFF").write_bytes(tiff_bytes())
    (cutouts / "b.png").write_bytes(make_png())
    (cutouts / "notes.txt").write_text("not a cutout")
    catalog = FileListCatalog.from_folder(cutouts, CatalogOptions())
    (block,) = catalog.iter_blocks([range(catalog.num_rows)])
    assert block.column("id_str").to_pylist() == ["a.TIFF", "b.png"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(CatalogError, match=r"\.jpeg, \.tif, \.tiff\) match"):
        FileListCatalog.from_folder(tmp_path / "empty", CatalogOptions())

    parser = argparse.ArgumentParser(prog="galmorph")
    service_cli.register(parser.add_subparsers())
    with pytest.raises(SystemExit):
        parser.parse_args(["classify", "--help"])
    assert "FITS, PNG, JPEG or TIFF cutouts" in " ".join(capsys.readouterr().out.split())
