"""The docs are tests: every bash, console and python block of the Markdown docs runs as written.

How blocks are found, marked not runnable and adapted to this machine (sizes, ports, the
cutout service) is in tests/docs_support/blocks.py; the files they name are small stand-ins
(tests/docs_support/stand_ins.py). Blocks of one document run in order in one folder, as a
reader types them: a server one block starts is the one the next block asks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.docs_support.blocks import (
    DOCUMENTS,
    RUN_LANGUAGES,
    SHOWN_LANGUAGES,
    TALLY,
    Block,
    adapt,
    adapt_python,
    commands,
    fence_languages,
    is_serve,
    read_blocks,
)
from tests.support.server_process import free_port
from tests.support.sky_stub import SkyStub

if TYPE_CHECKING:
    from tests.support.trained_model import TrainedExport

pytestmark = pytest.mark.slow

BLOCKS = [block for document in DOCUMENTS for block in read_blocks(document)]
COMMAND_TIMEOUT_S = 300
SERVER_START_TIMEOUT_S = 90
OUTPUT_TAIL_LINES = 12


@dataclass
class DocFolder:
    """One document's folder, its port and the server a `galmorph serve` line started."""

    path: Path
    port: int
    env: dict[str, str]
    server: subprocess.Popen[bytes] | None = None
    logs: list[Path] = field(default_factory=list)

    def stop_server(self) -> None:
        if self.server is None:
            return
        self.server.terminate()
        try:
            self.server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.server.kill()
            self.server.wait()
        self.server = None


@pytest.fixture(scope="session")
def docs_stand_ins(tmp_path_factory: pytest.TempPathFactory, trained_export: TrainedExport) -> Path:
    from tests.docs_support.stand_ins import build

    return build(tmp_path_factory.mktemp("docs_stand_ins"), trained_export.model)


@pytest.fixture(scope="session")
def cutout_service() -> Iterator[str]:
    with SkyStub() as stub:
        yield stub.base_url


@pytest.fixture(scope="session")
def doc_folders(
    tmp_path_factory: pytest.TempPathFactory, docs_stand_ins: Path
) -> Iterator[dict[str, DocFolder]]:
    folders: dict[str, DocFolder] = {}
    # GALMORPH_ENGINE stays: tests/conftest.py pins the fp32 engine the answers are checked with;
    # GALMORPH_PRETRAIN_CACHE too: the session's synthetic starting points, not ~/.cache.
    environment = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("GALMORPH_") or k in ("GALMORPH_ENGINE", "GALMORPH_PRETRAIN_CACHE")
    }
    environment.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{environment.get('PATH', '')}",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        GALMORPH_INTRA_OP_THREADS="1",  # the server's onnxruntime threads: 2 shared cores
    )
    root = tmp_path_factory.mktemp("docs")
    for document in dict.fromkeys(block.document for block in BLOCKS if block.not_run is None):
        path = root / document.replace("/", "_").removesuffix(".md")
        shutil.copytree(docs_stand_ins, path)
        folders[document] = DocFolder(path, free_port(), environment)
    yield folders
    for folder in folders.values():
        folder.stop_server()


def _tail(text: str) -> str:
    return "\n".join(text.strip().splitlines()[-OUTPUT_TAIL_LINES:])


def _start_server(folder: DocFolder, command: str) -> str | None:
    """Start `galmorph serve` in the background; None once /readyz answers, else why not."""
    folder.stop_server()
    log = folder.path / f"serve_{len(folder.logs)}.log"
    folder.logs.append(log)
    with log.open("wb") as out:
        folder.server = subprocess.Popen(
            ["bash", "-c", f"exec {command}"],
            cwd=folder.path,
            env=folder.env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if folder.server.poll() is not None:
            return f"exited with {folder.server.returncode}:\n{_tail(log.read_text())}"
        try:
            if httpx.get(f"http://127.0.0.1:{folder.port}/readyz", timeout=2).status_code == 200:
                return None
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    return f"not ready after {SERVER_START_TIMEOUT_S} s:\n{_tail(log.read_text())}"


def _run_shell(block: Block, folder: DocFolder, cutout_url: str) -> list[str]:
    """Run every command of the block (all of them, so one failure hides no other)."""
    failures: list[str] = []
    for written in commands(block):
        command = adapt(written, port=folder.port, cutout_url=cutout_url)
        if is_serve(command):
            problem = _start_server(folder, command)
            if problem:
                failures.append(f"$ {written}\n  (ran: {command})\n  {problem}")
            continue
        result = subprocess.run(
            ["bash", "-o", "pipefail", "-c", command],
            cwd=folder.path,
            env=folder.env,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
        )
        if result.returncode != 0:
            output = _tail(result.stdout + "\n" + result.stderr)
            failures.append(
                f"$ {written}\n  (ran: {command})\n  exit {result.returncode}:\n{output}"
            )
    return failures


def _run_python(block: Block, folder: DocFolder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(folder.path)
    example = block.example
    # Padding keeps the document's line numbers in tracebacks.
    padding = "\n" * (example.line + example.parsed.line_offset)
    source = padding + adapt_python(block.source, port=folder.port)
    exec(compile(source, str(Path(block.document)), "exec"), example.namespace)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("block", BLOCKS, ids=[block.name for block in BLOCKS])
def test_doc_block(
    block: Block,
    doc_folders: dict[str, DocFolder],
    cutout_service: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if block.not_run is not None:
        TALLY.not_run[block.not_run] += 1
        pytest.skip(block.not_run)
    TALLY.run += 1
    folder = doc_folders[block.document]
    try:
        if block.language == "python":
            _run_python(block, folder, monkeypatch)
        else:
            failures = _run_shell(block, folder, cutout_service)
            assert not failures, f"{block.name}: commands failed\n" + "\n\n".join(failures)
    except BaseException:
        TALLY.failed.append(block.name)
        raise


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_code_block_is_run_or_marked(document: str) -> None:
    """A fence in another language would silently escape the docs tests."""
    unknown = [
        f"{document}:{line} ```{language}"
        for line, language in fence_languages(document)
        if language not in RUN_LANGUAGES + SHOWN_LANGUAGES
    ]
    assert not unknown, f"fences neither run nor shown-only: {unknown}"


def test_docs_blocks_are_found() -> None:
    """The parser still sees the docs' blocks and markers (a Sybil or Markdown change would
    otherwise turn this whole file into zero tests)."""
    runnable = [block for block in BLOCKS if block.not_run is None]
    assert {"README.md", "docs/scoring.md"} <= {block.document for block in runnable}
    assert any(block.language == "python" for block in runnable)
    assert any(block.not_run for block in BLOCKS)
