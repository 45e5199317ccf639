"""The app in process (Starlette's TestClient) with test settings, waited on until ready.

For tests of the app's own behaviour; tests of the server as users run it use
tests/support/server_process.py (real uvicorn on a socket).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from galmorph.core.modelfile.engine import CPU_PROVIDER
from galmorph.service.app import create_app
from galmorph.service.settings import Settings


def settings_without_dotenv(**values: Any) -> Settings:
    """Settings from these values and the environment only (a developer's .env stays out)."""
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def settings_for(model_path: Path | None, **overrides: Any) -> Settings:
    """CPU, one onnxruntime thread, `model_path`; `overrides` win."""
    values: dict[str, Any] = {
        "model_path": model_path,
        "providers": [CPU_PROVIDER],
        "intra_op_threads": 1,
        **overrides,
    }
    return settings_without_dotenv(**values)


def wait_for(client: TestClient, ready: bool = True, timeout: float = 20.0) -> dict[str, Any]:
    """Poll /readyz until it says `ready` (and, for False, why); its last answer."""
    deadline = time.monotonic() + timeout
    while True:
        response = client.get("/readyz")
        body: dict[str, Any] = response.json()
        if body["ready"] is ready and (ready or body["reason"] != "starting"):
            return body
        assert time.monotonic() < deadline, f"readiness never became {ready}: {body}"
        time.sleep(0.05)


@contextmanager
def running(settings: Settings, *, ready: bool = True) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        wait_for(client, ready)
        yield client
