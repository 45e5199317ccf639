"""`galmorph serve` (the HTTP service under uvicorn) and `galmorph classify` (its client).

Registration only: uvicorn, FastAPI and onnxruntime are imported inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from galmorph.core.cutouts import formats
from galmorph.core.defaults import given, library_default, with_library_defaults

if TYPE_CHECKING:
    from galmorph.service.settings import Settings

SERVE_EPILOG = """\
Every option is also a setting: environment variables GALMORPH_<NAME> (e.g.
GALMORPH_MODEL_PATH, GALMORPH_MAX_BATCH_SIZE, GALMORPH_API_KEY, GALMORPH_CORS_ORIGINS=a,b,
GALMORPH_REQUIRE_GPU=true) or a .env file; flags win over both. The API key is read only
from the environment or .env, never from the command line.

A model file that cannot be loaded (missing, corrupt, not a galmorph model) or, with the sky
route on, a cutout cache that cannot be written stops serve before the port opens: exit 2 and
one line naming the file and the cause. --wait-for-model waits for a good model file instead.

GPU: where an NVIDIA driver is present and CUDA fails to start, serve refuses to start (exit
2, naming the reason) instead of running on the CPU; --allow-cpu-fallback runs it on the CPU
anyway, --providers CPUExecutionProvider chooses the CPU outright. --require-gpu refuses the
CPU on any host.

Slow and hostile clients: GALMORPH_MAX_HEADER_BYTES, GALMORPH_HEADER_TIMEOUT_S,
GALMORPH_BODY_TIMEOUT_S, GALMORPH_KEEP_ALIVE_TIMEOUT_S, GALMORPH_MAX_CONNECTIONS,
GALMORPH_MAX_CONNECTIONS_PER_CLIENT and GALMORPH_GRACEFUL_SHUTDOWN_S (docker/README.md puts a
proxy in front as well). With several --workers, /metrics sums all of them
(PROMETHEUS_MULTIPROC_DIR, made and emptied here).

Endpoints: POST /classify, POST /classify/batch, GET /model, /healthz, /readyz, /metrics,
KServe v2 /v2/health/live|ready and /v2/models/{name}; the web page is at /. GET
/classify/sky?ra=..&dec=.. (by sky position, from the Legacy Survey cutout service) only with
GALMORPH_SKY_ENABLED=true; its GALMORPH_CUTOUT_* and GALMORPH_FETCH_* settings are in
docs/scoring.md.
"""

# Flag name -> Settings field, for flags that override a setting when given.
SERVE_OVERRIDES = {
    "model": "model_path",
    "index": "similarity_index",
    "host": "host",
    "port": "port",
    "workers": "workers",
    "providers": "providers",
    "require_gpu": "require_gpu",
    "allow_cpu_fallback": "allow_cpu_fallback",
    "threads": "intra_op_threads",
    "engine": "engine",
    "max_batch_size": "max_batch_size",
    "max_delay_ms": "max_delay_ms",
    "max_queue": "max_queue",
    "wait_for_model": "wait_for_model",
    "wait_interval": "model_wait_interval_s",
    "wait_timeout": "model_wait_timeout_s",
    "log_format": "log_format",
    "log_level": "log_level",
}


def _settings() -> type[Settings]:
    from galmorph.service.settings import Settings

    return Settings


def _setting(name: str) -> Any:
    """A serve flag's default: left unset, the setting applies (environment, .env, or this
    default), so the flag shows the default without overriding them."""
    return library_default(_settings, name)


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="run the classification HTTP service",
        description="Serve a galmorph ONNX model over HTTP with dynamic micro-batching.",
        epilog=SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--model", type=Path, help="ONNX model file (setting model_path)")
    serve.add_argument(
        "--index", type=Path, help="similarity index to serve /similar from (galmorph index)"
    )
    serve.add_argument(
        "--host", default=_setting("host"), help="bind address (default %(default)s)"
    )
    serve.add_argument(
        "--port", type=int, default=_setting("port"), help="port (default %(default)s)"
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=_setting("workers"),
        help="uvicorn worker processes (default %(default)s)",
    )
    serve.add_argument(
        "--providers",
        help="comma-separated onnxruntime providers in order (default: CUDA if present, CPU)",
    )
    serve.add_argument(
        "--require-gpu",
        action="store_true",
        default=None,
        help="refuse to run unless CUDAExecutionProvider is really active, on any host",
    )
    serve.add_argument(
        "--allow-cpu-fallback",
        action="store_true",
        default=None,
        help="run on the CPU when CUDA fails to start on a host with an NVIDIA driver "
        "(default: refuse to start)",
    )
    serve.add_argument("--threads", type=int, help="onnxruntime intra-op threads")
    serve.add_argument(
        "--engine",
        # engine_choice.ENGINES (test_engine_choice.py): registration imports no onnxruntime
        choices=("auto", "onnxruntime", "openvino"),
        default=_setting("engine"),
        help="auto: openvino bf16 on a CPU-only host with bf16 units and the openvino package "
        "(galmorph[cpu]), else onnxruntime (default %(default)s)",
    )
    serve.add_argument("--max-batch-size", type=int, help="images per model run (1: no batching)")
    serve.add_argument("--max-delay-ms", type=float, help="longest wait to fill a batch")
    serve.add_argument("--max-queue", type=int, help="queued images before answering 503")
    serve.add_argument(
        "--wait-for-model",
        action="store_true",
        default=None,
        help="if the model file is missing or unreadable, wait for it (not ready meanwhile)",
    )
    serve.add_argument(
        "--wait-interval",
        type=float,
        default=_setting("model_wait_interval_s"),
        help="seconds between checks (default %(default)s)",
    )
    serve.add_argument("--wait-timeout", type=float, help="give up after this many seconds")
    serve.add_argument("--log-format", choices=("text", "json"))
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    serve.add_argument("--env-file", type=Path, help="settings file (default: ./.env)")
    serve.set_defaults(func=serve_command)
    _register_classify(subparsers)


def _register_classify(subparsers: argparse._SubParsersAction) -> None:
    classify = subparsers.add_parser(
        "classify",
        help="classify cutouts with a running galmorph server",
        description="POST each file to a running server's /classify and print a table.",
    )
    classify.add_argument("files", nargs="+", type=Path, help=f"{formats.format_labels()} cutouts")
    classify.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    classify.add_argument("--stretch", help="FITS stretch (default: the model's)")
    classify.add_argument(
        "--top-k",
        type=int,
        default=_setting("default_top_k"),
        help="classes to show per file (default %(default)s)",
    )
    classify.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    classify.add_argument("--json", action="store_true", help="print the raw JSON responses")
    classify.set_defaults(func=classify_command)


def serve_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the serve flags set: only those given, so that a flag left at its default
    does not hide the environment or .env."""
    return {
        field: getattr(args, flag)
        for flag, field in SERVE_OVERRIDES.items()
        if given(getattr(args, flag))
    }


# Long on purpose: the start-up sequence (settings -> model placement -> index -> metrics dir ->
# uvicorn) with each refusal as its own exit line; the order matters and reads top to bottom.
def serve_command(args: argparse.Namespace) -> int:
    import logging.config

    import uvicorn
    from pydantic import ValidationError

    from galmorph.core.modelfile.engine import CpuFallbackError, ModelLoadError, probe_placement
    from galmorph.service.http_protocol import PROTOCOL_PATH
    from galmorph.service.log_format import logging_config
    from galmorph.service.metrics import prepare_multiprocess_dir, remove_multiprocess_dir
    from galmorph.service.settings import Settings, is_loopback

    overrides = serve_overrides(args)
    try:
        # _env_file is pydantic-settings' documented per-instance override of env_file.
        settings = Settings(_env_file=args.env_file or ".env", **overrides)  # type: ignore[call-arg]
    except ValidationError as exc:
        print(f"galmorph serve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    if settings.model_path is None:
        print("galmorph serve: no model: pass --model or set GALMORPH_MODEL_PATH", file=sys.stderr)
        return 2
    if not settings.wait_for_model:
        # A server that cannot load its model would stay up and never be ready: refuse now,
        # in one line (the workers load it again; --wait-for-model waits for a good file).
        if not settings.model_path.exists():
            print(
                f"galmorph serve: model file not found: {settings.model_path} "
                "(--wait-for-model waits for it to appear)",
                file=sys.stderr,
            )
            return 2
        if problem := model_problem(settings.model_path):
            print(f"galmorph serve: {problem}", file=sys.stderr)
            return 2
    if settings.sky_enabled:
        from galmorph.service.sky import SkyCutouts

        try:
            SkyCutouts(settings)  # refuses an unwritable cutout cache
        except RuntimeError as exc:
            print(f"galmorph serve: {exc}", file=sys.stderr)
            return 2
    if problem := index_problem(settings):
        print(f"galmorph serve: {problem}", file=sys.stderr)
        return 2
    log_config = logging_config(settings.log_format, settings.log_level)
    logging.config.dictConfig(log_config)
    # Before the port opens and whether or not the model is there yet: a GPU host whose CUDA
    # does not start must not come up serving on the CPU.
    try:
        settings.gpu_policy.check(probe_placement(settings.providers or None))
    except (CpuFallbackError, ModelLoadError) as exc:  # ModelLoadError: a misspelt provider
        print(f"galmorph serve: {exc}", file=sys.stderr)
        return 2
    if (
        settings.api_key is None
        and settings.published_address is None
        and not is_loopback(settings.host)
    ):
        logging.getLogger(__name__).warning(
            "listening on %s without an API key: anyone who reaches port %d can use the "
            "service (GALMORPH_API_KEY requires a key)",
            settings.host,
            settings.port,
        )
    # Worker processes rebuild the same settings from the environment.
    os.environ.update(settings.to_environment())
    # Before the worker processes start: prometheus-client reads the variable once, on import.
    metrics_dir = prepare_multiprocess_dir(settings.workers)
    try:
        uvicorn.run(
            "galmorph.service.app:app_from_environment",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            log_config=log_config,
            # Slow clients: a bounded request head that must arrive in time (the protocol
            # adds the deadline uvicorn lacks), idle connections closed, a connection cap.
            http=PROTOCOL_PATH,
            h11_max_incomplete_event_size=settings.max_header_bytes,
            timeout_keep_alive=settings.keep_alive_timeout_s,
            limit_concurrency=settings.max_connections,
            timeout_graceful_shutdown=settings.graceful_shutdown_s,
        )
    finally:
        remove_multiprocess_dir(metrics_dir)
    return 0


def index_problem(settings: Settings) -> str | None:
    """Why the similarity index cannot be served with this model (one line), or None."""
    if settings.similarity_index is None:
        return None
    from galmorph.core.modelfile.artifact import artifact_sha256
    from galmorph.service.routers.similar import open_index

    try:
        from galmorph.similarity.index import SimilarityError
    except ImportError as exc:
        return f"--index needs the similarity extra (pip install 'galmorph[similarity]'): {exc}"
    try:
        index = open_index(settings)
    except SimilarityError as exc:
        return str(exc)
    if index is not None and settings.model_path is not None and settings.model_path.exists():
        try:
            index.check_model(artifact_sha256(settings.model_path), str(settings.model_path))
        except SimilarityError as exc:
            return str(exc)
    return None


def model_problem(path: Path) -> str | None:
    """Why the model at `path` cannot be served (one line), or None: it is opened once on the
    CPU, which reads and checks what every worker will (the graph, its input and outputs, the
    model card), without touching a GPU."""
    import logging

    from galmorph.core.modelfile.engine import CPU_PROVIDER, ModelLoadError, OnnxModel

    # The engine logs each load with its providers: the load the server runs on is the
    # workers', not this CPU check's.
    engine_log = logging.getLogger(OnnxModel.__module__)
    level = engine_log.level
    engine_log.setLevel(logging.WARNING)
    try:
        OnnxModel(path, providers=[CPU_PROVIDER], intra_op_threads=1, inter_op_threads=1)
    except ModelLoadError as exc:
        return " ".join(str(exc).split())
    finally:
        engine_log.setLevel(level)
    return None


def _post_file(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    query = {"filename": path.name, "top_k": str(args.top_k)}
    if args.stretch:
        query["stretch"] = args.stretch
    url = f"{args.url.rstrip('/')}/classify?{urllib.parse.urlencode(query)}"
    headers = {"Content-Type": "application/octet-stream"}
    if api_key := os.environ.get("GALMORPH_API_KEY"):
        headers["X-API-Key"] = api_key
    request = urllib.request.Request(url, data=path.read_bytes(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:
            result: dict[str, Any] = json.load(response)
            return result
    except urllib.error.HTTPError as exc:
        try:
            detail = json.load(exc).get("detail", exc.reason)
        except (json.JSONDecodeError, AttributeError):
            detail = exc.reason
        return {"error": f"{exc.code}: {detail}"}


@with_library_defaults
def classify_command(args: argparse.Namespace) -> int:
    """Print one line per file: the top class, its probability and the runners-up."""
    failures = 0
    rows: list[tuple[str, str, str, str]] = []
    for path in args.files:
        try:
            result = _post_file(path, args)
        except OSError as exc:  # unreadable file, connection refused, timeout
            result = {"error": str(getattr(exc, "reason", exc))}
        if args.json:
            print(json.dumps({"file": str(path), **result}))
        if "error" in result:
            failures += 1
            rows.append((str(path), "ERROR", "", result["error"]))
            continue
        others = ", ".join(
            f"{item['name']} {item['probability']:.3f}" for item in result["top_k"][1:]
        )
        rows.append((str(path), result["top_class"], f"{result['top_probability']:.3f}", others))
    if not args.json:
        header = ("FILE", "CLASS", "P", "NEXT")
        table = [header, *rows]
        widths = [max(len(row[i]) for row in table) for i in range(3)]
        for row in table:
            print("  ".join(row[i].ljust(widths[i]) for i in range(3)) + "  " + row[3])
    return 1 if failures else 0
