"""`galmorph model list|inspect` and `galmorph export`: the registry, model cards, the export."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from galmorph.core.defaults import library_default, with_library_defaults

if TYPE_CHECKING:
    import numpy as np

    from galmorph.core.data.splits import Split
    from galmorph.model.checkpoint import ModelSpec
    from galmorph.model.export import ExportReport, FitImages


def _measure_cost() -> Callable[..., Any]:
    from galmorph.model.flops import measure_cost

    return measure_cost


def _export_model() -> Callable[..., ExportReport]:
    from galmorph.model.export import export_model

    return export_model


def _ood() -> ModuleType:
    from galmorph.core.modelfile import ood

    return ood


def register(subparsers: argparse._SubParsersAction) -> None:
    model = subparsers.add_parser(
        "model", help="inspect the model registry", description="Inspect the model registry."
    )
    model_commands = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    listing = model_commands.add_parser(
        "list",
        help="table of registered models: parameters, GMACs, layout",
        description="Build every registered model on the meta device (no memory, no compute) "
        "and count its parameters and multiply-accumulates for one image.",
    )
    listing.add_argument(
        "--img-size", type=int, default=None, help="input size (default: each model's own)"
    )
    listing.add_argument(
        "--num-classes",
        type=int,
        default=library_default(_measure_cost, "num_classes"),
        help="classifier width to count (default %(default)s)",
    )
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(func=_list_models)
    inspect = model_commands.add_parser(
        "inspect",
        help="print the model card of an exported .onnx file",
        description="Print what an exported model says about itself: classes, input size, "
        "normalisation, interpolation, stretch, bands, pixel scale and field of view (what a "
        "FITS cutout is rendered to), training data, metrics and provenance.",
    )
    inspect.add_argument(
        "model", type=Path, help="an exported galmorph .onnx file (or a folder for >2 GiB)"
    )
    inspect.add_argument("--json", action="store_true", help="print the card as JSON")
    inspect.add_argument(
        "--engine",
        nargs="?",
        const="auto",
        # engine_choice.ENGINES (test_engine_choice.py): registration imports no onnxruntime
        choices=("auto", "onnxruntime", "openvino"),
        help="also open the model on this engine (alone: auto, as serve and score would) and "
        "print what runs it: openvino's precision and parity, or onnxruntime's providers",
    )
    inspect.set_defaults(func=_inspect)
    _register_export(subparsers)


def _register_export(subparsers: argparse._SubParsersAction) -> None:
    export = subparsers.add_parser(
        "export",
        help="export a training run to a verified, self-describing ONNX file",
        description="Export RUN_DIR/model.safetensors + model.json to ONNX: uint8 [N,H,W,3] "
        "'images' in, float32 'probabilities', 'logits', 'embeddings' (the pre-logit "
        "representation) and 'ood_score' out, preprocessing inside the graph, class "
        "names/normalisation/stretch/provenance in the metadata. With the run's training file "
        "(default: the one in RUN_DIR/config.json) the probabilities are temperature-scaled on "
        "the validation split and the out-of-distribution score is fitted on the training "
        "split, its threshold on the validation split. A run trained on every row (no "
        "validation split) needs --data FILE, a labelled file of the same classes it never "
        "saw: all its rows then set the temperature and the threshold. The export checks "
        "onnxruntime against PyTorch (max |dp| <= 1e-4, same argmax in fp32) and writes nothing "
        "if they disagree. Models over 2 GiB are written as a folder (model.onnx + "
        "model.onnx.data) that serve, score and Classifier load like a file. Several run "
        "folders (the same model, data and split trained with different --seed values) are "
        "exported as one seed ensemble: one file whose probabilities are the mean of theirs; "
        "the first run's training file and split are used as for one run.",
    )
    export.add_argument(
        "run_dirs",
        nargs="+",
        type=Path,
        metavar="RUN_DIR",
        help="run folder holding model.safetensors/.json (several: a seed ensemble)",
    )
    export.add_argument(
        "--out", type=Path, default=None, help="default: RUN_DIR/model.onnx (one run)"
    )
    export.add_argument(
        "--opset",
        type=int,
        default=library_default(_export_model, "opset"),
        help="ONNX opset (default %(default)s)",
    )
    precision = export.add_mutually_exclusive_group()
    precision.add_argument(
        "--fp16", action="store_true", help="float16 weights/activations for GPU serving"
    )
    precision.add_argument(
        "--int8",
        action="store_true",
        help="static int8 (QDQ) quantisation for CPU serving; needs --calib-data",
    )
    export.add_argument(
        "--parity-data",
        type=Path,
        help="real images for the parity check: a Galaxy10-layout .h5 or a folder of PNG/JPEG "
        "(default: the held-out images the temperature and OOD fits read, if any)",
    )
    export.add_argument("--parity-count", type=int, default=64)
    export.add_argument(
        "--calib-data", type=Path, help="Galaxy10-layout .h5 with int8 calibration images"
    )
    export.add_argument("--calib-count", type=int, default=256)
    export.add_argument(
        "--eval-data",
        type=Path,
        help="Galaxy10-layout .h5 to measure the int8 accuracy change on (default: --calib-data)",
    )
    export.add_argument("--eval-count", type=int, default=1000)
    export.add_argument(
        "--split",
        type=Path,
        help="split JSON: calibrate on its train rows, evaluate int8 on its test rows "
        "(default: RUN_DIR/split.json when it exists)",
    )
    export.add_argument(
        "--metrics",
        type=Path,
        help="JSON file of evaluation metrics to store in the metadata "
        "(default for one run: RUN_DIR/evaluation.json, written by `galmorph evaluate`, when "
        "it exists; an ensemble's are its own: evaluate the exported file)",
    )
    _add_fit_arguments(export)
    export.add_argument("--threads", type=int, default=None, help="onnxruntime threads")
    export.set_defaults(func=_export)


def _add_fit_arguments(export: argparse.ArgumentParser) -> None:
    """What the temperature and the OOD score are fitted on, and whether they are."""
    export.add_argument(
        "--data",
        type=Path,
        help="labelled Galaxy10-layout .h5 for temperature scaling and the OOD threshold: the "
        "run's training file (its validation split is used) or a file of the same classes the "
        "model never saw (all its rows are used; the OOD class statistics still come from the "
        "run's training rows). 8 of the held-out images are stored in the file as its sample "
        "images (the openvino engine's parity check). Default: the training file named in "
        "RUN_DIR/config.json",
    )
    export.add_argument(
        "--fit-count",
        type=int,
        default=2000,
        help="at most this many training and held-out images each for the temperature and "
        "the OOD statistics (default 2000)",
    )
    export.add_argument(
        "--no-calibrate", action="store_true", help="skip temperature scaling (temperature 1)"
    )
    export.add_argument(
        "--no-ood", action="store_true", help="export without the 'ood_score' output"
    )
    export.add_argument(
        "--ood-fpr",
        type=float,
        default=library_default(_ood, "DEFAULT_FPR"),
        help="fraction of in-distribution held-out images the OOD threshold flags "
        "(default %(default)s)",
    )


@with_library_defaults
def _list_models(args: argparse.Namespace) -> int:
    from galmorph.model.flops import measure_cost
    from galmorph.model.registry import list_models, model_entry

    rows = []
    for name in list_models():
        entry = model_entry(name)
        cost = measure_cost(name, img_size=args.img_size, num_classes=args.num_classes)
        rows.append(
            {
                "name": name,
                "params_m": round(cost.params_m, 2),
                "gmacs": round(cost.gmacs, 2),
                "img_size": cost.img_size,
                "layout": entry.layout,
                "source": entry.source,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = f"{'name':<22} {'params M':>9} {'GMACs':>8} {'size':>5}  {'layout':<8} source"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['name']:<22} {row['params_m']:>9.2f} {row['gmacs']:>8.2f} "
            f"{row['img_size']:>5}  {row['layout']:<8} {row['source']}"
        )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from galmorph.core.modelfile.contract import TARGET_MEANINGS
    from galmorph.core.modelfile.engine import CPU_PROVIDER, ModelLoadError
    from galmorph.core.modelfile.engine_choice import open_model

    try:
        if args.engine is None:  # the card alone: the cheapest session
            model = open_model(
                args.model, engine="onnxruntime", providers=[CPU_PROVIDER], intra_op_threads=1
            )
        else:
            model = open_model(args.model, engine=args.engine)
    except ModelLoadError as exc:
        print(f"galmorph model inspect: {exc}", file=sys.stderr)
        return 2
    card = model.card
    engine = {} if args.engine is None else {"engine": model.engine_report()}
    # A count only: the images themselves are PNG bytes in the metadata.
    samples = 0 if model.sample_images is None else len(model.sample_images)
    if args.json:
        document = {
            **asdict(card),
            "field_of_view": list(card.field_of_view),
            "sample_images": samples,
            **engine,
        }
        print(json.dumps({"path": str(args.model), "sha256": model.sha256, **document}, indent=2))
        return 0
    height, width = card.input_size
    fov_h, fov_w = card.field_of_view
    metrics = card.metrics
    members = card.model_config.get("ensemble_members")
    name = (
        f"{card.model_name} x {members} runs (mean probabilities)" if members else card.model_name
    )
    rows = [
        ("file", f"{args.model} (sha256 {model.sha256[:12]})"),
        ("model", f"{name}, {card.precision}, galmorph {card.package_version}"),
        ("created", card.created or "unknown"),
        ("classes", f"{card.num_classes}: {', '.join(card.class_names)}"),
        ("input", f"{height}x{width} RGB uint8, resized with {card.interpolation}"),
        ("normalisation", f"mean {list(card.mean)}, std {list(card.std)} (inside the graph)"),
        ("imaging", f"stretch {card.stretch}, bands R,G,B = {_bands(card.bands)}"),
        ("pixel scale", f'{card.pixel_scale:.4g}"/px, field of view {fov_h:.1f}" x {fov_w:.1f}"'),
    ]
    meaning = TARGET_MEANINGS[card.targets]
    rows.append(("probabilities", f"{meaning} (trained on {card.targets})"))
    data = card.training_data.get("fingerprint", {})
    if data:
        rows.append(("trained on", f"{data.get('file_name')} ({data.get('num_images')} images)"))
    calibration = card.calibration
    if calibration.get("applied"):
        rows.append(
            (
                "calibration",
                f"temperature {calibration['temperature']:.4g}, ECE "
                f"{calibration['ece_before']:.4f} -> {calibration['ece_after']:.4f} "
                f"({calibration['num_images']} {held_out_words(calibration)})",
            )
        )
    elif calibration:
        rows.append(("calibration", f"none: {calibration.get('reason')}"))
    outputs = ", ".join(node.name for node in model.session.get_outputs())
    rows.append(("outputs", outputs))
    if card.ood:
        rows.append(
            (
                "OOD score",
                f"{card.ood['method']}, in distribution up to {card.ood['threshold']:.4g} "
                f"({card.ood['in_distribution_fpr']:.0%} of "
                f"{held_out_words(card.ood.get('threshold_fit', {}))} above)",
            )
        )
    if "top1" in metrics:
        rows.append(
            ("metrics", f"top-1 {metrics['top1']:.4f}, macro-F1 {metrics.get('macro_f1', 0):.4f}")
        )
    rows.append(("sample images", f"{samples} (what the openvino engine checks parity on)"))
    if engine:
        rows.append(("engine", ", ".join(f"{k} {v}" for k, v in engine["engine"].items())))
    width_col = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width_col}}  {value}")
    return 0


def held_out_words(record: dict[str, Any]) -> str:
    """What a card's `calibration` or OOD `threshold_fit` record was fitted on, in words:
    "validation images", or "images of FILE" for every row of a separate file."""
    data = record.get("data")
    return f"images of {data}" if data else "validation images"


def _bands(bands: dict[str, str]) -> str:
    return "/".join(bands.get(channel, "?") for channel in "RGB")


@with_library_defaults
def _export(args: argparse.Namespace) -> int:
    from galmorph.model.checkpoint import CheckpointError, load_spec
    from galmorph.model.ensemble import ensemble_spec
    from galmorph.model.export import export_model
    from galmorph.model.sample_images import load_images

    args.run_dir = args.run_dirs[0]  # an ensemble's data, split and training file: the first's
    ensemble = len(args.run_dirs) > 1
    try:
        spec = ensemble_spec(args.run_dirs) if ensemble else load_spec(args.run_dir)
    except CheckpointError as exc:
        runs = "are they finished training runs" if ensemble else f"is {args.run_dir} one"
        print(f"galmorph export: {exc} ({runs}?)", file=sys.stderr)
        return 2
    if ensemble and args.out is None:
        print("galmorph export: an ensemble of runs needs --out FILE.onnx", file=sys.stderr)
        return 2
    out = args.out or args.run_dir / "model.onnx"
    precision = "fp16" if args.fp16 else "int8" if args.int8 else "fp32"
    metrics_path = args.metrics or (None if ensemble else args.run_dir / "evaluation.json")
    metrics = None
    if metrics_path is not None and metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text())

    fit_images = _fit_images(args, spec)
    parity_images = None
    if args.parity_data:
        parity_images, _ = load_images(
            args.parity_data,
            size=spec.img_size,
            interpolation=spec.interpolation,
            count=args.parity_count,
        )
    elif fit_images is not None:
        # The held-out galaxies the fits read are real ones: check the graph on them too.
        parity_images = fit_images.val_images[: args.parity_count]

    calib_images, eval_images, eval_labels = _int8_images(args, spec)
    report = export_model(
        args.run_dirs,
        out,
        opset=args.opset,
        parity_images=parity_images,
        metrics=metrics,
        precision=precision,
        calib_images=calib_images,
        eval_images=eval_images,
        eval_labels=eval_labels,
        fit_images=fit_images,
        calibrate=not args.no_calibrate,
        ood_fpr=None if args.no_ood else args.ood_fpr,
        intra_op_threads=args.threads,
    )
    _print_report(report)
    return 0


def _int8_images(
    args: argparse.Namespace, spec: ModelSpec
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """(calibration images, evaluation images, their labels) for --int8; all None otherwise."""
    import numpy as np

    from galmorph.model.sample_images import load_images

    if not args.int8:
        return None, None, None
    if args.calib_data is None:
        raise SystemExit("--int8 needs --calib-data (a Galaxy10-layout .h5)")
    train_rows = test_rows = None
    split_path = args.split or args.run_dir / "split.json"
    if args.split or split_path.exists():
        from galmorph.core.data.splits import Split

        split = Split.load(split_path)
        train_rows, test_rows = split.train, split.test
    calib_images, _ = load_images(
        args.calib_data,
        size=spec.img_size,
        interpolation=spec.interpolation,
        count=args.calib_count,
        indices=train_rows,
    )
    eval_images, eval_labels = load_images(
        args.eval_data or args.calib_data,
        size=spec.img_size,
        interpolation=spec.interpolation,
        count=args.eval_count,
        seed=1,
        indices=test_rows,
        class_names=spec.class_names,
    )
    if eval_labels is None:
        raise SystemExit("--eval-data must be a labelled Galaxy10-layout .h5 file")
    eval_labels = np.asarray(eval_labels)
    return calib_images, eval_images, eval_labels


def _print_report(report: ExportReport) -> None:
    parity = report.parity
    print(f"wrote {report.path} ({report.card.precision}, {report.size_bytes / 1e6:.1f} MB)")
    print(
        f"parity vs PyTorch: max |dp| = {parity.max_abs_diff:.2e}, argmax agreement "
        f"{parity.argmax_agreement:.4f} on {parity.num_images} images "
        f"({parity.num_real_images} real)"
    )
    calibration, ood = report.card.calibration, report.card.ood
    if calibration.get("applied"):
        print(
            f"temperature {calibration['temperature']:.4g}: ECE {calibration['ece_before']:.4f} "
            f"-> {calibration['ece_after']:.4f} on {calibration['num_images']} "
            f"{held_out_words(calibration)}"
        )
    else:
        print(f"not calibrated: {calibration.get('reason')}")
    if ood:
        fit = ood["threshold_fit"]
        print(
            f"OOD score threshold {ood['threshold']:.4g} (flags {ood['in_distribution_fpr']:.0%} "
            f"of {fit['num_images']} {held_out_words(fit)})"
        )
    if "int8_eval" in report.card.metrics:
        print("int8 accuracy change:", json.dumps(report.card.metrics["int8_eval"]))
    print("seconds:", json.dumps({k: round(v, 2) for k, v in report.seconds.items()}))


def _fit_images(args: argparse.Namespace, spec: ModelSpec) -> FitImages | None:
    """Labelled images for the temperature and the OOD score: the run's training and
    validation rows of its training file, or, for --data naming another file, every row of
    that file as the held-out rows (the OOD class statistics still come from the run's
    training rows)."""
    if args.no_calibrate and args.no_ood:
        return None
    recorded = _recorded_training_file(args.run_dir)
    training = recorded if recorded is not None and recorded.is_file() else None
    data = args.data or training
    if data is None:
        where = "recorded in the run" if recorded is None else f"at {recorded}"
        print(
            f"galmorph export: no --data and no training file {where}: exporting without "
            "temperature scaling and without the OOD score",
            file=sys.stderr,
        )
        return None
    from galmorph.core.data.splits import Split, SplitError
    from galmorph.model.export import load_fit_images, load_held_out_fit_images
    from galmorph.model.sample_images import open_in_classes

    split_path = args.split or args.run_dir / "split.json"
    fit_options = {
        "size": spec.img_size,
        "interpolation": spec.interpolation,
        "count": args.fit_count,
        "class_names": spec.class_names,
    }
    try:
        split = Split.load(split_path) if split_path.is_file() else None
        # A file naming no classes is read with the run's names, as training read it (the
        # data fingerprint covers the names).
        file, _ = open_in_classes(data, spec.class_names)
        with file:
            num_images, fingerprint = file.num_images, file.fingerprint()
        if _is_training_file(Path(data), training, fingerprint, split, spec):
            if split is None:
                raise SystemExit(
                    f"galmorph export: --data needs the run's split ({split_path} not found): "
                    "the temperature must be fitted on images the model was not trained on"
                )
            split.check_data(num_images, fingerprint)
            if split.val.size == 0:
                raise SystemExit(
                    f"galmorph export: {args.run_dir} was trained on every row of {data} (no "
                    "validation rows) and the temperature and OOD threshold need held-out "
                    "ones: pass --data FILE, a labelled file of the same classes the model "
                    "never saw (e.g. your test file), or --no-calibrate --no-ood"
                )
            return load_fit_images(data, split, **fit_options)
        if not args.no_ood:
            _check_training_rows(recorded, training, split, split_path, spec)
        return load_held_out_fit_images(
            data, train_data=None if args.no_ood else training, split=split, **fit_options
        )
    except (SplitError, ValueError) as exc:  # Galaxy10Error is a ValueError
        raise SystemExit(f"galmorph export: {data}: {exc}") from None


def _is_training_file(
    data: Path,
    training: Path | None,
    fingerprint: dict[str, Any],
    split: Split | None,
    spec: ModelSpec,
) -> bool:
    """Whether --data is the run's training file: its recorded path, or the same contents
    (the digest ignores the file name, so a renamed or moved copy is recognised)."""
    if training is not None and data.resolve() == training.resolve():
        return True
    recorded = (split.fingerprint if split is not None else None) or spec.training_data.get(
        "fingerprint"
    )
    digest = (recorded or {}).get("digest")
    return digest is not None and digest == fingerprint.get("digest")


def _check_training_rows(
    recorded: Path | None,
    training: Path | None,
    split: Split | None,
    split_path: Path,
    spec: ModelSpec,
) -> None:
    """Refuse in one line when the run's training rows, which the OOD class statistics are
    fitted on, cannot be read."""
    from galmorph.model.sample_images import open_in_classes

    way_out = "(or pass --no-ood to export without the OOD score)"
    if training is None:
        where = f"is not at {recorded}" if recorded is not None else "is not recorded in the run"
        raise SystemExit(
            f"galmorph export: the OOD score's class statistics are fitted on the run's "
            f"training rows, and its training file {where}: put it back {way_out}"
        )
    if split is None:
        raise SystemExit(
            f"galmorph export: the OOD score's class statistics are fitted on the run's "
            f"training rows, and its split ({split_path}) is missing {way_out}"
        )
    from galmorph.core.data.splits import SplitError

    try:
        file, _ = open_in_classes(training, spec.class_names)
        with file:
            split.check_data(file.num_images, file.fingerprint())
    except (SplitError, ValueError) as exc:
        raise SystemExit(f"galmorph export: the run's training file {training}: {exc}") from None


def _recorded_training_file(run_dir: Path) -> Path | None:
    """The training file named in RUN_DIR/config.json (whether or not it is still there)."""
    config = run_dir / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text()).get("data")
    return Path(data) if data else None
