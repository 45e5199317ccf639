"""`docker compose up` from nothing: `galmorph serve` with no model file stays up, `/readyz`
answers 503 with the commands that make or mount one, the log says it once, the page shows it,
and the model is served as soon as it appears. Real uvicorn on a 127.0.0.1 socket, run with the
environment the compose files give the container.
"""

from __future__ import annotations

import html
import re
import shlex
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from galmorph.cli import build_parser
from galmorph.service.runtime import no_model_help
from galmorph.service.settings import Settings
from tests.support.onnx_factory import write_model
from tests.support.server_process import REPO_ROOT, RunningServer, serve

pytestmark = pytest.mark.slow

COMPOSE_GPU = REPO_ROOT / "docker-compose.yml"
COMPOSE_CPU = REPO_ROOT / "docker-compose.cpu.yml"
WAIT_INTERVAL_S = 0.2


class ComposeLoader(yaml.SafeLoader):
    """PyYAML's safe loader; Compose's own `!reset` tag reads as null (only plain keys are
    read here)."""


ComposeLoader.add_constructor("!reset", lambda loader, node: None)


def compose_file(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = yaml.load(path.read_text(), Loader=ComposeLoader)
    return document


def compose_command(path: Path) -> str:
    command: str = compose_file(path)["services"]["serve"]["environment"][
        "GALMORPH_COMPOSE_COMMAND"
    ]
    return command


def readiness(server: RunningServer) -> httpx.Response:
    deadline = time.monotonic() + 30
    while True:
        response = httpx.get(f"{server.url}/readyz", timeout=5)
        if response.json()["reason"] != "starting":
            return response
        assert time.monotonic() < deadline, "the loader never looked for the model"
        time.sleep(0.05)


def test_no_model_answers_503_with_the_commands_then_serves_it(tmp_path: Path) -> None:
    """The CPU compose deployment's serve (its environment and the image's), started before
    any model exists."""
    compose = compose_command(COMPOSE_CPU)
    model = tmp_path / "models" / "model.onnx"
    model.parent.mkdir()
    env = {"GALMORPH_WAIT_FOR_MODEL": "true", "GALMORPH_COMPOSE_COMMAND": compose}
    interval = ("--wait-interval", str(WAIT_INTERVAL_S))
    with serve(model, tmp_path, *interval, env=env, up_when="/healthz") as server:
        ready = readiness(server)
        assert ready.status_code == 503
        reason = ready.json()["reason"]
        assert reason.splitlines() == [
            f"waiting for model at {model}: there is no file there yet; it is loaded as soon "
            f"as it appears (checked every {WAIT_INTERVAL_S:g} s).",
            f"To download Galaxy10 DECaLS, train, evaluate and export a model to {model}:",
            f"    {compose} --profile train run --rm train",
            "To serve an .onnx you already have, mount the folder that holds it as model.onnx:",
            f"    GALMORPH_MODELS_MOUNT=/path/to/that/folder {compose} up -d",
            "docker/README.md has the whole path, with the expected times.",
        ]
        # Alive, not crash-looping, and the same answer on the KServe alias.
        assert httpx.get(f"{server.url}/healthz").status_code == 200
        assert httpx.get(f"{server.url}/v2/health/ready").json()["reason"] == reason
        refused = httpx.post(f"{server.url}/classify", content=b"\x89PNG")
        assert refused.status_code == 503 and refused.headers["Retry-After"]

        # The page shows it, visibly.
        page = httpx.get(f"{server.url}/").text
        panel = re.search(r'<section id="not-ready"([^>]*)>(.*?)</section>', page, re.DOTALL)
        assert panel and "hidden" not in panel.group(1)
        assert html.escape(reason) in panel.group(2)

        # Several checks later the log has said it exactly once.
        time.sleep(5 * WAIT_INTERVAL_S)
        assert server.log().count(f"{compose} --profile train run --rm train") == 1, server.log()
        assert server.process.poll() is None

        write_model(model)
        deadline = time.monotonic() + 30
        while httpx.get(f"{server.url}/readyz").status_code != 200:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.1)
        page = httpx.get(f"{server.url}/").text
        assert re.search(r'<section id="not-ready" hidden>', page)
        assert httpx.get(f"{server.url}/model").json()["name"] == "test_factory_model"


@pytest.mark.parametrize("path", [COMPOSE_GPU, COMPOSE_CPU], ids=["gpu", "cpu"])
def test_compose_commands_name_what_the_compose_files_define(path: Path) -> None:
    """The printed commands work with the file(s) each deployment runs with."""
    command = shlex.split(compose_command(path))
    assert command[:2] == ["docker", "compose"]
    files = [Path(command[i + 1]) for i, word in enumerate(command) if word == "-f"]
    expected = [] if path == COMPOSE_GPU else [COMPOSE_GPU.name, COMPOSE_CPU.name]
    assert [file.name for file in files] == expected
    train = compose_file(COMPOSE_GPU)["services"]["train"]
    assert train["profiles"] == ["train"]
    # What GALMORPH_MODELS_MOUNT does to the volumes: tests/project/test_docker.py.


def test_without_compose_the_commands_are_galmorph_commands(tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    settings = Settings(_env_file=None, model_path=model)  # type: ignore[call-arg]
    text = no_model_help(model, settings)
    commands = [line.strip() for line in text.splitlines() if line.startswith("    galmorph ")]
    assert [shlex.split(line)[1] for line in commands] == ["data", "train", "export"]
    parser = build_parser()
    parsed = [parser.parse_args(shlex.split(line)[1:]) for line in commands]
    # Each step reads what the one before wrote, and export writes where serve looks.
    assert Path(parsed[1].data).parent == Path(parsed[0].out)
    assert parsed[2].run_dirs == [parsed[1].out]
    assert Path(parsed[2].out) == model
    assert "docker compose" not in text
