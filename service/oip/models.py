"""The Open Inference Protocol's documents (github.com/kserve/open-inference-protocol,
specification/protocol/inference_rest.md), and its refusal: {"error": "..."}."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ProtocolErrorResponse(BaseModel):
    error: str = Field(description="what was wrong, in words")


class ProtocolError(Exception):
    """A malformed or unanswerable protocol request: answered {"error": message}."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ServerLive(BaseModel):
    live: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class RequestInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: Any = None


class RequestOutput(BaseModel):
    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferenceRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[ResponseOutput]
