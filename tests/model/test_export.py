"""ONNX export: graph contract, metadata, parity gate, fast-graph regression, int8, bad inputs."""

from __future__ import annotations

import argparse
import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from torch import nn

from galmorph.core import files
from galmorph.core.data.galaxy10 import GALAXY10_CLASS_NAMES
from galmorph.core.modelfile.artifact import GRAPH_FILE_NAME, WEIGHTS_FILE_NAME, artifact_sha256
from galmorph.core.modelfile.contract import (
    EMBEDDINGS_NAME,
    INPUT_NAME,
    LOGITS_NAME,
    OUTPUT_NAME,
    ModelCard,
)
from galmorph.core.modelfile.engine import OnnxModel
from galmorph.model import checkpoint as checkpoint_module
from galmorph.model import cli as model_cli
from galmorph.model import export as export_module
from galmorph.model.checkpoint import CheckpointError, ModelSpec, load_model, save_model
from galmorph.model.export import ExportError, ImageClassifierGraph, export_model
from galmorph.model.registry import create_model
from galmorph.model.sample_images import load_images

NAME = "gm_astroformer_tiny"
SIZE = 64


def _session(path: Path, **options: object) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    for key, value in options.items():
        setattr(so, key, value)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _make_run(run_dir: Path, seed: int = 0) -> tuple[nn.Module, ModelSpec]:
    torch.manual_seed(seed)
    model = create_model(NAME, num_classes=10, img_size=SIZE).eval()
    spec = ModelSpec(
        name=NAME,
        num_classes=10,
        img_size=SIZE,
        class_names=GALAXY10_CLASS_NAMES,
        training_data={"digest": "abc123", "num_images": 20},
        metrics={"val_accuracy": 0.5},
    )
    save_model(run_dir, model, spec)
    return model, spec


def _real_labels(folder: Path) -> np.ndarray:
    # sample_{k}_*.jpg is class k-1, class{c}_*.png is class c (tests/data/README.md).
    labels = []
    for file in sorted(p for p in folder.iterdir() if p.suffix in (".png", ".jpg")):
        stem = file.stem
        labels.append(int(stem[5]) if stem.startswith("class") else int(stem.split("_")[1]) - 1)
    return np.asarray(labels)


@pytest.fixture(scope="module")
def real_images(real_data: Path) -> tuple[np.ndarray, np.ndarray]:
    folder = real_data / "galaxy10-real"
    images, _ = load_images(folder, size=SIZE, count=100)
    return images, _real_labels(folder)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, real_data: Path) -> dict:
    """One fp32 export through the CLI handler, with real images for the parity check."""
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("run")
    model, spec = _make_run(run)
    out = run / "exported" / "model.onnx"
    parser = argparse.ArgumentParser()
    model_cli.register(parser.add_subparsers())
    args = parser.parse_args(
        [
            "export",
            str(run),
            "--out",
            str(out),
            "--parity-data",
            str(real_data / "galaxy10-real"),
            "--threads",
            "1",
        ]
    )
    assert args.func(args) == 0
    return {"run": run, "path": out, "model": model, "spec": spec}


def test_graph_contract(exported: dict) -> None:
    proto = onnx.load(str(exported["path"]))
    (graph_input,) = proto.graph.input
    assert graph_input.name == INPUT_NAME
    tensor_type = graph_input.type.tensor_type
    assert tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].HasField("dim_value")  # dynamic batch
    assert [d.dim_value for d in dims[1:]] == [SIZE, SIZE, 3]
    outputs = {o.name: o.type.tensor_type for o in proto.graph.output}
    # No labelled data was given: no OOD score, and the card says why there is no calibration.
    assert set(outputs) == {OUTPUT_NAME, LOGITS_NAME, EMBEDDINGS_NAME}
    hidden = exported["model"].classifier.in_features
    for name, out in outputs.items():
        assert out.elem_type == onnx.TensorProto.FLOAT
        assert out.shape.dim[0].dim_param == dims[0].dim_param
        assert out.shape.dim[1].dim_value == (hidden if name == EMBEDDINGS_NAME else 10)
    assert {o.version for o in proto.opset_import if o.domain == ""} == {20}
    assert not list(exported["path"].parent.glob(".export-*"))  # no leftovers


def test_metadata_round_trips_through_model_card(exported: dict) -> None:
    proto = onnx.load(str(exported["path"]))
    props = {p.key: p.value for p in proto.metadata_props}
    card = ModelCard.from_metadata(props)
    spec: ModelSpec = exported["spec"]
    assert card.model_name == NAME
    assert card.class_names == GALAXY10_CLASS_NAMES
    assert card.input_size == (SIZE, SIZE)
    assert card.mean == spec.mean and card.std == spec.std
    assert card.stretch == "dr2_rgb" and card.bands == {"R": "z", "G": "r", "B": "g"}
    assert card.pixel_scale == spec.pixel_scale
    assert card.training_data == spec.training_data
    assert card.metrics == {"val_accuracy": 0.5}
    assert card.model_config["img_size"] == SIZE
    assert card.precision == "fp32" and card.package_version and card.created
    assert card.calibration["applied"] is False and card.calibration["temperature"] == 1.0
    assert "no labelled images" in card.calibration["reason"] and card.ood == {}
    parity = json.loads(props[export_module.PARITY_KEY])
    assert parity["max_abs_diff"] <= 1e-4 and parity["argmax_agreement"] == 1.0
    assert parity["num_real_images"] == 20


@pytest.mark.parametrize("batch", [1, 5])
def test_onnxruntime_matches_pytorch(exported: dict, real_images, batch: int) -> None:
    images = np.concatenate(
        [
            real_images[0][:batch],
            np.random.default_rng(batch).integers(0, 256, (batch, SIZE, SIZE, 3), dtype=np.uint8),
        ]
    )
    spec: ModelSpec = exported["spec"]
    reference = ImageClassifierGraph(exported["model"], spec.mean, spec.std).eval()
    names = [OUTPUT_NAME, LOGITS_NAME, EMBEDDINGS_NAME]
    probs, logits, embeddings = _session(exported["path"]).run(names, {INPUT_NAME: images})
    with torch.no_grad():
        want_probs, want_logits, want_embeddings = (
            t.numpy() for t in reference(torch.from_numpy(images))
        )
        # The embeddings are the pre-logit representation: what the last Linear layer reads.
        x = reference.preprocess(torch.from_numpy(images))
        pre_logits = exported["model"].forward_pre_logits(x).numpy()
    assert probs.dtype == np.float32 and probs.shape == (2 * batch, 10)
    assert np.abs(probs - want_probs).max() <= 1e-4
    assert np.abs(logits - want_logits).max() <= 1e-3
    assert np.abs(embeddings - want_embeddings).max() <= 1e-4
    np.testing.assert_array_equal(want_embeddings, pre_logits)
    assert (probs.argmax(1) == want_probs.argmax(1)).all()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_fast_graph_fusions_present(exported: dict, tmp_path: Path) -> None:
    """Guards against regressing to the slow graph (opset 18: GELU as Div/Erf/Add/Mul chains
    that onnxruntime does not fuse back)."""
    optimized = tmp_path / "optimized.onnx"
    _session(
        exported["path"],
        graph_optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        optimized_model_filepath=str(optimized),
    )
    ops = Counter(node.op_type for node in onnx.load(str(optimized)).graph.node)
    model: nn.Module = exported["model"]
    leaves = [
        m
        for m in model.modules()
        if not list(m.children()) and not isinstance(m, nn.Identity | nn.Dropout)
    ]
    num_gelu = sum(isinstance(m, nn.GELU) for m in leaves)
    num_silu = sum(isinstance(m, nn.SiLU) for m in leaves)
    assert ops["Erf"] == 0
    assert ops["Gelu"] == num_gelu  # one kernel per GELU
    assert ops["QuickGelu"] == num_silu  # x * sigmoid(x) fused
    assert ops["FusedMatMul"] >= 2 and ops["LayerNormalization"] >= 3
    # About one node per layer; the CPU layout nodes (NCHWc Reorder*) depend on the CPU.
    compute_nodes = sum(n for op, n in ops.items() if not op.startswith("Reorder"))
    assert compute_nodes <= len(leaves) + 20


def test_int8_export_records_accuracy_change(exported: dict, real_images, tmp_path: Path) -> None:
    images, labels = real_images
    out = tmp_path / "model.int8.onnx"
    report = export_model(
        exported["run"],
        out,
        precision="int8",
        calib_images=images[:12],
        eval_images=images,
        eval_labels=labels,
        intra_op_threads=1,
    )
    proto = onnx.load(str(out))
    ops = Counter(node.op_type for node in proto.graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    card = ModelCard.from_metadata({p.key: p.value for p in proto.metadata_props})
    assert card.precision == "int8"
    change = card.metrics["int8_eval"]
    assert change == report.card.metrics["int8_eval"]
    assert change["num_images"] == len(images)
    assert change["accuracy_change"] == pytest.approx(
        change["int8_accuracy"] - change["fp32_accuracy"]
    )
    assert 0.0 <= change["prediction_agreement"] <= 1.0
    probs = _session(out).run([OUTPUT_NAME], {INPUT_NAME: images[:3]})[0]
    assert probs.dtype == np.float32 and probs.shape == (3, 10)


def test_failed_parity_leaves_no_file(
    exported: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(export_module.PARITY_TOLERANCE, "fp32", -1.0)
    out = tmp_path / "model.onnx"
    with pytest.raises(ExportError, match="does not reproduce PyTorch"):
        export_model(exported["run"], out, intra_op_threads=1)
    assert list(tmp_path.iterdir()) == []


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        export_model(tmp_path / "nowhere", tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


def test_damaged_weights_are_a_clear_error(tmp_path: Path) -> None:
    _make_run(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged"):
        export_model(tmp_path, tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


def test_truncated_weights_with_matching_hash_are_refused(tmp_path: Path) -> None:
    _make_run(tmp_path)
    weights, spec_path = tmp_path / "model.safetensors", tmp_path / "model.json"
    weights.write_bytes(weights.read_bytes()[:100])
    document = json.loads(spec_path.read_text())
    document["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    spec_path.write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        export_model(tmp_path, tmp_path / "model.onnx")


@pytest.mark.parametrize("crash_at", ["weights_rename", "final_spec"])
def test_a_save_killed_between_its_two_files_leaves_a_loadable_pair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_at: str
) -> None:
    old_model, spec = _make_run(tmp_path, seed=0)
    torch.manual_seed(1)
    new_model = create_model(NAME, num_classes=10, img_size=SIZE).eval()
    real_replace, real_write_text = files.durable_replace, checkpoint_module.atomic_write_text

    def replace(source: Path, target: Path) -> None:
        if crash_at == "weights_rename" and Path(target).suffix == ".safetensors":
            raise KeyboardInterrupt  # killed after the transition spec, before the weights
        real_replace(source, target)

    def write_text(path: Path, text: str) -> Path:
        if crash_at == "final_spec" and "previous_weights_sha256" not in text:
            raise KeyboardInterrupt  # killed after the weights, before the spec naming them
        return real_write_text(path, text)

    monkeypatch.setattr(files, "durable_replace", replace)
    monkeypatch.setattr(checkpoint_module, "atomic_write_text", write_text)
    with pytest.raises(KeyboardInterrupt):
        save_model(tmp_path, new_model, spec)
    monkeypatch.undo()
    loaded, _ = load_model(tmp_path)
    expected = old_model if crash_at == "weights_rename" else new_model
    for name, tensor in expected.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor)


def test_bad_parity_images_are_refused(exported: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"uint8 \(N, 64, 64, 3\)"):
        export_model(
            exported["run"], tmp_path / "m.onnx", parity_images=np.zeros((2, 32, 32, 3), np.uint8)
        )


@pytest.mark.parametrize(
    ("name", "size"),
    [("gm_astroformer_tiny", 32), ("gm_astroformer_small", 32), ("vit_small_spt_lsa", 32)],
)
def test_every_architecture_reads_its_embeddings_in_its_last_layer(name: str, size: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, img_size=size).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        embeddings = model.forward_pre_logits(x)
        torch.testing.assert_close(model.classifier(embeddings), model(x))
    assert embeddings.shape == (2, model.classifier.in_features)


def test_a_model_over_the_single_file_limit_is_a_folder_loaded_like_a_file(
    exported: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 2 GiB limit lowered to 1 MiB: the same weights go to external data."""
    monkeypatch.setattr(export_module, "MAX_SINGLE_FILE_BYTES", 2**20)
    out = tmp_path / "folder_model"
    report = export_model(exported["run"], out, intra_op_threads=1)
    assert sorted(p.name for p in out.iterdir()) == [GRAPH_FILE_NAME, WEIGHTS_FILE_NAME]
    graph = out / GRAPH_FILE_NAME
    assert graph.stat().st_size < 2**20 < (out / WEIGHTS_FILE_NAME).stat().st_size
    assert report.size_bytes == sum(p.stat().st_size for p in out.iterdir())
    folder, single = (
        OnnxModel(out, intra_op_threads=1),
        OnnxModel(exported["path"], intra_op_threads=1),
    )
    assert folder.sha256 == artifact_sha256(out) != single.sha256
    assert folder.card.model_name == NAME and folder.has_embeddings
    images = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    np.testing.assert_array_equal(folder.predict(images), single.predict(images))
    # A second export replaces the folder whole; nothing else is left beside it.
    export_model(exported["run"], out, intra_op_threads=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder_model"]
    # The server and the scorer take the folder wherever they take a model file.
    from galmorph.scoring.run import ScoreConfig, score
    from tests.support.app_client import running, settings_for

    with running(settings_for(out)) as client:
        assert client.get("/model").json()["sha256"] == artifact_sha256(out)
    cutouts = tmp_path / "cutouts"
    cutouts.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(cutouts / f"g{i}.png")
    summary = score(
        ScoreConfig(catalog=str(cutouts), model=out, out_dir=tmp_path / "scores", workers=0,
                    ort_threads=1, providers=("CPUExecutionProvider",), progress=False)
    )  # fmt: skip
    assert summary.rows_scored == 3 and not summary.errors


def test_astroformer_5_weights_go_to_external_data_in_fp32_only() -> None:
    """Checked on the meta device: the shapes alone, no memory."""
    with torch.device("meta"):
        model = create_model("astroformer_5", num_classes=10, img_size=256)
    assert export_module.weight_bytes(model, "fp32") > export_module.MAX_SINGLE_FILE_BYTES
    assert export_module.weight_bytes(model, "fp16") < export_module.MAX_SINGLE_FILE_BYTES
    assert export_module.weight_bytes(model, "fp32") == pytest.approx(593.56e6 * 4, rel=0.01)
