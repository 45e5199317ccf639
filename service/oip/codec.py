"""The Open Inference Protocol's tensor codec: what a request's one input may be, its datatypes
and shapes checked against the server's limits, the binary tensor data extension both ways, and
the outputs written as the protocol's tensors.

An inference request sends exactly one input:

- `images`, UINT8 `[N, H, W, 3]`: rendered RGB images; other sizes than the model's are fitted
  as a PNG of them would be (galmorph.core.cutouts.decode.fit_array);
- `files`, BYTES `[N]`: encoded FITS/PNG/JPEG files, decoded exactly as `POST /classify`
  decodes an upload (in JSON, each element is the file in base64; with the binary tensor data
  extension, the raw bytes: each a 4-byte little-endian length, then the bytes, as Triton).

Outputs: `probabilities` FP32 [N, K], and as the model file has them `embeddings` FP32 [N, D],
`ood_score` FP32 [N] and `in_distribution` BOOL [N]; without `outputs` in the request, all of
them. Triton's binary tensor data extension (`Inference-Header-Content-Length`,
`binary_data_size`, `binary_data`/`binary_data_output`) is supported both ways, which is what
`tritonclient` uses by default.

Bounds, as /classify's: the JSON (at most MAX_JSON_BYTES) is read and checked first, and the
tensor's shape against max_batch_files, max_side and max_pixels (H, W >= 1), its datatype and
binary_data_size against its shape, and the body's Content-Length against what the JSON and
the tensor need, all before the binary part is read (a longer body is 413, unread). The body
is paid for from the server's memory budget before each part is read, the JSON's parse as
well (JSON_BYTES_PER_VALUE for each value, counted in the raw text). Files are memoryviews of
the body until their decode. The headers read (Content-Length, Inference-Header-Content-Length)
must be ASCII digits (400 otherwise). No body can be longer than `body_limit`: the JSON and
max_batch_files images or files of the largest size the limits allow.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any

import numpy as np
from fastapi import Request
from pydantic import ValidationError

from galmorph.core.cutouts.limits import Reserve
from galmorph.core.data.tables import IN_DISTRIBUTION_NAME
from galmorph.core.modelfile.contract import (
    EMBEDDINGS_NAME,
    INPUT_NAME,
    OOD_SCORE_NAME,
    OUTPUT_NAME,
)
from galmorph.core.modelfile.engine import OnnxModel
from galmorph.service.data_plane import ARRAY_FIT_BYTES_PER_PIXEL
from galmorph.service.oip.models import InferenceRequest, ProtocolError, RequestInput, RequestOutput
from galmorph.service.schemas import TensorSpec
from galmorph.service.settings import Settings
from galmorph.service.uploads import (
    BodyReader,
    PayloadTooLargeError,
    declared_length,
    parse_length,
)

HEADER_LENGTH = "Inference-Header-Content-Length"
FILES_INPUT = "files"
IMAGES_INPUT = INPUT_NAME
# numpy dtype of each protocol datatype this server reads or writes.
DTYPES: dict[str, np.dtype[Any]] = {
    "UINT8": np.dtype(np.uint8),
    "FP32": np.dtype("<f4"),
    "BOOL": np.dtype(np.bool_),
}
# Every output this server can answer, in the order it answers them.
OUTPUT_NAMES = (OUTPUT_NAME, EMBEDDINGS_NAME, OOD_SCORE_NAME, IN_DISTRIBUTION_NAME)
UNSUPPORTED_PARAMETERS = ("classification", "shared_memory_region")
# The JSON part of a request. Tensors written out as JSON numbers cost tens of bytes of Python
# objects per value when parsed: larger ones go as binary tensor data, which this does not count.
MAX_JSON_BYTES = 16 * 2**20
# The most a parsed JSON value costs (pydantic, measured on 2M-value documents: 32 B for a
# small int, 64 for a float, 48 for an empty list, 128 for a list holding one int).
JSON_BYTES_PER_VALUE = 128
IMAGE_CHANNELS = 3
BYTES_LENGTH_PREFIX = 4  # each BYTES element in binary: its length, 4 bytes little-endian


def output_specs(model: OnnxModel) -> list[TensorSpec]:
    """The outputs this model can answer (embeddings and the OOD score as its file has them)."""
    specs = [TensorSpec(name=OUTPUT_NAME, datatype="FP32", shape=[-1, model.card.num_classes])]
    if model.has_embeddings:
        (node,) = [n for n in model.session.get_outputs() if n.name == EMBEDDINGS_NAME]
        width = node.shape[1] if isinstance(node.shape[1], int) else -1
        specs.append(TensorSpec(name=EMBEDDINGS_NAME, datatype="FP32", shape=[-1, width]))
    if model.has_ood:
        specs.append(TensorSpec(name=OOD_SCORE_NAME, datatype="FP32", shape=[-1]))
        specs.append(TensorSpec(name=IN_DISTRIBUTION_NAME, datatype="BOOL", shape=[-1]))
    return specs


def input_specs(model: OnnxModel) -> list[TensorSpec]:
    """Two ways in; a request sends one of them."""
    height, width = model.input_size
    return [
        TensorSpec(name=IMAGES_INPUT, datatype="UINT8", shape=[-1, height, width, IMAGE_CHANNELS]),
        TensorSpec(name=FILES_INPUT, datatype="BYTES", shape=[-1]),
    ]


def body_limit(settings: Settings) -> int:
    """The largest body a legal request can have: the JSON, then max_batch_files images at
    max_side / max_pixels or files at max_body_bytes (each with its 4-byte length). The memory
    budget refuses (413) a body it could never hold, whatever this allows."""
    sides = min(settings.max_pixels, settings.max_side**2)
    per_item = max(IMAGE_CHANNELS * sides, settings.max_body_bytes + BYTES_LENGTH_PREFIX)
    return MAX_JSON_BYTES + settings.max_batch_files * per_item


async def read_request(
    request: Request, body: BodyReader, reserve: Reserve, settings: Settings
) -> tuple[InferenceRequest, RequestInput, list[Any]]:
    """The inference request and its one input as N images or N files. The JSON is read and
    checked first: the tensor's shape, datatype and byte size against the limits, and the
    body's length against what they need, before its binary data is reserved and read."""
    declared = declared_length(request)
    header = request.headers.get(HEADER_LENGTH)
    json_length = None if header is None else parse_length(header, HEADER_LENGTH)
    if json_length is None:
        # The whole body is the JSON (a chunked one is read up to the JSON limit).
        json_length = declared if declared is not None else MAX_JSON_BYTES
        binary_follows = False
    else:
        if declared is not None and json_length > declared:
            raise ProtocolError(
                400, f"{HEADER_LENGTH} {json_length} is longer than the {declared}-byte body"
            )
        binary_follows = True
    if json_length > MAX_JSON_BYTES:
        raise _json_too_large(json_length)
    document = await body.read(json_length, "the request's JSON")
    if not binary_follows and declared is None and not await body.at_end():
        raise _json_too_large(MAX_JSON_BYTES + 1)
    if len(document) < json_length and binary_follows:
        raise ProtocolError(400, f"the body ended within the {json_length}-byte JSON")
    inference = parse_request(document, reserve)
    tensor = single_input(inference, settings)
    size = binary_size(tensor, settings)
    if size is not None and not binary_follows:
        raise ProtocolError(
            400, f"input {tensor.name!r} has binary_data_size but no {HEADER_LENGTH} header"
        )
    binary = None
    if binary_follows:
        expected = size or 0
        rest = None if declared is None else declared - json_length
        if rest is not None and rest > expected:  # refused unread
            raise PayloadTooLargeError(
                expected,
                f"input {tensor.name!r}: binary_data_size {expected} but {rest} bytes follow "
                "the JSON, which",
            )
        if rest is not None and rest < expected:
            raise ProtocolError(
                400,
                f"input {tensor.name!r}: binary_data_size {expected} but {rest} bytes follow "
                "the JSON",
            )
        read = await body.read(expected, f"input {tensor.name!r}'s binary data")
        if len(read) < expected or not await body.at_end():
            raise ProtocolError(
                400, f"input {tensor.name!r}: binary_data_size {expected} disagrees with the body"
            )
        binary = None if size is None else read
    return inference, tensor, tensor_items(tensor, binary)


def _json_too_large(size: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        MAX_JSON_BYTES,
        f"the request's JSON ({size} bytes; send large tensors as binary tensor data, as "
        "tritonclient does by default)",
    )


def parse_request(document: bytearray, reserve: Reserve) -> InferenceRequest:
    """The request's JSON, parsed once its Python objects are paid for: every value costs up
    to JSON_BYTES_PER_VALUE (each comma, '[' and '{' counted as one, in C, before any object
    is built) and strings their length."""
    values = document.count(b",") + document.count(b"[") + document.count(b"{") + 1
    reserve(JSON_BYTES_PER_VALUE * values + 2 * len(document), "the request's JSON, parsed")
    try:
        inference = InferenceRequest.model_validate_json(document)
    except ValidationError as exc:
        raise ProtocolError(400, f"not an inference request: {_first_problem(exc)}") from None
    for key in UNSUPPORTED_PARAMETERS:
        if key in inference.parameters:
            raise ProtocolError(400, f"parameter {key!r} is not supported by this server")
    return inference


def _first_problem(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {error['msg']}" if where else str(error["msg"])


def string_parameter(inference: InferenceRequest, key: str) -> str | None:
    value = inference.parameters.get(key)
    if value is not None and not isinstance(value, str):
        raise ProtocolError(400, f"parameter {key!r} must be a string, got {json.dumps(value)}")
    return value


def requested_outputs(inference: InferenceRequest, model: OnnxModel) -> list[RequestOutput]:
    available = [spec.name for spec in output_specs(model)]
    if inference.outputs is None:
        return [RequestOutput(name=name) for name in available]
    for output in inference.outputs:
        if output.name not in OUTPUT_NAMES:
            raise ProtocolError(
                400,
                f"unknown output {output.name!r}; this server answers {', '.join(OUTPUT_NAMES)}",
            )
        if output.name not in available:
            raise ProtocolError(
                400,
                f"model {model.card.model_name!r} has no {output.name!r} output (its file was "
                "exported before galmorph wrote it, or without it): export it again",
            )
        if "classification" in output.parameters:
            raise ProtocolError(400, "the classification extension is not supported")
    return inference.outputs


def single_input(inference: InferenceRequest, settings: Settings) -> RequestInput:
    """The one input tensor, its name, datatype and shape checked: N within max_batch_files,
    images [N, H, W, 3] with H, W >= 1 inside max_side and max_pixels."""
    names = [tensor.name for tensor in inference.inputs]
    if len(inference.inputs) != 1 or names[0] not in (IMAGES_INPUT, FILES_INPUT):
        raise ProtocolError(
            400,
            f"send exactly one input, {IMAGES_INPUT!r} (UINT8 [N,H,W,3]) or {FILES_INPUT!r} "
            f"(BYTES [N], encoded FITS/PNG/JPEG files); got {names}",
        )
    tensor = inference.inputs[0]
    expected = "UINT8" if tensor.name == IMAGES_INPUT else "BYTES"
    if tensor.datatype != expected:
        raise ProtocolError(400, f"input {tensor.name!r} must be {expected}, not {tensor.datatype}")
    rank = 4 if tensor.name == IMAGES_INPUT else 1
    if len(tensor.shape) != rank or any(d < 0 for d in tensor.shape):
        shape = "[N, H, W, 3]" if rank == 4 else "[N]"
        raise ProtocolError(
            400, f"input {tensor.name!r} must have shape {shape}, got {tensor.shape}"
        )
    count = tensor.shape[0]
    if not 1 <= count <= settings.max_batch_files:
        raise ProtocolError(
            400 if count < 1 else 413,
            f"input {tensor.name!r} holds {count} items; send 1 to {settings.max_batch_files} "
            "per request",
        )
    if tensor.name == IMAGES_INPUT:
        _, height, width, channels = tensor.shape
        if channels != IMAGE_CHANNELS or height < 1 or width < 1:
            raise ProtocolError(
                400,
                f"input {IMAGES_INPUT!r} must be RGB [N, H, W, 3] with H and W at least 1, "
                f"got {tensor.shape}",
            )
        settings.decode_limits.check_declared_shape((height, width), f"input {IMAGES_INPUT!r}")
    return tensor


def binary_size(tensor: RequestInput, settings: Settings) -> int | None:
    """The tensor's binary_data_size (None when its data is in the JSON), checked against
    what its shape needs: N*H*W*3 bytes of images, at most N files of max_body_bytes each.
    Images that, with the largest one's fit, could never fit the memory budget are a 413."""
    size = tensor.parameters.get("binary_data_size")
    if size is None:
        if tensor.data is None:
            raise ProtocolError(400, f"input {tensor.name!r} has neither data nor binary data")
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ProtocolError(
            400, f"input {tensor.name!r}: binary_data_size {json.dumps(size)} is not a byte count"
        )
    count = tensor.shape[0]
    if tensor.name == FILES_INPUT:
        most = count * (settings.max_body_bytes + BYTES_LENGTH_PREFIX)
        if size > most:
            raise PayloadTooLargeError(
                most, f"input {FILES_INPUT!r}: {count} files of {size} bytes in all"
            )
        return size
    needed = math.prod(tensor.shape)
    if size != needed:
        raise ProtocolError(
            400, f"input {IMAGES_INPUT!r}: shape {tensor.shape} needs {needed} bytes, "
            f"binary_data_size is {size}",
        )  # fmt: skip
    fit = ARRAY_FIT_BYTES_PER_PIXEL * tensor.shape[1] * tensor.shape[2]
    budget = settings.decode_memory_budget_bytes
    if size + fit > budget:
        raise PayloadTooLargeError(
            budget,
            f"input {IMAGES_INPUT!r} of {size} bytes, with {fit} more to fit one image, "
            "(the memory budget)",
        )
    return size


def tensor_items(tensor: RequestInput, binary: bytearray | None) -> list[Any]:
    """The input as N images (uint8 arrays) or N files (memoryviews of the body's bytes)."""
    count = tensor.shape[0]
    if tensor.name == FILES_INPUT:
        files = _bytes_elements(tensor, binary)
        if len(files) != count:
            raise ProtocolError(400, f"shape {tensor.shape} but {len(files)} files were sent")
        return files
    return list(_uint8_images(tensor, binary))


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    return [value for item in data for value in _flatten(item)]


def _bytes_elements(tensor: RequestInput, raw: bytearray | None) -> list[memoryview | bytes]:
    files: list[memoryview | bytes] = []
    if raw is not None:
        # Triton's layout: each element is a 4-byte little-endian length, then the bytes.
        view = memoryview(raw)
        offset = 0
        while offset < len(raw):
            if offset + BYTES_LENGTH_PREFIX > len(raw):
                raise ProtocolError(400, f"input {FILES_INPUT!r}: truncated element length")
            length = int.from_bytes(view[offset : offset + BYTES_LENGTH_PREFIX], "little")
            offset += BYTES_LENGTH_PREFIX
            if offset + length > len(raw):
                raise ProtocolError(400, f"input {FILES_INPUT!r}: element {len(files)} truncated")
            files.append(view[offset : offset + length])
            offset += length
        return files
    for index, value in enumerate(_flatten(tensor.data)):
        if not isinstance(value, str):
            raise ProtocolError(400, f"{FILES_INPUT}[{index}]: expected a base64 string")
        try:
            files.append(base64.b64decode(value, validate=True))
        except binascii.Error:
            raise ProtocolError(
                400, f"{FILES_INPUT}[{index}]: not base64 (in JSON, files are base64-encoded)"
            ) from None
    return files


def _uint8_images(tensor: RequestInput, raw: bytearray | None) -> np.ndarray:
    """[N, H, W, 3] over the body's bytes (no copy) or from the JSON's values."""
    count = math.prod(tensor.shape)
    if raw is not None:
        return np.frombuffer(raw, np.uint8).reshape(tensor.shape)
    values = _flatten(tensor.data)
    if len(values) != count:
        raise ProtocolError(400, f"shape {tensor.shape} needs {count} values, got {len(values)}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in values):
        raise ProtocolError(400, f"input {IMAGES_INPUT!r}: UINT8 values are integers 0..255")
    return np.asarray(values, np.uint8).reshape(tensor.shape)


def encode_response(
    document: dict[str, Any], outputs: list[tuple[RequestOutput, np.ndarray]], binary: bool
) -> tuple[bytes, int | None]:
    """The response body: `document` (model_name, model_version, id) with each output as a
    tensor, its values in the JSON or, where asked for (`binary` the default), as binary data
    after it; and the JSON's length when binary data follows (for HEADER_LENGTH), else None."""
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for request_output, values in outputs:
        datatype = "BOOL" if values.dtype == np.bool_ else "FP32"
        values = values.astype(DTYPES[datatype], copy=False)
        entry: dict[str, Any] = {
            "name": request_output.name,
            "datatype": datatype,
            "shape": list(values.shape),
        }
        if request_output.parameters.get("binary_data", binary):
            blob = np.ascontiguousarray(values).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = values.reshape(-1).tolist()
        entries.append(entry)
    header = json.dumps({**document, "outputs": entries}, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)
