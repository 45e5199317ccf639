"""Your own labelled galaxies: class names, --val-fraction, evaluating a separate file, and
fine-tuning with --init-from (another class count, timm weights, frozen stages, layer decay)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from galmorph.cli import build_parser
from galmorph.core.data.galaxy10 import Galaxy10Error, Galaxy10File
from galmorph.model.astroformer import Astroformer, AstroformerConfig
from galmorph.model.registry import create_model
from galmorph.training.config import ConfigError
from galmorph.training.evaluate import EvaluationError, EvaluationRequest, evaluate
from galmorph.training.finetune import freeze_stages, initialise_from, layer_ids
from galmorph.training.optim import CosineSchedule, adamw
from galmorph.training.train import train
from galmorph.training.train_cli import _with_split_flags
from tests.support.real_data import build_real_sets_module
from tests.support.training_helpers import (
    FOUR_CLASSES,
    four_class_file,
    make_synthetic,
    run_galmorph,
    tiny_config,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("small_data")
    train_g10 = make_synthetic(root / "g10_train.h5", n=120, seed=0)
    test_g10 = make_synthetic(root / "g10_test.h5", n=40, seed=1)
    return {
        "train": four_class_file(root / "train.h5", train_g10, FOUR_CLASSES),
        "test": four_class_file(root / "test.h5", test_g10, FOUR_CLASSES),
        "unnamed": four_class_file(root / "unnamed.h5", train_g10, None),
        "unnamed_test": four_class_file(root / "unnamed_test.h5", test_g10, None),
        "g10": train_g10,
    }


@pytest.fixture(scope="module")
def four_class_run(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run4") / "run"
    return train(tiny_config(files["train"], out, epochs=1, mixup={"mixup_alpha": 0.0}))


# ----------------------------------------------------------------------------- class names
def test_a_file_without_names_is_never_read_as_galaxy10(
    files: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"no class names.*--class-names"):
        train(tiny_config(files["unnamed"], tmp_path / "run"))
    data = Galaxy10File(files["unnamed"], class_names=FOUR_CLASSES)
    assert data.class_names == FOUR_CLASSES and data.class_names_source == "the given class names"


def test_sidecar_names_the_classes_and_disagreeing_names_are_refused(
    files: dict[str, Path], tmp_path: Path
) -> None:
    data = tmp_path / "mine.h5"
    data.write_bytes(files["unnamed"].read_bytes())
    (tmp_path / "mine.classes.txt").write_text("\n".join(FOUR_CLASSES) + "\n")
    assert Galaxy10File(data).class_names == FOUR_CLASSES
    with pytest.raises(Galaxy10Error, match=r"class names disagree.*sidecar mine\.classes\.txt"):
        Galaxy10File(data, class_names=("a", "b", "c", "d"))
    with pytest.raises(Galaxy10Error, match=r"outside 0\.\.2 .* for the 3 class names"):
        Galaxy10File(files["unnamed"], class_names=("a", "b", "c"))


def test_class_names_flag_and_set_reach_the_config() -> None:
    args = build_parser().parse_args(
        ["train", "--out", "o", "--class-names", "a, b,c", "--val-fraction", "0"]
    )
    assert args.class_names == ("a", "b", "c") and args.val_fraction == 0.0
    from galmorph.training.config import load_config

    assert load_config(None, ["class_names=x,y"]).class_names == ("x", "y")


# ----------------------------------------------------------------------------- val fraction
def test_val_fraction_is_in_help_and_sets_the_split() -> None:
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()  # type: ignore[union-attr]
    assert "--val-fraction" in help_text and "--test-fraction" in help_text
    config = tiny_config(Path("d.h5"), Path("o"))
    assert _with_split_flags(config, 0.0, None).split_fractions == pytest.approx((0.9, 0.0, 0.1))
    assert _with_split_flags(config, 0.2, 0.0).split_fractions == pytest.approx((0.8, 0.2, 0.0))
    with pytest.raises(ConfigError, match="leave a training share"):
        _with_split_flags(config, 0.6, 0.5)


def test_val_fraction_zero_trains_on_every_row(files: dict[str, Path], tmp_path: Path) -> None:
    result = run_galmorph(
        "train", "--data", files["train"], "--out", tmp_path / "run", "--model",
        "gm_astroformer_tiny", "--val-fraction", "0", "--test-fraction", "0",
        "--set", "img_size=32", "--set", "epochs=1", "--set", "warmup_epochs=0",
        "--set", "batch_size=16",
        "--set", "num_workers=0", "--set", "progress=false", "--set", "mixup.mixup_alpha=0",
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "120 train, 0 val, 0 test" in result.stderr
    assert "no validation (val fraction 0)" in result.stderr
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert len(split["train"]) == 120 and split["val"] == [] and split["test"] == []
    epochs = [
        json.loads(line)
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if '"epoch"' in line and '"kind": "epoch"' in line
    ]
    assert epochs and "val_top1" not in epochs[0]
    # Its own (empty) test split is refused with the way out.
    result = run_galmorph("evaluate", tmp_path / "run", files["train"], "--split", "test")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "test split" in result.stderr and "is empty" in result.stderr


# -------------------------------------------------------------------- evaluate another file
def test_evaluate_on_a_separate_file_uses_all_its_rows(
    files: dict[str, Path], four_class_run: Path, tmp_path: Path
) -> None:
    result = run_galmorph(
        "evaluate", four_class_run, "--data", files["test"], "--out", tmp_path, "--no-progress"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "not the file the model was trained on: evaluating all its 40 rows" in result.stderr
    summary = json.loads(result.stdout)
    assert summary["split"] == "all" and summary["num_images"] == 40
    # A file naming no classes is read with the model's names, and says so.
    report = evaluate(
        EvaluationRequest(model=four_class_run, data=files["unnamed_test"], progress=False,
                          out_dir=tmp_path / "unnamed")
    )  # fmt: skip
    assert report["num_images"] == 40 and report["class_names"] == list(FOUR_CLASSES)
    # Rows of another file are in no split of this run.
    with pytest.raises(EvaluationError, match="leave out --split"):
        evaluate(EvaluationRequest(model=four_class_run, data=files["test"], split="test"))


def test_evaluate_refuses_a_file_with_other_classes(
    files: dict[str, Path], four_class_run: Path
) -> None:
    result = run_galmorph("evaluate", four_class_run, "--data", files["g10"], "--no-progress")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "differ from those of" in result.stderr and "Round Smooth" in result.stderr


# ----------------------------------------------------------------------------- fine-tuning
def test_init_from_a_10_class_run_re_initialises_the_head_for_4_classes(
    files: dict[str, Path], tmp_path: Path
) -> None:
    source = train(
        tiny_config(files["g10"], tmp_path / "g10", epochs=1, mixup={"mixup_alpha": 0.0})
    )
    source_state = load_file(str(source / "model.safetensors"))
    torch.manual_seed(0)
    model = create_model("gm_astroformer_tiny", num_classes=4, img_size=32)
    fresh_fc = model.classifier.weight.detach().clone()
    report = initialise_from(
        model, source, model_name="gm_astroformer_tiny", class_names=FOUR_CLASSES
    )
    assert report.head == "re-initialised"
    state = model.state_dict()
    assert torch.equal(state["stem.conv1.weight"], source_state["stem.conv1.weight"])
    assert torch.equal(model.classifier.weight, fresh_fc)
    # Through the trainer, with frozen stages: the frozen weights do not move.
    run = train(
        tiny_config(
            files["train"], tmp_path / "ft", epochs=1, init_from=str(source), freeze_stages=2,
            layer_decay=0.7, mixup={"mixup_alpha": 0.0},
        )
    )  # fmt: skip
    tuned = load_file(str(run / "model.safetensors"))
    assert torch.equal(
        tuned["stages.1.0.conv1_1x1.weight"], source_state["stages.1.0.conv1_1x1.weight"]
    )
    assert not torch.equal(
        tuned["stages.3.0.attn.qkv.weight"], source_state["stages.3.0.attn.qkv.weight"]
    )
    # Frozen stages stay in eval mode: their BatchNorm statistics are the source's too.
    key = "stages.1.0.pre_norm.running_mean"
    assert torch.equal(tuned[key], source_state[key])
    assert tuned["head.fc.weight"].shape[0] == 4
    with pytest.raises(ConfigError, match="is a gm_astroformer_tiny; this run trains"):
        train(
            tiny_config(files["train"], tmp_path / "bad", model="coatnet_0", init_from=str(source))
        )


def test_init_from_timm_weights_resizes_position_tables(tmp_path: Path) -> None:
    fixtures = Path(__file__).resolve().parents[1] / "fixtures"
    meta = json.loads((fixtures / "timm_coatnet_small.json").read_text())
    cfg = AstroformerConfig(
        stem_width=meta["stem_width"],
        widths=tuple(meta["embed_dim"]),
        depths=tuple(meta["depths"]),
        head_hidden=meta["head_hidden_size"],
        layout=tuple(meta["block_type"]),
    )
    model = Astroformer(cfg, num_classes=4, img_size=64)  # timm's was 10 classes at 96 px
    report = initialise_from(
        model, fixtures / "timm_coatnet_small.safetensors", model_name="x", class_names=FOUR_CLASSES
    )
    assert report.head == "re-initialised" and report.resized
    timm_state = load_file(str(fixtures / "timm_coatnet_small.safetensors"))
    assert torch.equal(model.stem.conv1.weight, timm_state["stem.conv1.weight"])
    table = model.stages[3][0].attn.rel_pos.relative_position_bias_table
    assert table.shape[0] == 9  # (2 x 2 - 1)^2 at 64 px


def test_freeze_and_layer_decay_groups() -> None:
    model = create_model("gm_astroformer_tiny", num_classes=4, img_size=32)
    ids, last = layer_ids(model)
    assert ids["stem.conv1.weight"] == 0 and ids["head.fc.weight"] == last == 7  # 6 blocks
    assert ids["stages.1.1.conv1_1x1.weight"] == 3
    optimizer = adamw(model, 1e-3, 0.05, (0.9, 0.999), layer_decay=0.5)
    scales = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert scales[id(named["head.fc.weight"])] == 1.0
    assert scales[id(named["stem.conv1.weight"])] == 0.5**7
    schedule = CosineSchedule(1e-3, 1e-3, 0.0, 0, 10, 1)
    schedule.apply(optimizer, 0)
    lrs = {g["lr"] for g in optimizer.param_groups}
    assert max(lrs) == pytest.approx(1e-3) and min(lrs) == pytest.approx(1e-3 * 0.5**7)
    frozen = freeze_stages(model, 1)
    assert len(frozen) == 2 and not any(p.requires_grad for p in model.stages[0].parameters())
    assert all(p.requires_grad for p in model.stages[1].parameters())


def test_a_file_of_another_size_stating_no_pixel_scale_is_warned_about(
    files: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """64 px images with no pixel_scale attribute are taken at Galaxy10's 0.262"/px: say so."""
    from galmorph.training.train import _warn_of_assumed_pixel_scale

    bare = tmp_path / "bare.h5"
    with h5py.File(files["train"], "r") as src, h5py.File(bare, "w") as out:
        out.create_dataset("images", data=src["images"][()])
        out.create_dataset("ans", data=src["ans"][()])
        out.attrs["class_names"] = list(FOUR_CLASSES)
    with caplog.at_level("WARNING"):
        _warn_of_assumed_pixel_scale(Galaxy10File(bare))
        _warn_of_assumed_pixel_scale(Galaxy10File(files["train"]))  # has a pxscale column
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "states no pixel scale" in warnings[0], warnings
    assert "Galaxy10 DECaLS's 0.262\"/px" in warnings[0] and "pixel_scale" in warnings[0]


def test_real_sets_merge_the_carried_galaxy10_images_into_four_classes(tmp_path: Path) -> None:
    build = build_real_sets_module()
    assert build.main(["--out", str(tmp_path), "--size", "32"]) == 0
    data = Galaxy10File(tmp_path / "galaxy10_decals_4class.h5")
    assert data.class_names == ("elliptical", "spiral", "edge-on", "merger")
    assert data.image_shape[:2] == (32, 32)
    # 2 images per Galaxy10 class: 3 smooth classes, 3 spiral, 2 edge-on, 2 disturbed/merging.
    assert np.bincount(data.labels).tolist() == [6, 6, 4, 4]
    with h5py.File(tmp_path / "galaxy10_decals_4class.h5", "r") as handle:
        ids = handle["source_id"].asstr()[()]
        labels = handle["ans"][()]
        assert "MIT" in handle.attrs["licence"]
        assert set(json.loads(handle.attrs["class_mapping"])) == set(data.class_names)
    by_name = dict(zip(ids, labels, strict=True))
    assert by_name["tests/data/sample_2_Merging.jpg"] == 3  # Galaxy10 1 (merging) -> merger
    assert by_name["tests/data/class9_Edge_on_with_Bulge.png"] == 2


def test_real_sets_read_the_gz2_folders_of_a_work_tree(tmp_path: Path) -> None:
    """The Cosmic-Compendium layout: train/ and validation/ folders of spirals/non_spirals."""
    from PIL import Image

    repo = tmp_path / "cosmic"
    for split, count in (("train", 3), ("validation", 2)):
        for folder, shade in (("spirals", 200), ("non_spirals", 50)):
            target = repo / "data" / "galaxies" / split / folder
            target.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (424, 424), (shade, shade, shade)).save(target / f"{i}.jpg")
    build = build_real_sets_module()
    assert build.main(["--cosmic-compendium", str(repo), "--out", str(tmp_path / "out")]) == 0
    train = Galaxy10File(tmp_path / "out" / "gz2_sdss_train.h5")
    test = Galaxy10File(tmp_path / "out" / "gz2_sdss_test.h5")
    assert (train.num_images, test.num_images) == (6, 4)
    assert train.class_names == ("non-spiral", "spiral")
    images = train.images(np.arange(6))
    bright = images.reshape(6, -1).mean(1) > 128
    assert (bright == (train.labels == 1)).all()  # spirals/ -> label 1, whatever the order
