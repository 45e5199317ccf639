"""Small, real galmorph ONNX models built with onnx.helper (no torch), for service tests.

The graph follows the contract in galmorph/core/modelfile/contract.py: input `images` uint8 [N, H,
W, 3]; /255, mean/std and NHWC->NCHW inside; a strided conv, `extra_convs` same-size 3x3 convs (the
knob that makes the model as slow as a benchmark needs), global average pool, a linear head;
outputs `logits` and `probabilities` (softmax), `embeddings` (the pooled features the head
reads; `embeddings=False` builds a model from before they existed) and, with an
`ood_threshold`, `ood_score` (mean squared embedding). Weights are seeded, so outputs are
deterministic for a given image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from galmorph.core.data.galaxy10 import GALAXY10_CLASS_NAMES
from galmorph.core.inputspec import IMAGENET_MEAN, IMAGENET_STD
from galmorph.core.modelfile.contract import (
    EMBEDDINGS_NAME,
    INPUT_NAME,
    LOGITS_NAME,
    OOD_SCORE_NAME,
    OUTPUT_NAME,
    ModelCard,
)


@dataclass(frozen=True)
class FactoryModel:
    input_size: int = 64
    channels: int = 8
    extra_convs: int = 0  # artificial compute cost: same-size 3x3 convs after the stem
    class_names: tuple[str, ...] = GALAXY10_CLASS_NAMES
    seed: int = 0
    model_name: str = "test_factory_model"
    fixed_batch: int | None = None  # None: dynamic N as the contract asks
    embeddings: bool = True  # False: a file from before the embeddings output
    ood_threshold: float | None = None  # an `ood_score` output with this threshold in the card
    metadata_overrides: dict[str, str] = field(default_factory=dict)

    def card(self) -> ModelCard:
        return ModelCard(
            model_name=self.model_name,
            class_names=self.class_names,
            input_size=(self.input_size, self.input_size),
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            model_config={"extra_convs": self.extra_convs, "channels": self.channels},
            ood={}
            if self.ood_threshold is None
            else {"method": "test", "threshold": self.ood_threshold},
            package_version="test",
            created="2025-01-01T00:00:00Z",
        )


def build_model(spec: FactoryModel) -> onnx.ModelProto:
    rng = np.random.default_rng(spec.seed)
    size, ch, k = spec.input_size, spec.channels, len(spec.class_names)

    def const(name: str, value: np.ndarray) -> str:
        initializers.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    def conv_weight(name: str, out_ch: int, in_ch: int) -> str:
        scale = np.sqrt(2.0 / (in_ch * 9))
        return const(name, rng.normal(0.0, scale, (out_ch, in_ch, 3, 3)))

    initializers: list[onnx.TensorProto] = []
    mean = np.array(IMAGENET_MEAN, np.float32).reshape(1, 1, 1, 3) * 255.0
    std = np.array(IMAGENET_STD, np.float32).reshape(1, 1, 1, 3) * 255.0
    nodes = [
        helper.make_node("Cast", [INPUT_NAME], ["x_float"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["x_float", const("mean255", mean)], ["x_centred"]),
        helper.make_node("Div", ["x_centred", const("std255", std)], ["x_norm"]),
        helper.make_node("Transpose", ["x_norm"], ["x_nchw"], perm=[0, 3, 1, 2]),
        helper.make_node(
            "Conv",
            ["x_nchw", conv_weight("stem_w", ch, 3), const("stem_b", np.zeros(ch))],
            ["stem"],
            kernel_shape=[3, 3],
            strides=[2, 2],
            pads=[1, 1, 1, 1],
        ),
        helper.make_node("Relu", ["stem"], ["h0"]),
    ]
    current = "h0"
    for i in range(spec.extra_convs):
        nodes.append(
            helper.make_node(
                "Conv",
                [current, conv_weight(f"conv{i}_w", ch, ch), const(f"conv{i}_b", np.zeros(ch))],
                [f"conv{i}"],
                kernel_shape=[3, 3],
                pads=[1, 1, 1, 1],
            )
        )
        nodes.append(helper.make_node("Relu", [f"conv{i}"], [f"h{i + 1}"]))
        current = f"h{i + 1}"
    head_w = rng.normal(0.0, 1.0, (ch, k)) * 2.0
    nodes += [
        helper.make_node("GlobalAveragePool", [current], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["features"], axis=1),
        helper.make_node("MatMul", ["features", const("head_w", head_w)], ["head"]),
        helper.make_node("Add", ["head", const("head_b", rng.normal(0, 0.1, k))], [LOGITS_NAME]),
        helper.make_node("Softmax", [LOGITS_NAME], [OUTPUT_NAME], axis=-1),
    ]
    batch: int | str = spec.fixed_batch if spec.fixed_batch is not None else "N"
    optional = []
    if spec.embeddings:
        nodes.append(helper.make_node("Identity", ["features"], [EMBEDDINGS_NAME]))
        optional.append(
            helper.make_tensor_value_info(EMBEDDINGS_NAME, TensorProto.FLOAT, [batch, ch])
        )
    if spec.ood_threshold is not None:
        nodes += [
            helper.make_node("Mul", ["features", "features"], ["features_squared"]),
            helper.make_node(
                "ReduceMean", ["features_squared"], [OOD_SCORE_NAME], axes=[1], keepdims=0
            ),
        ]
        optional.append(helper.make_tensor_value_info(OOD_SCORE_NAME, TensorProto.FLOAT, [batch]))
    graph = helper.make_graph(
        nodes,
        spec.model_name,
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, [batch, size, size, 3])],
        [
            helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [batch, k]),
            helper.make_tensor_value_info(LOGITS_NAME, TensorProto.FLOAT, [batch, k]),
            *optional,
        ],
        initializer=initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="galmorph-tests"
    )
    model.ir_version = 8
    metadata = {**spec.card().to_metadata(), **spec.metadata_overrides}
    helper.set_model_props(model, metadata)
    onnx.checker.check_model(model)
    return model


def write_model(path: Path, spec: FactoryModel | None = None) -> Path:
    """Build the model for `spec` (defaults: small and fast) and save it to `path`."""
    onnx.save(build_model(spec or FactoryModel()), str(path))
    return path
