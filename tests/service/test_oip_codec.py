"""The Open Inference Protocol's tensor codec alone (galmorph.service.oip.codec), no server:
each datatype both ways, in JSON and as binary tensor data, read and written as Triton's own
client library (tritonclient) writes and reads them; and the shape and limit refusals.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import serialize_byte_tensor

from galmorph.core.cutouts.limits import CutoutError
from galmorph.service.oip.codec import (
    binary_size,
    encode_response,
    parse_request,
    single_input,
    tensor_items,
)
from galmorph.service.oip.models import ProtocolError, RequestInput, RequestOutput
from galmorph.service.settings import Settings
from galmorph.service.uploads import PayloadTooLargeError

SETTINGS = Settings(_env_file=None, max_batch_files=4, max_side=64)  # type: ignore[call-arg]
FILES = [b"SIMPLE  =                    T", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"]


def unlimited(nbytes: int, what: str) -> None:
    """A memory budget that holds anything."""


def request_input(document: dict[str, Any]) -> RequestInput:
    """The one input of a request, parsed and checked as the server does."""
    inference = parse_request(bytearray(json.dumps(document).encode()), unlimited)
    return single_input(inference, SETTINGS)


def decode(tensor: RequestInput, binary: bytes | None = None) -> list[Any]:
    assert binary_size(tensor, SETTINGS) == (None if binary is None else len(binary))
    return tensor_items(tensor, None if binary is None else bytearray(binary))


def images_request(images: np.ndarray, binary: bool) -> tuple[dict[str, Any], bytes | None]:
    tensor = triton.InferInput("images", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images, binary_data=binary)
    document = {"inputs": [tensor._get_tensor()]}
    return document, tensor._get_binary_data()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_uint8_images_arrive_as_sent(binary: bool) -> None:
    images = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    document, data = images_request(images, binary)
    assert (data is not None) == binary
    received = decode(request_input(document), data)
    assert len(received) == 2
    np.testing.assert_array_equal(np.stack(received), images)


def test_bytes_files_arrive_as_sent_in_triton_layout_and_base64() -> None:
    array = np.array(FILES, dtype=object)
    serialized = serialize_byte_tensor(array)
    assert serialized is not None
    raw = serialized.item()
    tensor = {"name": "files", "shape": [3], "datatype": "BYTES"}
    binary = request_input({"inputs": [{**tensor, "parameters": {"binary_data_size": len(raw)}}]})
    assert [bytes(item) for item in decode(binary, raw)] == FILES
    texts = [base64.b64encode(data).decode() for data in FILES]
    assert [
        bytes(item) for item in decode(request_input({"inputs": [{**tensor, "data": texts}]}))
    ] == FILES


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_fp32_and_bool_outputs_read_back_by_tritonclient(binary: bool) -> None:
    probabilities = np.random.default_rng(1).random((3, 4), dtype=np.float32)
    flags = np.array([True, False, True])
    outputs = [(RequestOutput(name="probabilities"), probabilities),
               (RequestOutput(name="in_distribution"), flags)]  # fmt: skip
    body, json_length = encode_response({"model_name": "m", "model_version": "v"}, outputs, binary)
    assert (json_length is not None) == binary
    result = triton.InferResult.from_response_body(body, header_length=json_length)
    read = result.get_response()
    assert [o["datatype"] for o in read["outputs"]] == ["FP32", "BOOL"]
    assert read["model_name"] == "m" and read["model_version"] == "v"
    np.testing.assert_array_equal(result.as_numpy("probabilities"), probabilities)
    np.testing.assert_array_equal(result.as_numpy("in_distribution"), flags)


def test_an_output_can_ask_for_the_other_form_than_the_default() -> None:
    values = np.zeros((1, 2), np.float32)
    outputs = [(RequestOutput(name="probabilities", parameters={"binary_data": True}), values)]
    body, json_length = encode_response({}, outputs, binary=False)
    assert json_length is not None and len(body) == json_length + values.nbytes


def test_shapes_beyond_the_limits_are_refused_with_what_was_wrong() -> None:
    def images(shape: list[int], **parameters: Any) -> dict[str, Any]:
        tensor = {"name": "images", "shape": shape, "datatype": "UINT8"}
        return {"inputs": [{**tensor, "parameters": parameters}]}

    with pytest.raises(CutoutError, match=r"declares shape \(65, 8\): a side exceeds .* 64"):
        request_input(images([1, 65, 8, 3]))
    with pytest.raises(ProtocolError, match="holds 5 items; send 1 to 4") as many:
        request_input(images([5, 8, 8, 3]))
    assert many.value.status == 413
    with pytest.raises(ProtocolError, match=r"must be RGB \[N, H, W, 3\]") as grey:
        request_input(images([1, 8, 8, 1]))
    assert grey.value.status == 400
    wrong = request_input(images([1, 8, 8, 3], binary_data_size=100))
    with pytest.raises(ProtocolError, match="needs 192 bytes, binary_data_size is 100"):
        binary_size(wrong, SETTINGS)
    files = {"name": "files", "shape": [1], "datatype": "BYTES"}
    huge = {**files, "parameters": {"binary_data_size": 4 * SETTINGS.max_body_bytes}}
    with pytest.raises(PayloadTooLargeError, match="input 'files': 1 files of"):
        binary_size(request_input({"inputs": [huge]}), SETTINGS)
    with pytest.raises(ProtocolError, match=r"shape \[2\] but 1 files were sent"):
        decode(request_input({"inputs": [{**files, "shape": [2], "data": ["AAAA"]}]}))
    with pytest.raises(ProtocolError, match="send exactly one input"):
        request_input({"inputs": [{**files, "name": "pixels"}]})
