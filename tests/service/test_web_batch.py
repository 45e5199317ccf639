"""The page with many cutouts, the results table, the model card, one galaxy's details and sky
positions, in a real headless Chromium driven over the Chrome DevTools Protocol.

Five files (three galaxies, white noise the model's OOD score flags, a truncated PNG) are
dropped on a real `galmorph serve` that takes two files a request, so the page must send them
in chunks; what the page shows and downloads is compared with the API's own answers, and its
Parquet download with what `galmorph score` writes for the same files. axe-core (vendored in
tests/support/vendor/) checks the idle, many-files and details states for WCAG violations.
With GALMORPH_WEB_SCREENSHOTS=docs/images the idle, many-files and details states are saved
there (as docs/images/web_*.png, the README's pictures).
"""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect

from galmorph.core.data.tables import class_columns
from galmorph.core.modelfile.contract import METADATA_PREFIX
from tests.service.test_web import RECORD_CSP_VIOLATIONS, DevTools, browser  # noqa: F401
from tests.support.onnx_factory import FactoryModel, write_model
from tests.support.server_process import RunningServer, serve
from tests.support.sky_stub import SkyStub

pytestmark = [pytest.mark.slow, pytest.mark.browser]
# The factory model's OOD scores (mean squared embedding) are 0.41-0.52 for the galaxies here
# and 0.63 for the noise image: a threshold between flags the noise alone.
OOD_THRESHOLD = 0.58
CALIBRATION = {
    "method": "temperature scaling",
    "num_images": 500,
    "applied": True,
    "temperature": 1.4271893501281738,
    "ece_before": 0.08312,
    "ece_after": 0.02147,
}
METRICS = {"split": "test", "num_images": 1774, "top1": 0.8123456, "ece": 0.0251}
TRAINING_DATA = {"name": "Galaxy10_DECals", "num_images": 17736}
# 45, 12 and 43 kB fit one request's bytes but not its files; 43 + 130 kB or 130 + 81 kB fit
# its files but not its bytes: the page must send [jpg, noise], [corrupt], [png], [fits].
MAX_BATCH_FILES = 2
MAX_BATCH_BYTES = 150_000
BATCH_REQUESTS = 4
SCREENSHOTS = Path(os.environ.get("GALMORPH_WEB_SCREENSHOTS") or tempfile.gettempdir())
GALAXIES = (
    "galaxy10-real/sample_6_Barred_Spiral.jpg",
    "galaxy10-real/class2_Round_Smooth.png",
    "hst-fits/abell_2744_spiral_galaxy_f105w.fits.gz",
)
NOISE = "noise.png"
OOD_SENTENCE = "unlike the training data: the class is unreliable"
CORRUPT = "corrupt.png"
# axe-core, injected into the page by the test (tests/support/vendor/README.md).
AXE = Path(__file__).resolve().parents[1] / "support" / "vendor" / "axe.min.js"


def page_state(expression: str) -> str:
    return f"(() => ({expression}))()"


ROWS = """Array.from(document.querySelectorAll('[data-testid=result-row]')).map(tr => ({
  file: tr.dataset.file,
  status: tr.dataset.status,
  probability: tr.dataset.probability ? parseFloat(tr.dataset.probability) : null,
  flagged: tr.querySelector('[data-testid=ood-flag]') !== null,
  flagTitle: tr.querySelector('[data-testid=ood-flag]')?.title ?? null,
  cells: Array.from(tr.cells).map(td => td.textContent.trim()),
}))"""


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("web_batch")


@pytest.fixture(scope="module")
def model(work: Path) -> Path:
    extras = {"calibration": CALIBRATION, "metrics": METRICS, "training_data": TRAINING_DATA}
    spec = FactoryModel(
        ood_threshold=OOD_THRESHOLD,
        metadata_overrides={METADATA_PREFIX + k: json.dumps(v) for k, v in extras.items()},
    )
    return write_model(work / "model.onnx", spec)


@pytest.fixture(scope="module")
def uploads(work: Path, real_data: Path) -> list[Path]:
    folder = work / "uploads"
    folder.mkdir()
    files = []
    for name in GALAXIES:
        files.append(folder / Path(name).name)
        files[-1].write_bytes((real_data / name).read_bytes())
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / NOISE)
    whole = (real_data / GALAXIES[1]).read_bytes()
    (folder / CORRUPT).write_bytes(whole[: len(whole) // 3])
    # In this order the server's two limits both cut the requests (see MAX_BATCH_BYTES).
    return [files[0], folder / NOISE, folder / CORRUPT, files[1], files[2]]


def galmorph(*args: str | Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "galmorph", *map(str, args)],
        check=True,
        capture_output=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def scored(work: Path, model: Path, uploads: list[Path]) -> Path:
    """`galmorph score --embeddings` on the same five files: the table the page's downloads
    copy, and the catalog of the similarity index the server is started with."""
    out = work / "scores"
    galmorph("score", uploads[0].parent, "--model", model, "--out", out, "--embeddings",
             *("--workers", "0", "--ort-threads", "1"))  # fmt: skip
    return out


@pytest.fixture(scope="module")
def index(work: Path, model: Path, scored: Path) -> Path:
    galmorph("index", "build", scored, "--out", work / "index", "--model", model)
    return work / "index"


@pytest.fixture(scope="module")
def server(work: Path, model: Path, index: Path) -> Iterator[RunningServer]:
    env = {
        "GALMORPH_MAX_BATCH_FILES": str(MAX_BATCH_FILES),
        "GALMORPH_MAX_BATCH_BODY_BYTES": str(MAX_BATCH_BYTES),
        "GALMORPH_DECODE_THREADS": "1",
        "GALMORPH_SIMILARITY_INDEX": str(index),
    }
    with serve(model, work, env=env) as running:
        yield running


def api_answers(server: RunningServer, uploads: list[Path]) -> dict[str, httpx.Response]:
    return {
        path.name: httpx.post(
            f"{server.url}/classify",
            files={"file": (path.name, path.read_bytes())},
            timeout=30,
        )
        for path in uploads
    }


def save_screenshot(name: str, png: bytes) -> None:
    """A palette PNG: the page's flat colours survive 64 of them, at a fraction of the size."""
    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(64)
    image.save(SCREENSHOTS / f"web_{name}.png", optimize=True)


async def open_page(
    devtools_url: str, page_url: str, tools_ready: str
) -> tuple[ClientConnection, DevTools]:
    targets = httpx.get(f"{devtools_url}/json/list").json()
    page = next(target for target in targets if target["type"] == "page")
    connection = await connect(page["webSocketDebuggerUrl"], max_size=None)
    tools = DevTools(connection)
    for domain in ("Page", "Runtime", "DOM", "Accessibility"):
        await tools.send(f"{domain}.enable")
    await tools.send("Page.addScriptToEvaluateOnNewDocument", source=RECORD_CSP_VIOLATIONS)
    await tools.send("Page.navigate", url=page_url)
    await tools.wait_event("Page.loadEventFired")
    await tools.wait_for(tools_ready)
    return connection, tools


async def screenshot(tools: DevTools, first: str = "header", last: str = "main") -> bytes:
    """The page from the top of element `first` to the bottom of `last` (CSS selectors)."""
    clip = await tools.evaluate(
        f"(() => {{ const top = document.querySelector({first!r}).getBoundingClientRect();"
        f" const bottom = document.querySelector({last!r}).getBoundingClientRect();"
        " return {x: 0, y: top.top + scrollY, width: document.documentElement.clientWidth,"
        " height: bottom.bottom - top.top, scale: 1}; })()"
    )
    shot = await tools.send(
        "Page.captureScreenshot", format="png", clip=clip, captureBeyondViewport=True
    )
    return base64.b64decode(shot["data"])


async def unnamed_controls(tools: DevTools) -> list[str]:
    """Chromium's own accessibility tree: every control and image has a name to announce."""
    tree = await tools.send("Accessibility.getFullAXTree")
    named_roles = {"button", "textbox", "combobox", "checkbox", "link", "image", "progressbar"}
    unnamed = []
    for node in tree["nodes"]:
        role = node.get("role", {}).get("value")
        if node.get("ignored") or role not in named_roles:
            continue
        if not str(node.get("name", {}).get("value", "")).strip():
            unnamed.append(f"{role} {node.get('backendDOMNodeId')}")
    return unnamed


async def axe_violations(tools: DevTools) -> list[str]:
    """axe-core's serious and critical WCAG violations on the page as it is now (text
    contrast among them: a colour under 4.5:1 against what it is drawn on)."""
    if not await tools.evaluate("typeof window.axe === 'object'"):
        await tools.evaluate(AXE.read_text(encoding="utf-8"))
    violations = await tools.evaluate(
        "axe.run(document, {resultTypes: ['violations']}).then(r => r.violations.map(v =>"
        " ({id: v.id, impact: v.impact, nodes: v.nodes.map(n => n.target.join(' '))})))",
        await_promise=True,
    )
    return [
        f"{v['id']} ({v['impact']}): {', '.join(v['nodes'])}"
        for v in violations
        if v["impact"] in ("serious", "critical")
    ]


async def drop_files(tools: DevTools, files: list[Path]) -> None:
    """A real drag and drop of the files onto the drop zone (Input.dispatchDragEvent)."""
    box = await tools.evaluate(
        "(() => { const r = document.getElementById('drop-zone').getBoundingClientRect();"
        " return {x: r.x + r.width / 2, y: r.y + r.height / 2}; })()"
    )
    data = {"items": [], "files": [str(f) for f in files], "dragOperationsMask": 1}
    for kind in ("dragEnter", "dragOver", "drop"):
        await tools.send("Input.dispatchDragEvent", type=kind, data=data, **box)


IDLE = page_state("""{
  emptyShown: document.getElementById('empty-state').offsetHeight > 0,
  tableEmptyShown: document.getElementById('table-empty').offsetHeight > 0,
  brokenImages: Array.from(document.images).filter(i => i.offsetHeight > 0).length,
  skyFormShown: document.getElementById('sky-form').offsetHeight > 0,
}""")


async def many_files(
    devtools_url: str, page_url: str, files: list[Path], out: Path
) -> dict[str, Any]:
    connection, tools = await open_page(
        devtools_url, page_url, "document.querySelectorAll('#model-card-fields dd').length > 0"
    )
    async with connection:
        seen: dict[str, Any] = {"idle": await tools.evaluate(IDLE)}
        seen["idle_png"] = await screenshot(tools, last="#model-card-panel")
        seen["idle_unnamed"] = await unnamed_controls(tools)
        seen["idle_axe"] = await axe_violations(tools)
        seen["card"] = await tools.evaluate(
            "Array.from(document.querySelectorAll('#model-card-fields dd')).map(dd =>"
            " ({source: dd.dataset.source, value: dd.dataset.value, text: dd.textContent}))"
        )
        await drop_files(tools, files)
        await tools.wait_for("document.body.dataset.state")
        seen["state"] = await tools.evaluate("document.body.dataset.state")
        seen["status"] = await tools.evaluate("document.getElementById('status').textContent")
        seen["progress"] = await tools.evaluate(
            "[document.getElementById('progress').value, document.getElementById('progress').max]"
        )
        seen["rows"] = await tools.evaluate(ROWS)
        # The first file's details; the noise image's headline; the corrupt file's error
        # replacing them.
        seen["first"] = await details(tools)
        await tools.send("Page.setDownloadBehavior", behavior="allow", downloadPath=str(out))
        await tools.evaluate("document.querySelector('[data-testid=download-csv]').click()")
        seen["csv"] = (await downloaded(out / "galmorph_results.csv")).decode()
        await tools.evaluate("document.querySelector('[data-testid=download-parquet]').click()")
        seen["parquet"] = await downloaded(out / "galmorph_results.parquet")
        await tools.evaluate("document.getElementById('download-json').click()")
        seen["json"] = (await downloaded(out / "galmorph_results.json")).decode()
        seen["batch_png"] = await screenshot(tools, last="#results")
        seen["batch_unnamed"] = await unnamed_controls(tools)
        seen["batch_axe"] = await axe_violations(tools)
        for direction in ("descending", "ascending"):
            await tools.evaluate("document.querySelector('[data-sort=probability]').click()")
            seen[f"sorted_{direction}"] = await tools.evaluate(
                f"[document.querySelector('[data-sort=probability]').parentElement"
                f".getAttribute('aria-sort'), {ROWS}]"
            )
        await set_select(tools, "filter-flag", "ood")
        seen["only_ood"] = await tools.evaluate(ROWS)
        await set_select(tools, "filter-flag", "error")
        seen["only_errors"] = await tools.evaluate(ROWS)
        await set_select(tools, "filter-flag", "")
        await set_select(tools, "filter-class", seen["rows"][0]["cells"][2].split(" unlike")[0])
        seen["one_class"] = await tools.evaluate(ROWS)
        await set_select(tools, "filter-class", "")
        seen["noise"] = await open_details(tools, NOISE)
        seen["corrupt"] = await open_details(tools, CORRUPT)
        seen["fits"] = await open_details(tools, Path(GALAXIES[2]).name)
        seen["galaxy"] = await open_details(tools, files[0].name)
        await tools.wait_for("document.getElementById('neighbours').dataset.state")
        seen["neighbours"] = await tools.evaluate(NEIGHBOURS)
        seen["details_png"] = await screenshot(tools, "#details-panel", "#details-panel")
        seen["details_axe"] = await axe_violations(tools)
        seen["csp_violations"] = await tools.evaluate("window.cspViolations")
        # The page's one rule for numbers, on a float32 pixel scale read from a FITS header.
        seen["float32_scale"] = await tools.evaluate("number(1.0479999780654907)")
        return seen


async def set_select(tools: DevTools, element_id: str, value: str) -> None:
    await tools.evaluate(
        f"(() => {{ const s = document.getElementById('{element_id}'); s.value = {value!r};"
        " s.dispatchEvent(new Event('change')); })()"
    )


async def downloaded(path: Path, timeout: float = 10) -> bytes:
    for _ in range(int(timeout / 0.05)):
        if path.exists() and path.stat().st_size:
            return path.read_bytes()
        await asyncio.sleep(0.05)
    raise TimeoutError(f"no download at {path}")


DETAILS = page_state("""{
  resultShown: document.getElementById('result').offsetHeight > 0,
  error: document.getElementById('details-error').hidden ? null
    : document.getElementById('details-error').textContent,
  top: document.getElementById('top-class').textContent,
  probability: document.getElementById('top-probability').textContent,
  flag: document.getElementById('headline-flag').hidden ? null
    : {text: document.getElementById('headline-flag').textContent,
       title: document.getElementById('headline-flag').title},
  details: Object.fromEntries(Array.from(document.querySelectorAll('#details dt')).map(
    dt => [dt.textContent, dt.nextElementSibling.textContent])),
  bars: document.querySelectorAll('#chart .bar').length,
  uploadShown: document.getElementById('upload-view').offsetHeight > 0,
  uploadNote: document.getElementById('upload-none').hidden ? null
    : document.getElementById('upload-none').textContent,
  modelWidth: document.getElementById('model-input').clientWidth,
  modelBar: {...document.getElementById('model-scale').dataset,
             shown: document.getElementById('model-scale').offsetHeight > 0,
             drawn: document.querySelector('#model-scale span').getBoundingClientRect().width,
             label: document.querySelector('#model-scale small').textContent},
  uploadBar: {...document.getElementById('upload-scale').dataset,
              shown: document.getElementById('upload-scale').offsetHeight > 0},
}""")


NEIGHBOURS = page_state("""{
  state: document.getElementById('neighbours').dataset.state,
  shown: document.getElementById('neighbours').offsetHeight > 0,
  note: document.getElementById('neighbours-note').textContent,
  rows: Array.from(document.querySelectorAll('[data-testid=neighbour-row]')).map(tr => ({
    id: tr.dataset.id,
    image: tr.querySelector('img')?.naturalWidth ?? null,
    flagged: tr.querySelector('.ood-flag') !== null,
    cells: Array.from(tr.cells).map(td => td.textContent.trim()),
  })),
}""")


async def details(tools: DevTools) -> dict[str, Any]:
    value: dict[str, Any] = await tools.evaluate(DETAILS)
    return value


async def open_details(tools: DevTools, file: str) -> dict[str, Any]:
    await tools.evaluate(
        "Array.from(document.querySelectorAll('[data-testid=result-row]'))"
        f".find(tr => tr.dataset.file === {file!r}).querySelector('button.link').click()"
    )
    # A PNG or JPEG upload is read and drawn asynchronously.
    await tools.wait_for(
        "document.getElementById('upload-view').hidden"
        " ? document.getElementById('upload-none').textContent !== 'reading…'"
        " : !document.getElementById('upload-scale').hidden"
    )
    return await details(tools)


@pytest.fixture(scope="module")
def seen(
    server: RunningServer,
    browser: str,  # noqa: F811 (the fixture imported above)
    uploads: list[Path],
    work: Path,
) -> dict[str, Any]:
    out = work / "downloads"
    out.mkdir()
    page = asyncio.run(many_files(browser, f"{server.url}/", uploads, out))
    for state in ("idle", "batch", "details"):
        save_screenshot(state, page[f"{state}_png"])
    return page


@pytest.fixture(scope="module")
def api(server: RunningServer, uploads: list[Path]) -> dict[str, httpx.Response]:
    return api_answers(server, uploads)


def test_axe_finds_no_serious_violations(seen: dict[str, Any]) -> None:
    """axe-core in the page on the idle, many-files and details states."""
    assert seen["idle_axe"] == []
    assert seen["batch_axe"] == []
    assert seen["details_axe"] == []


def test_idle_page_is_an_empty_state_without_broken_images(seen: dict[str, Any]) -> None:
    idle = seen["idle"]
    assert idle["emptyShown"] and idle["tableEmptyShown"]
    assert idle["brokenImages"] == 0  # no <img> without a picture is on screen
    assert not idle["skyFormShown"]  # the sky route is off on this server
    assert seen["idle_unnamed"] == [] and seen["batch_unnamed"] == []
    assert seen["csp_violations"] == []


def test_five_files_make_five_rows_one_error_one_flagged(
    seen: dict[str, Any], api: dict[str, httpx.Response], uploads: list[Path]
) -> None:
    assert seen["state"] == "done"
    assert seen["progress"] == [5, 5]
    rows = seen["rows"]
    assert [row["file"] for row in rows] == [path.name for path in uploads]
    assert [row["status"] for row in rows] == ["ok", "ok", "error", "ok", "ok"]
    assert [row["file"] for row in rows if row["flagged"]] == [NOISE]
    assert seen["status"].startswith("5 sent in ")
    assert "4 classified, 1 refused" in seen["status"]
    assert "1 unlike the training data" in seen["status"]
    for row in rows:
        answer = api[row["file"]]
        if row["status"] == "error":
            assert answer.status_code == 422
            assert row["cells"][2] == f"422: {answer.json()['detail']}"
            continue
        result = answer.json()
        assert row["cells"][2].startswith(result["top_class"])
        assert row["probability"] == pytest.approx(result["top_probability"], rel=1e-6)
        assert row["cells"][3] == f"{100 * result['top_probability']:.1f}%"
        assert row["cells"][4] == ("yes" if result["in_distribution"] else "no")
        assert row["flagged"] == (result["in_distribution"] is False)
        assert row["cells"][5] == f"{result['ood_score']:.4g}"  # 4 digits, not 17
    (noise,) = [row for row in rows if row["flagged"]]
    assert f"threshold {OOD_THRESHOLD}" in noise["flagTitle"]
    assert OOD_SENTENCE in noise["flagTitle"]


def test_files_go_in_requests_within_the_servers_limits(
    seen: dict[str, Any], server: RunningServer, uploads: list[Path]
) -> None:
    assert sum(path.stat().st_size for path in uploads[:3]) < MAX_BATCH_BYTES
    metrics = httpx.get(f"{server.url}/metrics").text
    batches = {
        sample.labels["status"]: sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "galmorph_http_requests_total"
        and sample.labels["route"] == "/classify/batch"
    }
    assert batches == {"200": BATCH_REQUESTS}  # none refused whole (413) for its size


def test_csv_and_json_downloads_equal_the_api_answers(
    seen: dict[str, Any], api: dict[str, httpx.Response], server: RunningServer
) -> None:
    card = httpx.get(f"{server.url}/model").json()
    records = list(csv.DictReader(io.StringIO(seen["csv"])))
    assert [r["file"] for r in records] == [row["file"] for row in seen["rows"]]
    columns = class_columns(card["class_names"])
    for record in records:
        answer = api[record["file"]]
        if answer.status_code != 200:
            assert record["error"] == f"422: {answer.json()['detail']}"
            assert record["pred_label"] == record["pred_prob"] == ""
            continue
        result = answer.json()
        assert record["error"] == ""
        assert record["pred_label"] == result["top_class"]
        assert int(record["pred_index"]) == card["class_names"].index(result["top_class"])
        assert float(record["pred_prob"]) == pytest.approx(result["top_probability"], rel=1e-6)
        for column, name in zip(columns, card["class_names"], strict=True):
            assert float(record[column]) == pytest.approx(result["probabilities"][name], rel=1e-6)
        assert float(record["ood_score"]) == pytest.approx(result["ood_score"], rel=1e-6)
        assert record["in_distribution"] == str(result["in_distribution"]).lower()
        assert record["model_sha256"] == card["sha256"]
    answers = json.loads(seen["json"])
    assert [a["file"] for a in answers] == [row["file"] for row in seen["rows"]]
    for entry in answers:
        answer = api[entry["file"]].json()
        if entry["error"]:
            assert entry["error"]["detail"] == answer["detail"]
        else:
            assert entry["result"]["probabilities"] == pytest.approx(answer["probabilities"])
            assert "image_png_base64" not in entry["result"]


def csv_value(text: str, kind: pa.DataType) -> Any:
    """A CSV field read as the Parquet column of type `kind` holds it."""
    if text == "":
        return None
    if pa.types.is_floating(kind):
        return pytest.approx(float(text), rel=1e-6)
    if pa.types.is_integer(kind):
        return int(text)
    if pa.types.is_boolean(kind):
        return {"true": True, "false": False}[text]
    return text


def same_as_csv(table: pa.Table, csv_text: str) -> None:
    records = list(csv.DictReader(io.StringIO(csv_text)))
    assert table.column_names == list(records[0])
    assert table.num_rows == len(records)
    for record, row in zip(records, table.to_pylist(), strict=True):
        for field in table.schema:
            assert row[field.name] == csv_value(record[field.name], field.type), field.name


def test_parquet_download_is_the_scorers_table(
    seen: dict[str, Any], scored: Path, uploads: list[Path]
) -> None:
    table = pq.read_table(pa.BufferReader(seen["parquet"]))
    same_as_csv(table, seen["csv"])  # and so the API's answers (the CSV test)
    # Every column `galmorph score` writes, but its bookkeeping (the row's place and id: the
    # page's `file`) and the embeddings (asked for here, for the index), with the scorer's
    # name and type, and on these files its values.
    scored = pq.read_table(scored / "scores.parquet")
    bookkeeping = ("row_index", "id_str", "embeddings")
    shared = [f for f in scored.schema if f.name not in bookkeeping]
    assert [table.schema.field(f.name) for f in shared] == shared
    assert table.schema.field("file").type == pa.string()
    page = {row["file"]: row for row in table.to_pylist()}
    assert sorted(page) == sorted(scored.column("id_str").to_pylist())
    assert sorted(page) == sorted(path.name for path in uploads)
    for row in scored.to_pylist():
        mine = page[row["id_str"]]
        assert (mine["error"] is None) == (row["error"] is None), row["id_str"]
        for field in (f for f in shared if f.name != "error"):
            expected = row[field.name]
            if pa.types.is_floating(field.type) and expected is not None:
                expected = pytest.approx(expected, rel=1e-5)
            assert mine[field.name] == expected, (row["id_str"], field.name)


def test_details_show_the_nearest_galaxies_of_the_servers_index(
    seen: dict[str, Any], server: RunningServer, uploads: list[Path]
) -> None:
    galaxy = uploads[0]
    answer = httpx.post(
        f"{server.url}/similar",
        params={"k": 10},
        files={"file": (galaxy.name, galaxy.read_bytes())},
        timeout=30,
    ).json()
    shown = seen["neighbours"]
    assert shown["state"] == "done" and shown["shown"]
    # The index holds the four files that decode (the corrupt one is an error row, no vector).
    assert len(answer["neighbours"]) == 4
    assert shown["note"].startswith("The 4 nearest of the 4 galaxies in the server's index")
    rows = shown["rows"]
    assert [row["id"] for row in rows] == [n["id_str"] for n in answer["neighbours"]]
    assert rows[0]["id"] == galaxy.name  # itself first, at distance 0
    for row, neighbour in zip(rows, answer["neighbours"], strict=True):
        rank, name, distance, top, probability, in_distribution = row["cells"][1:7]
        assert (rank, name) == (str(neighbour["rank"]), neighbour["id_str"])
        assert float(distance) == pytest.approx(neighbour["distance"], abs=5e-4)
        assert top.startswith(neighbour["pred_label"])
        assert probability == f"{100 * neighbour['pred_prob']:.1f}%"
        assert in_distribution == ("yes" if neighbour["in_distribution"] else "no")
        assert row["flagged"] == (neighbour["in_distribution"] is False)
        assert row["image"] == 64  # a file of the table: shown with the model's view


def test_sorting_by_probability_and_filtering(seen: dict[str, Any]) -> None:
    for direction, largest_first in (("descending", True), ("ascending", False)):
        aria, rows = seen[f"sorted_{direction}"]
        assert aria == direction
        answered = [row["probability"] for row in rows if row["status"] == "ok"]
        assert len(answered) == 4
        assert answered == sorted(answered, reverse=largest_first)
        assert rows[-1]["status"] == "error"  # rows without a probability stay last
    assert [row["file"] for row in seen["only_ood"]] == [NOISE]
    assert [row["file"] for row in seen["only_errors"]] == [CORRUPT]
    top = seen["rows"][0]["cells"][2].split(" unlike")[0]
    chosen = seen["one_class"]
    assert chosen and all(row["cells"][2].startswith(top) for row in chosen)
    assert len(chosen) == sum(row["cells"][2].startswith(top) for row in seen["rows"])


def test_model_card_panel_shows_get_model(seen: dict[str, Any], server: RunningServer) -> None:
    info = httpx.get(f"{server.url}/model").json()
    fields = {field["source"]: field for field in seen["card"]}
    for source, field in fields.items():
        value: Any = info
        for key in source.split("."):
            value = value[key]
        assert json.loads(field["value"]) == value, source
    wanted = {
        "version", "sha256", "class_names", "card.targets", "card.pixel_scale",
        "preprocessing.field_of_view_arcsec", "card.calibration", "card.metrics",
        "card.training_data", "card.ood",
    }  # fmt: skip
    assert wanted <= set(fields)
    text = {source: field["text"] for source, field in fields.items()}
    assert text["card.pixel_scale"] == "0.262″/px"
    assert text["preprocessing.field_of_view_arcsec"] == "16.77″ × 16.77″"
    assert text["card.calibration"] == (
        "temperature 1.427 · ECE 0.0831 → 0.0215 · on 500 held-out images"
    )
    assert text["card.metrics"] == "split test · num_images 1774 · top1 0.8123 · ece 0.0251"
    assert text["card.training_data"] == "name Galaxy10_DECals · num_images 17736"
    assert text["card.targets"].startswith("labels: the probabilities are class probabilities")
    assert f"threshold {OOD_THRESHOLD}" in text["card.ood"]
    assert text["sha256"] == info["sha256"]


def test_details_show_upload_model_view_scale_bars_and_flags(
    seen: dict[str, Any], api: dict[str, httpx.Response], uploads: list[Path]
) -> None:
    first = seen["first"]  # after the drop: the first file's details
    assert first["top"] == api[uploads[0].name].json()["top_class"]
    galaxy = seen["galaxy"]
    assert galaxy["resultShown"] and galaxy["error"] is None and galaxy["flag"] is None
    assert galaxy["bars"] == 10
    assert galaxy["uploadShown"] and galaxy["uploadBar"]["shown"]
    # The model's view: 64 px of 0.262″ drawn 256 CSS px wide; the bar is its arcsec to scale.
    bar = galaxy["modelBar"]
    assert bar["shown"] and bar["arcsec"] == "5"
    assert float(bar["widthPx"]) == pytest.approx(5 / 0.262 * galaxy["modelWidth"] / 64, abs=0.01)
    assert bar["drawn"] == pytest.approx(float(bar["widthPx"]), abs=0.5)
    assert bar["label"] == "5″ (scale assumed)"  # a JPEG has no pixel scale of its own
    noise = seen["noise"]
    assert noise["flag"]["text"] == OOD_SENTENCE
    assert f"threshold {OOD_THRESHOLD}" in noise["flag"]["title"]
    assert noise["details"]["OOD score"].endswith(OOD_SENTENCE)
    # An error replaces the previous galaxy's result instead of leaving it on screen.
    corrupt = seen["corrupt"]
    assert not corrupt["resultShown"]
    assert corrupt["error"] == f"{CORRUPT}: 422: {api[CORRUPT].json()['detail']}"
    fits = seen["fits"]
    fits_api = api[Path(GALAXIES[2]).name].json()["preprocessing"]
    assert fits["uploadNote"].startswith("FITS: a browser cannot show it")
    # The API names a FITS plane without BAND0, BANDS or FILTER "band": not a name to show.
    assert fits_api["bands_used"] == ["band"]
    assert fits["details"]["bands"] == "one band, unnamed (grey)"
    scale = float(f"{fits_api['pixel_scale']:.4g}")
    assert fits["details"]["pixel scale"] == f"{scale:g}″/px"
    assert fits["modelBar"]["label"] == "5″"
    assert seen["float32_scale"] == "1.048"


# ---- by position ------------------------------------------------------------------------


# A sky catalog scored through the stub into the server's cutout cache, then indexed: the
# neighbours the page finds for an upload have positions, and their cutouts are in the cache.
SKY_CATALOG = {"sky-a": (30.0, 5.0), "sky-b": (31.0, 5.5), "sky-c": (32.0, -6.0)}


@pytest.fixture(scope="module")
def sky_server(work: Path, model: Path) -> Iterator[tuple[RunningServer, SkyStub]]:
    cache = work / "cutout_cache"
    with SkyStub() as stub:
        catalog = work / "sky_catalog.csv"
        lines = [f"{name},{ra},{dec}" for name, (ra, dec) in SKY_CATALOG.items()]
        catalog.write_text("\n".join(["id_str,ra,dec", *lines]) + "\n")
        galmorph("score", catalog, "--model", model, "--out", work / "sky_scores", "--embeddings",
                 *("--cutout-url", stub.base_url, "--cache", cache),
                 *("--workers", "0", "--ort-threads", "1"))  # fmt: skip
        galmorph("index", "build", work / "sky_scores", "--out", work / "sky_index")
        stub.log.clear()  # what the server asks the stub for, from here on
        env = {
            "GALMORPH_SKY_ENABLED": "true",
            "GALMORPH_CUTOUT_URL": stub.base_url,
            "GALMORPH_CUTOUT_CACHE": str(cache),
            "GALMORPH_FETCH_ATTEMPTS": "1",
            "GALMORPH_DECODE_THREADS": "1",
            "GALMORPH_SIMILARITY_INDEX": str(work / "sky_index"),
        }
        with serve(model, work, env=env) as running:
            yield running, stub


async def positions(devtools_url: str, page_url: str, out: Path) -> dict[str, Any]:
    connection, tools = await open_page(
        devtools_url, page_url, "document.getElementById('stretch').options.length > 1"
    )
    async with connection:
        shown = await tools.evaluate("document.getElementById('sky-form').offsetHeight > 0")
        listed = "\\n".join(SKY_LIST)
        await tools.evaluate(
            "document.getElementById('sky-ra').value = '202.4696';"
            "document.getElementById('sky-dec').value = '47.1952';"
            f"document.getElementById('sky-list').value = '{listed}';"
            "document.getElementById('sky-form').requestSubmit()"
        )
        await tools.wait_for("document.body.dataset.state")
        await tools.send("Page.setDownloadBehavior", behavior="allow", downloadPath=str(out))
        await tools.evaluate("document.getElementById('download-csv').click()")
        csv_text = (await downloaded(out / "galmorph_results.csv")).decode()
        await tools.evaluate("document.getElementById('download-parquet').click()")
        parquet = await downloaded(out / "galmorph_results.parquet")
        rows = await tools.evaluate(ROWS)
        axe = await axe_violations(tools)  # with the sky form shown
        return {"shown": shown, "rows": rows, "csv": csv_text, "parquet": parquet, "axe": axe}


# Decimal degrees; the same position in h m s / d m s (the page converts it, and the server
# answers it from the cache the line before filled); a Dec that is neither.
SKY_LIST = ("150.1 2.2", "10h00m24s +02d12m00s", "10 12h")


def test_positions_go_to_the_sky_route_and_into_the_table(
    sky_server: tuple[RunningServer, SkyStub],
    browser: str,  # noqa: F811 (the fixture imported above)
    work: Path,
) -> None:
    server, stub = sky_server
    out = work / "sky_downloads"
    out.mkdir()
    page = asyncio.run(positions(browser, f"{server.url}/", out))
    assert page["shown"]
    assert page["axe"] == []
    rows = page["rows"]
    assert [row["file"] for row in rows] == [
        "ra 202.4696, dec 47.1952", "ra 150.1, dec 2.2", "ra 10h00m24s, dec +02d12m00s",
        "ra 10, dec 12h",
    ]  # fmt: skip
    assert [row["status"] for row in rows] == ["ok", "ok", "ok", "error"]
    assert [entry.params["ra"] for entry in stub.log] == ["202.4696", "150.1"]
    records = list(csv.DictReader(io.StringIO(page["csv"])))
    # Positions in degrees, as the scorer reads a catalog's (a Dec of "12h" is none).
    assert [(r["ra"], r["dec"]) for r in records] == [
        ("202.4696", "47.1952"), ("150.1", "2.2"), ("150.1", "2.2"), ("10", ""),
    ]  # fmt: skip
    table = pq.read_table(pa.BufferReader(page["parquet"]))
    same_as_csv(table, page["csv"])
    assert table.schema.field("ra").type == table.schema.field("dec").type == pa.float64()
    sources = ("fetched", "fetched", "cached")
    for row, record, source in zip(rows, records, sources, strict=False):
        params = {"ra": record["ra"], "dec": record["dec"]}
        answer = httpx.get(f"{server.url}/classify/sky", params=params).json()
        assert answer["cutout"]["source"] == "cached"  # the page's request fetched it
        assert row["cells"][1].endswith(f"{source}: {answer['cutout']['url']}")
        assert record["cutout_url"] == answer["cutout"]["url"]
        assert row["cells"][2].startswith(answer["top_class"])
        assert row["probability"] == pytest.approx(answer["top_probability"], rel=1e-6)
        assert float(record["pred_prob"]) == pytest.approx(answer["top_probability"], rel=1e-6)
    refused = httpx.get(f"{server.url}/classify/sky", params={"ra": "10", "dec": "12h"})
    assert rows[3]["cells"][2] == f"422: {refused.json()['detail']}"
    assert records[3]["error"] == f"422: {refused.json()['detail']}"


async def neighbour_cutouts(devtools_url: str, page_url: str, upload: Path) -> dict[str, Any]:
    connection, tools = await open_page(
        devtools_url, page_url, "document.getElementById('stretch').options.length > 1"
    )
    async with connection:
        await drop_files(tools, [upload])
        await tools.wait_for("document.getElementById('neighbours').dataset.state")
        before = await tools.evaluate(NEIGHBOURS)
        button = await tools.evaluate(
            "document.getElementById('neighbour-cutouts').offsetHeight > 0"
        )
        await tools.evaluate("document.getElementById('neighbour-cutouts').click()")
        await tools.wait_for(
            "document.querySelectorAll('[data-testid=neighbour-row] img').length"
            f" === {len(SKY_CATALOG)}"
        )
        after = await tools.evaluate(NEIGHBOURS)
        after["sources"] = await tools.evaluate(
            "Array.from(document.querySelectorAll('[data-testid=neighbour-row] img'))"
            ".map(img => img.src)"
        )
        return {"before": before, "button": button, "after": after}


def test_neighbours_with_positions_show_their_cached_cutouts(
    sky_server: tuple[RunningServer, SkyStub],
    browser: str,  # noqa: F811 (the fixture imported above)
    real_data: Path,
) -> None:
    server, stub = sky_server
    upload = real_data / GALAXIES[0]
    asked = len(stub.log)
    page = asyncio.run(neighbour_cutouts(browser, f"{server.url}/", upload))
    before, after = page["before"], page["after"]
    assert before["state"] == "done" and page["button"]
    assert sorted(row["id"] for row in before["rows"]) == sorted(SKY_CATALOG)
    assert all(row["image"] is None for row in before["rows"])  # not fetched unasked
    for row in before["rows"]:
        ra, dec = SKY_CATALOG[row["id"]]
        assert row["cells"][7] == f"{ra:g}°, {dec:g}°"
    assert [row["id"] for row in after["rows"]] == [row["id"] for row in before["rows"]]
    for row, source in zip(after["rows"], after["sources"], strict=True):
        ra, dec = SKY_CATALOG[row["id"]]
        params = {"ra": ra, "dec": dec, "return_image": "true"}
        answer = httpx.get(f"{server.url}/classify/sky", params=params)
        assert answer.json()["cutout"]["source"] == "cached"
        assert source == f"data:image/png;base64,{answer.json()['image_png_base64']}"
    assert len(stub.log) == asked  # every cutout came from the cache the scorer filled
