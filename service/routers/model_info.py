"""GET /model (the Open Inference Protocol's model metadata is in inference_protocol.py)."""

from __future__ import annotations

import dataclasses
from typing import Any

from fastapi import APIRouter, Depends

from galmorph.core.cutouts.imaging import STRETCHES
from galmorph.core.modelfile.contract import INPUT_NAME
from galmorph.core.modelfile.engine import OnnxModel
from galmorph.service.dependencies import ReadyModelDep, require_api_key
from galmorph.service.results import model_version
from galmorph.service.schemas import ModelInfo, TensorSpec, error_responses

router = APIRouter(tags=["model"], dependencies=[Depends(require_api_key)])

ONNX_TO_KSERVE = {"tensor(uint8)": "UINT8", "tensor(float)": "FP32", "tensor(float16)": "FP16"}


def tensor_specs(nodes: list[Any]) -> list[TensorSpec]:
    # Symbolic dimensions (the dynamic batch) are -1, as in the KServe v2 protocol.
    return [
        TensorSpec(
            name=node.name,
            datatype=ONNX_TO_KSERVE.get(node.type, node.type),
            shape=[dim if isinstance(dim, int) else -1 for dim in node.shape],
        )
        for node in nodes
    ]


def model_info(model: OnnxModel, batching: dict[str, float]) -> ModelInfo:
    card = model.card
    (input_spec,) = [s for s in tensor_specs(model.session.get_inputs()) if s.name == INPUT_NAME]
    return ModelInfo(
        name=card.model_name,
        version=model_version(model),
        sha256=model.sha256,
        class_names=list(card.class_names),
        input=input_spec,
        outputs=tensor_specs(model.session.get_outputs()),
        preprocessing={
            **card.input_spec.values(),
            "normalisation": "inside the graph: x/255, (x - mean)/std, NHWC->NCHW",
            "field_of_view_arcsec": list(card.field_of_view),
            "stretches": sorted(STRETCHES),
        },
        providers=model.providers,
        requested_providers=model.requested_providers,
        onnxruntime_version=model.ort_version,
        engine=model.engine_report(),
        batching=batching,
        card=dataclasses.asdict(card),
    )


@router.get(
    "/model",
    response_model=ModelInfo,
    responses=error_responses(401, 503),
    summary="The served model and how it runs",
)
async def get_model(ready: ReadyModelDep) -> ModelInfo:
    return model_info(ready.model, dataclasses.asdict(ready.batcher.config))
