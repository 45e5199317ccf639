"""Cutouts by sky position: requests as the service documents them, the cache, and scoring
ra/dec catalogs against a loopback stub of the cutout service that injects faults."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pyarrow.parquet as pq
import pytest

from galmorph.cli import main as galmorph_main
from galmorph.core.cutouts.decode import decode_cutout
from galmorph.core.data.galaxy10 import GALAXY10_CLASS_NAMES
from galmorph.core.modelfile.contract import ModelCard
from galmorph.core.modelfile.engine import OnnxModel
from galmorph.core.sky.cache import CutoutCache
from galmorph.core.sky.client import (
    CutoutFetcher,
    CutoutSpec,
    FetchError,
    HostRateLimiter,
    check_position,
    parse_degrees,
    parse_retry_after,
    verify_cutout,
)
from galmorph.core.sky.options import CutoutOptions, Politeness
from galmorph.scoring.catalog import CatalogError, CatalogOptions, open_catalog
from galmorph.scoring.rows import class_columns
from galmorph.scoring.run import ScoreConfig, score
from galmorph.scoring.sky_fetch import SkyConfig
from tests.support.onnx_factory import FactoryModel, write_model
from tests.support.sky_stub import SkyStub, max_starts_within, render_fits

# Fast enough for tests, and small enough that the bounds show in the stub's log.
CONCURRENCY, RATE = 3, 20.0
FAST = Politeness(
    concurrency=CONCURRENCY, rate=RATE, timeout=0.5, attempts=3, backoff=0.02, max_backoff=0.05
)
GOOD_FAULTS = ("ok", "slow")  # faults after which the answer is a real cutout


def positions(n: int, ra0: float = 150.0) -> list[tuple[float, float]]:
    return [(round(ra0 + i * 0.01, 4), round(2.0 + i * 0.003, 4)) for i in range(n)]


def write_sky_catalog(path: Path, rows: list[tuple[object, object]]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id_str", "ra", "dec"])
        for i, (ra, dec) in enumerate(rows):
            writer.writerow([f"gal{i}", "" if ra is None else ra, "" if dec is None else dec])
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("sky_model") / "model.onnx", FactoryModel())


def sky_config(stub: SkyStub, cache: Path, **kwargs: object) -> SkyConfig:
    return SkyConfig(
        cutouts=CutoutOptions(base_url=stub.base_url),
        cache_dir=cache,
        politeness=FAST,
        **kwargs,  # type: ignore[arg-type]
    )


def run_score(catalog: Path, model: Path, out: Path, sky: SkyConfig) -> dict[str, object]:
    summary = score(
        ScoreConfig(
            catalog=catalog,
            model=model,
            out_dir=out,
            workers=0,
            shard_size=8,
            batch_size=8,
            ort_threads=1,
            progress=False,
            sky=sky,
        )
    )
    return summary.to_dict()


# ---------------------------------------------------------------- requests as documented


# Examples from the Legacy Surveys documentation (DR10 "description" page, "Sky viewer tips").
# fits-cutout / jpeg-cutout and cutout.fits / cutout.jpg are the same views (imagine map/urls.py).
DOCUMENTED = [
    "https://www.legacysurvey.org/viewer/fits-cutout?ra=190.1086&dec=1.2005&layer=ls-dr10&pixscale=0.262&bands=griz",
    "https://www.legacysurvey.org/viewer/jpeg-cutout?ra=190.1086&dec=1.2005&layer=ls-dr10&pixscale=0.262",
    "https://www.legacysurvey.org/viewer/cutout.fits?ra=19.8023&dec=10.3749&layer=ls-dr10&size=100",
]  # fmt: skip
ALIASES = {"fits-cutout": "cutout.fits", "jpeg-cutout": "cutout.jpg"}
VIEWER_DEFAULTS = {"size": "256", "pixscale": "0.262"}


@pytest.mark.parametrize("documented", DOCUMENTED)
def test_requests_carry_exactly_the_documented_parameters(documented: str):
    doc = urlsplit(documented)
    wanted = {k: v[0] for k, v in parse_qs(doc.query).items()}
    endpoint = doc.path.rsplit("/", 1)[1]
    spec = CutoutSpec(
        layer=wanted["layer"],
        bands=wanted.get("bands", "grz"),
        pixscale=float(wanted.get("pixscale", VIEWER_DEFAULTS["pixscale"])),
        width=int(wanted.get("size", VIEWER_DEFAULTS["size"])),
        height=int(wanted.get("size", VIEWER_DEFAULTS["size"])),
        image_format="jpeg" if "jpeg" in endpoint or endpoint.endswith(".jpg") else "fits",
    )
    ours = urlsplit(spec.request(float(wanted["ra"]), float(wanted["dec"])).url)
    sent = {k: v[0] for k, v in parse_qs(ours.query).items()}
    assert f"{ours.scheme}://{ours.netloc}" == f"{doc.scheme}://{doc.netloc}"
    assert ours.path.rsplit("/", 1)[1] == ALIASES.get(endpoint, endpoint)
    assert {k: sent[k] for k in wanted} == wanted  # every documented parameter, same text
    extra = {k: v for k, v in sent.items() if k not in wanted}
    # Besides them only the viewer's own defaults, made explicit (and bands for the JPEG).
    assert extra == {k: v for k, v in {**VIEWER_DEFAULTS, "bands": "grz"}.items() if k in extra}


def galaxy10_card(size: int) -> ModelCard:
    card = ModelCard("m", GALAXY10_CLASS_NAMES, (256, 256), (0.5,) * 3, (0.25,) * 3)
    return ModelCard(
        "m",
        GALAXY10_CLASS_NAMES,
        (size, size),
        (0.5,) * 3,
        (0.25,) * 3,
        pixel_scale=card.imaging.resized(256, size).pixel_scale,
    )


def test_defaults_from_the_model_card_ask_for_exactly_the_models_field():
    m51 = (202.4696, 47.1952)
    url = CutoutSpec.for_input(galaxy10_card(256).input_spec).request(*m51).url
    assert url == (
        "https://www.legacysurvey.org/viewer/cutout.fits"
        "?ra=202.4696&dec=47.1952&layer=ls-dr10&pixscale=0.262&size=256&bands=grz"
    )
    card = galaxy10_card(64)  # trained from 256 px Galaxy10 images: 1.048"/px over 67"
    spec = CutoutSpec.for_input(card.input_spec)
    params = spec.request(*m51).params()
    assert params["size"] == "64" and params["pixscale"] == "1.048"
    assert spec.width * spec.pixscale == pytest.approx(card.field_of_view[1])
    overridden = CutoutSpec.for_input(
        card.input_spec, CutoutOptions(layer="ls-dr9", bands="r", size=128)
    )
    assert overridden.request(*m51).params()["layer"] == "ls-dr9"
    assert overridden.expected_shape == (128, 128)
    rect = CutoutSpec(width=100, height=60).request(*m51).params()
    assert (rect["width"], rect["height"]) == ("100", "60") and "size" not in rect


def test_positions_are_checked_and_sexagesimal_is_refused():
    assert check_position(-10.5, 3.0) == (349.5, 3.0)
    assert check_position(150.123456789, -2.0) == (150.1234568, -2.0)
    for ra, dec, words in [(10, 95, "dec 95"), (400, 0, "ra 400"), (float("nan"), 0, "finite")]:
        with pytest.raises(ValueError, match=words):
            check_position(ra, dec)
    assert parse_degrees(" 150.25 ", "ra") == 150.25
    for text in ("12:30:49.42", "12h30m49.4s", "+12 23 28"):
        with pytest.raises(ValueError, match=r"sexagesimal.*decimal degrees"):
            parse_degrees(text, "ra")
    with pytest.raises(ValueError, match="not a number"):
        parse_degrees("north", "dec")
    with pytest.raises(ValueError, match=r"outside 1\.\.3000"):
        CutoutSpec(width=4000)
    same = CutoutSpec()
    assert same.request(10.0, 1.0).key == same.request(10.00000000001, 1.0).key
    assert same.request(10.0, 1.0).key != CutoutSpec(base_url="https://mirror/v").request(
        10.0, 1.0
    ).key  # fmt: skip


def test_retry_after_seconds_and_http_dates():
    from datetime import UTC, datetime

    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Wed, 01 Jan 2025 12:00:30 GMT", now) == 30.0
    assert parse_retry_after("Wed, 01 Jan 2025 11:00:00 GMT", now) == 0.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_answers_are_verified_before_use():
    spec = CutoutSpec(width=32, height=32)
    good = render_fits(10.0, 1.0, "grz", 0.262, 32, 32)
    verify_cutout(good, spec)
    cases = [
        (b"<html><head><title>x</title></head><body>Server Error</body></html>", False, "HTML"),
        (b"no such layer", False, "text, not a FITS cutout: no such layer"),
        (good[: len(good) // 2], True, "unreadable FITS"),
        (render_fits(10.0, 1.0, "griz", 0.262, 32, 32), False, r"shape \(4, 32, 32\)"),
        (render_fits(10.0, 1.0, "grz", 0.262, 40, 40), False, "expected"),
        (b"", True, "empty"),
    ]
    for data, retryable, words in cases:
        with pytest.raises(FetchError, match=words) as caught:
            verify_cutout(data, spec)
        assert caught.value.retryable is retryable, words


def test_rate_limiter_spaces_starts_and_a_pause_holds_the_host():
    async def starts() -> list[float]:
        limiter = HostRateLimiter(rate=50.0)
        seen: list[float] = []

        async def one(i: int) -> None:
            if i == 3:
                limiter.pause("h", 0.2)
            await limiter.wait("h")
            seen.append(time.monotonic())

        t0 = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(6)))
        return [t - t0 for t in sorted(seen)]

    seen = asyncio.run(starts())
    assert seen[0] < 0.02
    # The pause came while the others waited for their slots: they all waited it out, and
    # kept their spacing after it (timer jitter aside).
    assert min(seen[1:]) >= 0.2
    assert seen[-1] - seen[1] >= 4 * 0.02 * 0.9
    assert (np.diff(seen) >= 0.01).all()


# ---------------------------------------------------------------- the cache


def test_cache_is_atomic_verified_and_evicts_least_recently_used(tmp_path: Path):
    spec = CutoutSpec(width=32, height=32)
    data = render_fits(10.0, 1.0, "grz", 0.262, 32, 32)
    cache = CutoutCache(tmp_path, max_bytes=len(data) * 3)
    keys = [spec.request(10.0 + i, 1.0).key for i in range(5)]
    for i, key in enumerate(keys[:3]):
        cache.put(key, ".fits", data)
        os.utime(cache.path(key, ".fits"), (1000 + i, 1000 + i))
    assert cache.lookup(keys[0], ".fits", spec.plausible_size) is not None  # touched: recent
    cache.put(keys[3], ".fits", data)  # over the bound: evict down to 90 % (2 entries)
    present = [k for k in keys if cache.path(k, ".fits").exists()]
    assert present == [keys[0], keys[3]], "the least recently used went first"
    assert cache.usage().bytes <= cache.max_bytes
    # A damaged entry is a miss and is removed; a torn one fails even the cheap check.
    damaged = cache.path(keys[0], ".fits")
    damaged.write_bytes(data[:-2880] + b"\0" * 2880)
    assert cache.read(keys[0], ".fits", lambda d: verify_cutout(d, spec)) is not None
    damaged.write_bytes(b"<html>oops</html>")
    assert cache.read(keys[0], ".fits", lambda d: verify_cutout(d, spec)) is None
    assert not damaged.exists()
    cache.path(keys[3], ".fits").write_bytes(data[:1000])
    assert cache.lookup(keys[3], ".fits", spec.plausible_size) is None
    # A killed writer's temporary file is never an entry, and goes once stale.
    temp = cache.path(keys[4], ".fits").with_name(f".{keys[4]}.fits.tmp-1-dead")
    temp.parent.mkdir(parents=True, exist_ok=True)
    temp.write_bytes(data[:100])
    assert cache.lookup(keys[4], ".fits") is None
    os.utime(temp, (0, 0))
    cache.evict()
    assert not temp.exists()


# ---------------------------------------------------------------- against the stub

FAULT_PLAN = {  # row -> faults of its first attempts; rows not listed answer at once
    1: ["429"],
    2: ["503"],
    3: ["500", "500"],
    4: ["slow"],
    5: ["truncate"],
    6: ["short"],
    7: ["reset"],
    8: ["html"],  # a 200 error page: fails at once
    9: ["500", "500", "500"],  # out of attempts
    10: ["wrong_bands"],
    11: ["text"],  # "no such layer"
}
FAILING = {8: "HTML, not a FITS", 9: "HTTP 500 from", 10: "lacks band", 11: "no such layer"}


def test_faults_end_as_scores_or_error_rows_within_the_politeness_bounds(
    tmp_path: Path, model: Path
):
    sky = positions(20)
    rows: list[tuple[object, object]] = [*sky, sky[0], (sky[1][0], None), (151.0, 95.0)]
    catalog = write_sky_catalog(tmp_path / "cat.csv", rows)
    with SkyStub(plan={sky[i]: faults for i, faults in FAULT_PLAN.items()}) as stub:
        stub.slow_seconds = 1.0
        summary = run_score(catalog, model, tmp_path / "out", sky_config(stub, tmp_path / "cache"))
        table = pq.read_table(tmp_path / "out" / "scores.parquet")
        # Offline with the warm cache: the same scores and not one request.
        offline_from = time.monotonic()
        offline = run_score(
            catalog,
            model,
            tmp_path / "offline",
            sky_config(stub, tmp_path / "cache", offline=True),
        )
        time.sleep(stub.slow_seconds)  # the slow answer the client gave up on is logged at its end
        log = list(stub.log)
    assert not [r for r in log if r.start >= offline_from], "offline made requests"

    assert table.column("row_index").to_pylist() == list(range(len(rows)))
    errors = table.column("error").to_pylist()
    for i, error in enumerate(errors):
        if i in FAILING:
            assert error is not None and error.startswith("fetch: "), (i, error)
            assert FAILING[i] in error, (i, error)
        elif i == 21:
            assert error == "missing: no ra/dec in the catalog row"
        elif i == 22:
            assert error is not None and error.startswith("invalid: dec 95.0")
        else:
            assert error is None, (i, error)
    assert "(after 3 attempts)" in errors[9]
    assert summary["errors"] == {"fetch": 4, "missing": 1, "invalid": 1}
    assert summary["cutouts"]["failed"] == 4 and summary["cutouts"]["bad_positions"] == 2

    # Scored from the fetched FITS exactly as the same file would be by the server's decode.
    onnx = OnnxModel(model, intra_op_threads=1)
    names = class_columns(onnx.card.class_names)
    probs = np.stack([table.column(c).to_numpy(zero_copy_only=False) for c in names], 1)
    for i in (0, 1, 4, 7):
        image = decode_cutout(
            render_fits(*sky[i], "grz", 0.262, 64, 64), spec=onnx.card.input_spec
        ).image
        np.testing.assert_allclose(probs[i], onnx.predict(image[None])[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(probs[20], probs[0])  # the duplicate position

    # The stub's log: bounds held, Retry-After honoured, nothing fetched twice.
    assert max(r.in_flight for r in log) <= CONCURRENCY
    # Starts are spaced at the client; arrival jitter can bunch at most those in flight.
    assert max_starts_within(log, 0.5) <= 0.5 * RATE + CONCURRENCY
    for held in (r for r in log if r.status in (429, 503)):
        # Only requests already on their way when the client read the answer may arrive
        # within Retry-After (the others in flight: at most the concurrency less one).
        early = [q for q in log if held.end < q.start < held.end + stub.retry_after - 0.1]
        assert len(early) < CONCURRENCY, f"requests within Retry-After of the {held.status}"
    delivered: dict[tuple[float, float] | None, int] = {}
    for r in log:
        if r.status == 200 and r.fault == "ok":
            delivered[r.position] = delivered.get(r.position, 0) + 1
    assert max(delivered.values()) == 1, "a cutout was fetched twice"
    assert len(delivered) == 20 - len(FAILING)
    assert all("galmorph/" in r.headers["user-agent"] for r in log)

    offline_table = pq.read_table(tmp_path / "offline" / "scores.parquet")
    assert offline_table.drop_columns(["error"]).equals(table.drop_columns(["error"]))
    offline_errors = offline_table.column("error").to_pylist()
    assert all("offline, and not in the cache" in offline_errors[i] for i in FAILING)
    assert offline["cutouts"]["requests"] == 0


@pytest.mark.slow
def test_fetch_on_a_login_node_then_a_slurm_array_scores_offline(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]
):
    """The documented pattern: `galmorph fetch`, then scripts/slurm/score_array.sbatch with
    EXTRA_ARGS="--cache ... --offline" (a stand-in `sbatch`): every row, no request."""
    sky = positions(12, ra0=30.0)
    catalog = write_sky_catalog(tmp_path / "cat.csv", [*sky, sky[3]])
    cache = tmp_path / "cache"
    with SkyStub(plan={sky[5]: ["html"]}) as stub:  # an error page: no retry within a run
        fast = [
            "--cutout-url", stub.base_url, "--fetch-concurrency", "3", "--fetch-rate", "40",
            "--fetch-timeout", "1", "--fetch-attempts", "3", "--quiet",
        ]  # fmt: skip
        fetch = ["fetch", str(catalog), "--out", str(cache), "--model", str(model), *fast]
        assert galmorph_main(fetch) == 1  # one position failed
        first = json.loads(capsys.readouterr().out)
        assert (first["fetched"], first["cached"], first["failed"]) == (11, 1, 1)
        assert first["failures"] == {"the body is HTML, not a FITS cutout": 1}
        assert first["request"]["width"] == 64 and first["request"]["pixscale"] == 0.262
        assert galmorph_main(fetch) == 0  # a rerun retries the failure (now answered)
        second = json.loads(capsys.readouterr().out)
        assert (second["fetched"], second["cached"], second["requests"]) == (1, 12, 1)
        offline_from = time.monotonic()

        script = Path(__file__).resolve().parents[2] / "scripts" / "slurm" / "score_array.sbatch"
        bin_dir = tmp_path / "fake_bin"
        bin_dir.mkdir()
        (bin_dir / "sbatch").write_text("#!/bin/bash\nexit 0\n")
        (bin_dir / "sbatch").chmod(0o755)
        extra = ["--cache", str(cache), "--offline", *fast, "--ort-threads", "1"]
        env = {
            **os.environ,
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "CATALOG": str(catalog),
            "MODEL": str(model),
            "OUT": str(tmp_path / "scores"),
            "SHARD_SIZE": "4",
            "BATCH_SIZE": "4",
            "GALMORPH": str(Path(sys.executable).parent / "galmorph"),
            "EXTRA_ARGS": " ".join(extra),
            "SLURM_ARRAY_JOB_ID": "7",
            "SLURM_ARRAY_TASK_COUNT": "2",
            "SLURM_CPUS_PER_TASK": "1",
            "OMP_NUM_THREADS": "1",
        }
        for task in ("0", "1"):
            subprocess.run(
                ["bash", str(script)],
                cwd=tmp_path,
                env={**env, "SLURM_ARRAY_TASK_ID": task},
                check=True,
                capture_output=True,
            )
        assert not [r for r in stub.log if r.start >= offline_from], "offline made requests"
    assert galmorph_main(["merge", str(tmp_path / "scores")]) == 0
    merged = json.loads(capsys.readouterr().out)
    assert merged["rows"] == 13 and merged["errors"] == {}


@pytest.mark.slow
def test_sigkill_mid_fetch_then_rerun_loses_and_duplicates_nothing(tmp_path: Path, model: Path):
    sky = positions(40, ra0=60.0)
    catalog = write_sky_catalog(tmp_path / "cat.csv", sky)
    cache = tmp_path / "cache"
    with SkyStub(latency=0.05) as stub:
        command = [
            sys.executable, "-m", "galmorph.cli", "score", str(catalog), "--model", str(model),
            "--out", str(tmp_path / "killed"), "--cache", str(cache), "--cutout-url",
            stub.base_url, "--fetch-concurrency", "2", "--fetch-rate", "20", "--workers", "0",
            "--ort-threads", "1", "--shard-size", "8", "--batch-size", "8", "--quiet",
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        spec = CutoutSpec(base_url=stub.base_url, width=64, height=64)
        try:
            deadline = time.monotonic() + 60
            while len(list(cache.glob("v1/*/*.fits"))) < 5:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                assert time.monotonic() < deadline, "no cutout cached within 60 s"
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == -signal.SIGKILL
        cached = sorted(cache.glob("v1/*/*.fits"))
        assert 5 <= len(cached) < len(sky), "the kill must land mid-fetch"
        for entry in cached:  # every entry whole and right, whatever the kill interrupted
            verify_cutout(entry.read_bytes(), spec)
        resume_from = time.monotonic()
        resumed = run_score(catalog, model, tmp_path / "killed", sky_config(stub, cache))
        assert resumed["cutouts"]["cached"] == len(cached)
        assert resumed["cutouts"]["fetched"] == len(sky) - len(cached)
        again = [r.position for r in stub.log if r.start >= resume_from]
        keys = {entry.stem for entry in cached}
        assert len(again) == len(sky) - len(cached)
        assert not [p for p in again if p and spec.request(*p).key in keys], "fetched twice"
        clean = run_score(catalog, model, tmp_path / "clean", sky_config(stub, cache))
        assert clean["cutouts"]["requests"] == 0
    resumed_table = pq.read_table(tmp_path / "killed" / "scores.parquet")
    assert resumed_table.column("row_index").to_pylist() == list(range(len(sky)))
    assert resumed_table.equals(pq.read_table(tmp_path / "clean" / "scores.parquet"))
    # Only the answers in flight at the kill (at most the concurrency) were asked for again.
    delivered = [r.position for r in stub.log if r.status == 200]
    assert set(delivered) == set(sky)
    assert len(delivered) - len(sky) <= 2


def test_jpeg_cutouts_come_from_the_jpeg_endpoint(tmp_path: Path):
    spec = CutoutSpec(width=48, height=48, image_format="jpeg")

    async def fetch(stub: SkyStub) -> tuple[bytes, str]:
        live = CutoutSpec(**{**spec.to_dict(), "base_url": stub.base_url})
        async with CutoutFetcher(live, CutoutCache(tmp_path), FAST) as fetcher:
            return await fetcher.read(10.0, 1.0)

    with SkyStub() as stub:
        data, source = asyncio.run(fetch(stub))
        assert source == "fetched" and stub.log[0].path.endswith("/viewer/cutout.jpg")
        assert asyncio.run(fetch(stub))[1] == "cached" and len(stub.log) == 1
    verify_cutout(data, spec)


# ---------------------------------------------------------------- catalogs of positions


def test_catalog_columns_and_units_are_checked(tmp_path: Path, model: Path):
    sexagesimal = tmp_path / "sexa.csv"
    sexagesimal.write_text("id_str,ra,dec\ng0,12:30:49.42,+12:23:28.0\n")
    with pytest.raises(CatalogError, match=r"sexagesimal.*decimal degrees"):
        open_catalog(sexagesimal)
    neither = tmp_path / "neither.csv"
    neither.write_text("id_str,x,y\ng0,1,2\n")
    with pytest.raises(CatalogError, match="no path column 'file_loc' and no position columns"):
        open_catalog(neither)
    renamed = tmp_path / "renamed.csv"
    renamed.write_text("id_str,RA_DEG,DEC_DEG\ng0,150.1,2.2\n")
    catalog = open_catalog(renamed, CatalogOptions(ra_col="RA_DEG", dec_col="DEC_DEG"))
    assert catalog.source_kind == "sky"
    block = next(catalog.iter_blocks([range(1)]))
    assert block.column("source").to_pylist() == [{"ra": 150.1, "dec": 2.2, "error": None}]
    from astropy.table import Table

    hours = Table({"id_str": ["g0"], "ra": [10.0], "dec": [2.0]})
    hours["ra"].unit = "hourangle"
    hours.write(tmp_path / "hours.ecsv")
    with pytest.raises(CatalogError, match="is in hourangle; galmorph takes degrees"):
        open_catalog(tmp_path / "hours.ecsv")
    # The command line says what is wrong and exits 2, as for any unusable catalog.
    command = ["score", str(sexagesimal), "--model", str(model), "--out", str(tmp_path / "o")]
    assert galmorph_main([*command, "--quiet"]) == 2
