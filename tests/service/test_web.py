"""The web page in a real headless Chromium, driven over the Chrome DevTools Protocol.

The page is loaded from a real `galmorph serve`, a real cutout goes through the file input,
and the rendered DOM (bars, labels, top class, the image) is compared with the API's answer.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from galmorph.core.data.galaxy10 import GALAXY10_CLASS_NAMES
from galmorph.service.headers import CONTENT_SECURITY_POLICY
from tests.support.onnx_factory import write_model
from tests.support.server_process import RunningServer, serve

pytestmark = [pytest.mark.slow, pytest.mark.browser]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOT = Path(tempfile.gettempdir()) / "galmorph_web.png"
RECORD_CSP_VIOLATIONS = (
    "window.cspViolations = [];"
    "document.addEventListener('securitypolicyviolation',"
    " (e) => window.cspViolations.push(`${e.effectiveDirective} ${e.blockedURI}`));"
)


class DevTools:
    """Just enough CDP: numbered commands, events remembered until asked for."""

    def __init__(self, connection: ClientConnection) -> None:
        self.connection = connection
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        message_id = self.next_id
        await self.connection.send(
            json.dumps({"id": message_id, "method": method, "params": params})
        )
        while True:
            message = json.loads(await self.connection.recv())
            if message.get("id") == message_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message["result"]
                return result
            self.events.append(message)

    async def wait_event(self, method: str, timeout: float = 20) -> dict[str, Any]:
        async def receive() -> dict[str, Any]:
            while True:
                for event in self.events:
                    if event.get("method") == method:
                        self.events.remove(event)
                        return event
                self.events.append(json.loads(await self.connection.recv()))

        return await asyncio.wait_for(receive(), timeout)

    async def evaluate(self, expression: str, *, await_promise: bool = False) -> Any:
        """The expression's value; with await_promise, the value its promise resolves to."""
        result = await self.send(
            "Runtime.evaluate",
            expression=expression,
            returnByValue=True,
            awaitPromise=await_promise,
        )
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 30) -> Any:
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            value = await self.evaluate(expression)
            if value:
                return value
            await asyncio.sleep(0.1)
        raise TimeoutError(f"page never satisfied: {expression}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    work = tmp_path_factory.mktemp("web")
    with serve(write_model(work / "model.onnx"), work) as running:
        yield running


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A headless Chromium; yields its DevTools HTTP endpoint."""
    assert Path(CHROMIUM).exists(), "Debian package chromium is needed (make browser)"
    profile = tmp_path_factory.mktemp("chromium-profile")
    process = subprocess.Popen(
        [
            CHROMIUM,
            *("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic"),
            *("--no-first-run", "--disable-background-networking", "--disable-component-update"),
            *("--disable-sync", f"--user-data-dir={profile}", "--remote-debugging-port=0"),
            "--window-size=1200,900",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        for line in process.stderr:
            if match := re.search(r"DevTools listening on ws://([\d.:]+)/", line):
                break
        else:
            raise RuntimeError(f"chromium exited with {process.wait()}")
        yield f"http://{match.group(1)}"
    finally:
        process.terminate()
        process.wait(timeout=10)


async def run_page(devtools_url: str, page_url: str, upload: Path) -> dict[str, Any]:
    targets = httpx.get(f"{devtools_url}/json/list").json()
    page = next(target for target in targets if target["type"] == "page")
    async with connect(page["webSocketDebuggerUrl"], max_size=None) as connection:
        tools = DevTools(connection)
        for domain in ("Page", "Runtime", "DOM"):
            await tools.send(f"{domain}.enable")
        # Before the page's own script: every Content-Security-Policy violation is recorded.
        await tools.send("Page.addScriptToEvaluateOnNewDocument", source=RECORD_CSP_VIOLATIONS)
        await tools.send("Page.navigate", url=page_url)
        await tools.wait_event("Page.loadEventFired")
        await tools.wait_for("document.getElementById('stretch').options.length > 1")
        document = await tools.send("DOM.getDocument")
        node = await tools.send(
            "DOM.querySelector", nodeId=document["root"]["nodeId"], selector="#file-input"
        )
        await tools.send("DOM.setFileInputFiles", files=[str(upload)], nodeId=node["nodeId"])
        state = await tools.wait_for("document.body.dataset.state")
        page_state = await tools.evaluate(
            """(() => ({
              state: document.body.dataset.state,
              error: document.getElementById('error').textContent,
              top: document.getElementById('top-class').textContent,
              modelLine: document.getElementById('model-line').textContent,
              image: document.getElementById('model-input').naturalWidth,
              neighboursHidden: document.getElementById('neighbours').hidden,
              bars: Array.from(document.querySelectorAll('#chart .bar')).map(bar => ({
                name: bar.querySelector('.bar-label').textContent,
                probability: parseFloat(bar.dataset.probability),
                width: bar.querySelector('.bar-fill').getBoundingClientRect().width,
                track: bar.querySelector('.bar-track').getBoundingClientRect().width,
                top: bar.classList.contains('top'),
              })),
            }))()"""
        )
        shot = await tools.send("Page.captureScreenshot", format="png")
        page_state["screenshot"] = base64.b64decode(shot["data"])
        page_state["csp_violations"] = await tools.evaluate("window.cspViolations")
        # The policy is enforced: an injected inline script does not run.
        await tools.evaluate(
            "document.body.append(Object.assign(document.createElement('script'),"
            " {textContent: 'window.inlineRan = true'}))"
        )
        page_state["inline_script_ran"] = await tools.evaluate("window.inlineRan === true")
        page_state["csp_after_inline"] = await tools.evaluate("window.cspViolations")
        assert state == page_state["state"]
        return dict(page_state)


def test_page_shows_the_model_view_and_probability_bars(
    server: RunningServer, browser: str, real_data: Path
) -> None:
    upload = real_data / "galaxy10-real" / "sample_6_Barred_Spiral.jpg"
    page = asyncio.run(run_page(browser, f"{server.url}/", upload))
    SCREENSHOT.write_bytes(page["screenshot"])
    assert page["state"] == "done", page["error"]
    # The page works under its Content-Security-Policy, which is really enforced.
    assert httpx.get(f"{server.url}/").headers["Content-Security-Policy"] == (
        CONTENT_SECURITY_POLICY
    )
    assert page["csp_violations"] == []
    assert page["inline_script_ran"] is False
    assert [v.split()[0] for v in page["csp_after_inline"]] == ["script-src-elem"]
    api = httpx.post(
        f"{server.url}/classify", files={"file": (upload.name, upload.read_bytes())}
    ).json()
    assert page["top"] == api["top_class"]
    assert [bar["name"] for bar in page["bars"]] == list(GALAXY10_CLASS_NAMES)
    for bar in page["bars"]:
        assert bar["probability"] == pytest.approx(api["probabilities"][bar["name"]], abs=1e-6)
        # The drawn bar length is the probability (within a pixel of rounding).
        assert bar["width"] == pytest.approx(bar["probability"] * bar["track"], abs=1.0)
        assert bar["top"] == (bar["name"] == api["top_class"])
    assert page["image"] == 64  # the model's own input size, shown as the model saw it
    assert page["neighboursHidden"]  # the server has no similarity index: /similar is off
    assert "test_factory_model" in page["modelLine"]
    assert page["screenshot"].startswith(b"\x89PNG") and len(page["screenshot"]) > 10_000


def test_page_reports_a_refused_file(server: RunningServer, browser: str, tmp_path: Path) -> None:
    upload = tmp_path / "catalog.fits"
    upload.write_text("ra,dec\n10.0,2.0\n")
    page = asyncio.run(run_page(browser, f"{server.url}/", upload))
    assert page["state"] == "error"
    assert page["error"].startswith("415: ") and "SIMPLE" in page["error"]


async def watch_until_served(devtools_url: str, page_url: str, model: Path) -> dict[str, Any]:
    """The page before the model exists, then after it is written (no reload)."""
    targets = httpx.get(f"{devtools_url}/json/list").json()
    page = next(target for target in targets if target["type"] == "page")
    state = """(() => ({
      panelShown: document.getElementById('not-ready').offsetHeight > 0,
      reason: document.getElementById('not-ready-reason').textContent,
      modelLine: document.getElementById('model-line').textContent,
    }))()"""
    async with connect(page["webSocketDebuggerUrl"], max_size=None) as connection:
        tools = DevTools(connection)
        for domain in ("Page", "Runtime"):
            await tools.send(f"{domain}.enable")
        await tools.send("Page.navigate", url=page_url)
        await tools.wait_event("Page.loadEventFired")
        await tools.wait_for(
            "document.getElementById('model-line').textContent.includes('no model')"
        )
        before = await tools.evaluate(state)
        write_model(model)
        await tools.wait_for("document.getElementById('stretch').options.length > 1")
        return {"before": before, "after": await tools.evaluate(state)}


def test_page_says_what_to_do_until_the_model_arrives(browser: str, tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    with serve(
        model,
        tmp_path,
        *("--wait-for-model", "--wait-interval", "0.2"),
        env={"GALMORPH_COMPOSE_COMMAND": "docker compose"},
        up_when="/healthz",
    ) as server:
        page = asyncio.run(watch_until_served(browser, f"{server.url}/", model))
    before, after = page["before"], page["after"]
    assert before["panelShown"], before
    assert before["reason"].startswith(f"waiting for model at {model}: there is no file")
    assert "    docker compose --profile train run --rm train\n" in before["reason"]
    assert not after["panelShown"]
    assert "test_factory_model" in after["modelLine"]
