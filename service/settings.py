"""Server settings: environment variables with the GALMORPH_ prefix, or a `.env` file.

`galmorph serve` flags override them. Lists (providers, CORS origins) are comma-separated,
e.g. GALMORPH_PROVIDERS=CUDAExecutionProvider,CPUExecutionProvider.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MIB = 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="GALMORPH_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    # Model and execution
    model_path: Path | None = Field(default=None, description="ONNX model file (galmorph contract)")
    providers: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="onnxruntime providers in order; empty: CUDA then CPU"
    )
    require_gpu: bool = Field(
        default=False, description="stay not-ready unless CUDA is really active"
    )
    intra_op_threads: int | None = Field(
        default=None, ge=1, description="None: onnxruntime default"
    )
    inter_op_threads: int | None = Field(default=None, ge=1)
    wait_for_model: bool = Field(default=False, description="wait for the model file to appear")
    model_wait_interval_s: float = Field(default=5.0, gt=0)
    model_wait_timeout_s: float | None = Field(default=None, gt=0, description="None: wait forever")

    # Dynamic batching
    max_batch_size: int = Field(default=16, ge=1, description="1 disables micro-batching")
    max_delay_ms: float = Field(default=2.0, ge=0, description="longest wait to fill a batch")
    max_queue: int = Field(default=256, ge=1, description="queued images beyond this get 503")
    request_timeout_s: float = Field(
        default=30.0, gt=0, description="queue + inference per request"
    )

    # Input limits
    max_body_bytes: int = Field(default=64 * MIB, ge=1, description="per cutout (Triton: 64 MiB)")
    max_batch_body_bytes: int = Field(default=256 * MIB, ge=1)
    max_batch_files: int = Field(default=64, ge=1)
    max_pixels: int = Field(default=4096 * 4096 * 4, ge=1, description="declared FITS/PNG pixels")
    max_side: int = Field(default=8192, ge=1)
    default_top_k: int = Field(default=3, ge=1)

    # HTTP
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    workers: int = Field(default=1, ge=1)
    api_key: SecretStr | None = Field(default=None, description="when set, X-API-Key is required")
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("providers", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @model_validator(mode="after")
    def _batch_fits_queue(self) -> Settings:
        # A /classify/batch request is queued whole or refused whole.
        if self.max_batch_files > self.max_queue:
            raise ValueError(
                f"max_batch_files ({self.max_batch_files}) must not exceed "
                f"max_queue ({self.max_queue})"
            )
        return self

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
