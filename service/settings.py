"""Server settings: environment variables with the GALMORPH_ prefix, or a `.env` file.

`galmorph serve` flags override them. Lists (providers, CORS origins) are comma-separated,
e.g. GALMORPH_PROVIDERS=CUDAExecutionProvider,CPUExecutionProvider.

The decode limits and the batching defaults belong to `DecodeLimits` (galmorph.core, also used
by the scorer) and `BatcherConfig`; the settings take their defaults from those and hand them
back as `decode_limits` and `batcher_config`.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from galmorph.core.cutouts.limits import MIB, DecodeLimits
from galmorph.core.modelfile.engine import GpuPolicy
from galmorph.core.sky.cache import DEFAULT_MAX_BYTES as CUTOUT_CACHE_BYTES
from galmorph.core.sky.client import CutoutSpec
from galmorph.core.sky.options import CutoutOptions, Politeness
from galmorph.service.batching import BatcherConfig

_LIMITS = DecodeLimits()
_BATCHING = BatcherConfig()
_CUTOUTS = CutoutOptions()
_POLITE = Politeness()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="GALMORPH_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    # Model and execution
    model_path: Path | None = Field(default=None, description="ONNX model file (galmorph contract)")
    providers: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="onnxruntime providers in order; empty: CUDA then CPU"
    )
    # The GPU policy (galmorph.core.modelfile.engine.GpuPolicy): require_gpu refuses the CPU
    # everywhere,
    # allow_cpu_fallback accepts it even where an NVIDIA driver is present; at most one is set.
    require_gpu: bool = Field(default=False, description="refuse to run unless CUDA is active")
    allow_cpu_fallback: bool = Field(
        default=False,
        description="run on the CPU when CUDA fails on a host with an NVIDIA driver "
        "(default: refuse to start)",
    )
    intra_op_threads: int | None = Field(
        default=None, ge=1, description="None: onnxruntime default"
    )
    inter_op_threads: int | None = Field(default=None, ge=1)
    engine: Literal["auto", "onnxruntime", "openvino"] = Field(
        default="auto",
        description="auto: openvino bf16 on a CPU-only host with bf16 units and the openvino "
        "package, else onnxruntime (galmorph.core.modelfile.engine_choice)",
    )
    wait_for_model: bool = Field(default=False, description="wait for the model file to appear")
    model_wait_interval_s: float = Field(default=5.0, gt=0)
    model_wait_timeout_s: float | None = Field(default=None, gt=0, description="None: wait forever")
    compose_command: str | None = Field(
        default=None,
        description="set by the compose files: how this deployment is run, for the commands "
        "the server prints while it has no model",
    )

    # Dynamic batching (BatcherConfig)
    max_batch_size: int = Field(
        default=_BATCHING.max_batch_size, ge=1, description="1 disables micro-batching"
    )
    max_delay_ms: float = Field(
        default=_BATCHING.max_delay_ms, ge=0, description="longest wait to fill a batch"
    )
    max_queue: int = Field(
        default=_BATCHING.max_queue, ge=1, description="queued images beyond this get 503"
    )
    request_timeout_s: float = Field(
        default=_BATCHING.timeout_s,
        gt=0,
        description="decode + queue + inference per request, counted once the body is read",
    )

    # Input limits (DecodeLimits, except the batch ones)
    max_body_bytes: int = Field(default=_LIMITS.max_bytes, ge=1, description="per cutout")
    max_batch_body_bytes: int = Field(default=256 * MIB, ge=1)
    max_batch_files: int = Field(default=64, ge=1)
    max_pixels: int = Field(
        default=_LIMITS.max_pixels, ge=1, description="declared pixels, all planes"
    )
    max_side: int = Field(default=_LIMITS.max_side, ge=1, description="any declared image axis")
    max_decompressed_bytes: int = Field(
        default=_LIMITS.max_decompressed_bytes, ge=1, description="a gzip FITS may expand to"
    )
    default_top_k: int = Field(default=3, ge=1)
    # Decoding (galmorph.service.decoding): memory and threads of all decodes together.
    decode_memory_budget_bytes: int = Field(
        default=1024 * MIB,
        ge=64 * MIB,
        description="memory all request bodies and decodes in flight may reserve; beyond: "
        "503, and 413 for a request that alone needs more (the largest decode ~600 MiB)",
    )
    decode_threads: int = Field(
        default_factory=lambda: min(32, (os.cpu_count() or 1) + 4),
        ge=1,
        description="threads that decode uploads (default: CPUs + 4, at most 32)",
    )

    # HTTP
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    workers: int = Field(default=1, ge=1)
    api_key: SecretStr | None = Field(default=None, description="when set, X-API-Key is required")
    published_address: str | None = Field(
        default=None,
        description="host address a deployment publishes the port on (the compose files set "
        "it); any but a loopback address requires api_key",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    docs: bool = Field(
        default=False,
        description="serve /docs and /redoc (their scripts come from a CDN); "
        "/openapi.json is always served",
    )
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # Cutouts by sky position, GET /classify/sky (galmorph.core.sky.client; the scorer's defaults:
    # CutoutOptions, Politeness, the cutout cache). Size, pixel scale and bands not set here
    # come from the model card. The politeness limits hold per worker process.
    similarity_index: Path | None = Field(
        default=None,
        description="similarity index folder (galmorph index build): serves /similar (off: 404)",
    )
    sky_enabled: bool = Field(default=False, description="serve GET /classify/sky (off: 404)")
    cutout_cache: Path | None = Field(
        default=None, description="cutout cache folder; None: ~/.cache/galmorph/cutouts"
    )
    cutout_cache_max_bytes: int = Field(default=CUTOUT_CACHE_BYTES, ge=1)
    cutout_url: str = Field(default=_CUTOUTS.base_url, description="cutout service base URL")
    cutout_layer: str = Field(default=_CUTOUTS.layer, description="survey layer")
    cutout_bands: str | None = Field(default=None, description="None: the model's bands")
    cutout_offline: bool = Field(
        default=False, description="the cache only: no request is made, a miss is a 503"
    )
    fetch_concurrency: int = Field(default=_POLITE.concurrency, ge=1)
    fetch_rate: float = Field(default=_POLITE.rate, gt=0, description="request starts/s per host")
    # A client waits on the request while the server fetches: fewer, shorter tries than the
    # scorer's (Politeness), all within sky_deadline_s.
    sky_deadline_s: float = Field(
        default=45.0,
        gt=0,
        description="a GET /classify/sky request is answered within this, fetch, decode and "
        "inference together (504, or 503 with the service's Retry-After, when the cutout "
        "cannot be had in time); keep it under the proxy's 120 s read timeout",
    )
    fetch_timeout_s: float = Field(default=20.0, gt=0, description="per attempt")
    fetch_attempts: int = Field(default=3, ge=1, description="tries per cutout")
    fetch_backoff_s: float = Field(default=_POLITE.backoff, ge=0)
    fetch_max_backoff_s: float = Field(default=_POLITE.max_backoff, ge=0)
    fetch_max_retry_after_s: float = Field(
        default=_POLITE.max_retry_after, ge=0, description="a longer Retry-After fails the fetch"
    )

    # Slow and hostile clients (uvicorn's own limits where it has them; docker/README.md)
    max_header_bytes: int = Field(
        default=16 * 1024, ge=1024, description="request line + headers; longer gets 400"
    )
    header_timeout_s: float = Field(
        default=10.0, gt=0, description="a connection must send a whole request head within"
    )
    body_timeout_s: float = Field(
        default=30.0, gt=0, description="longest wait for the next piece of an upload (408)"
    )
    upload_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="a whole upload must arrive within this (408): a byte every few seconds "
        "would otherwise hold a connection for ever",
    )
    keep_alive_timeout_s: int = Field(
        default=5, ge=1, description="idle keep-alive connections are closed after"
    )
    max_connections: int = Field(
        default=256, ge=1, description="open connections (and requests) beyond this get 503"
    )
    max_connections_per_client: int = Field(
        default=32,
        ge=1,
        description="open connections from one client address beyond this get 503 (with "
        "Retry-After, after a 1 s pause), so that one client cannot take every connection; "
        "behind a proxy every connection has its address (docker-compose.yml sets 256)",
    )
    graceful_shutdown_s: int = Field(
        default=10, ge=1, description="on SIGTERM, requests in progress get this long"
    )

    @field_validator("providers", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @model_validator(mode="after")
    def _one_gpu_policy(self) -> Settings:
        # GpuPolicy refuses require_gpu together with allow_cpu_fallback.
        GpuPolicy(require_gpu=self.require_gpu, allow_cpu_fallback=self.allow_cpu_fallback)
        return self

    @field_validator("api_key")
    @classmethod
    def _key_not_empty(cls, value: SecretStr | None) -> SecretStr | None:
        # An empty key would let in every client that sends an empty X-API-Key header.
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("the API key is empty: set one or leave GALMORPH_API_KEY unset")
        return value

    @model_validator(mode="after")
    def _key_when_published(self) -> Settings:
        address = self.published_address
        if address and not is_loopback(address) and self.api_key is None:
            raise ValueError(
                f"published on {address}, beyond this host, without an API key: set "
                "GALMORPH_API_KEY, or publish on 127.0.0.1 (GALMORPH_BIND_ADDRESS)"
            )
        return self

    @model_validator(mode="after")
    def _batch_fits_queue(self) -> Settings:
        # A /classify/batch request is queued whole or refused whole.
        if self.max_batch_files > self.max_queue:
            raise ValueError(
                f"max_batch_files ({self.max_batch_files}) must not exceed "
                f"max_queue ({self.max_queue})"
            )
        return self

    @model_validator(mode="after")
    def _cutout_service_valid(self) -> Settings:
        # CutoutSpec names a bad URL, layer or bands at startup, not at the first request;
        # the model card supplies the rest (as CutoutSpec.for_input does, "" means the card's).
        bands = self.cutout_bands or CutoutSpec.bands
        CutoutSpec(base_url=self.cutout_url.rstrip("/"), layer=self.cutout_layer, bands=bands)
        return self

    @property
    def cutout_options(self) -> CutoutOptions:
        """What /classify/sky asks for; the model card fills in what is None."""
        return CutoutOptions(
            base_url=self.cutout_url, layer=self.cutout_layer, bands=self.cutout_bands
        )

    @property
    def politeness(self) -> Politeness:
        return Politeness(
            concurrency=self.fetch_concurrency,
            rate=self.fetch_rate,
            timeout=self.fetch_timeout_s,
            attempts=self.fetch_attempts,
            backoff=self.fetch_backoff_s,
            max_backoff=self.fetch_max_backoff_s,
            max_retry_after=self.fetch_max_retry_after_s,
        )

    @property
    def gpu_policy(self) -> GpuPolicy:
        return GpuPolicy(
            require_gpu=self.require_gpu,
            allow_cpu_fallback=self.allow_cpu_fallback,
            allow_hint="--allow-cpu-fallback or GALMORPH_ALLOW_CPU_FALLBACK=1",
        )

    @property
    def decode_limits(self) -> DecodeLimits:
        return DecodeLimits(
            max_bytes=self.max_body_bytes,
            max_pixels=self.max_pixels,
            max_side=self.max_side,
            max_decompressed_bytes=self.max_decompressed_bytes,
        )

    @property
    def batcher_config(self) -> BatcherConfig:
        """The batching settings; the runtime lowers max_batch_size to what the model takes."""
        return BatcherConfig(
            max_batch_size=self.max_batch_size,
            max_delay_ms=self.max_delay_ms,
            max_queue=self.max_queue,
            timeout_s=self.request_timeout_s,
        )

    def to_environment(self) -> dict[str, str]:
        """GALMORPH_* variables that reproduce these settings (for uvicorn worker processes)."""
        environment = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            elif isinstance(value, list):
                value = ",".join(value)
            elif isinstance(value, bool):
                value = str(value).lower()
            environment[f"GALMORPH_{name.upper()}"] = str(value)
        return environment


def is_loopback(host: str) -> bool:
    """True for addresses only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # another host name: assume it is reachable from outside
        return False
