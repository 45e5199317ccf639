"""`galmorph train` and `galmorph evaluate`; heavy imports happen inside the handlers."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from galmorph.core.defaults import library_default, with_library_defaults

if TYPE_CHECKING:
    from galmorph.training.config import TrainConfig
    from galmorph.training.evaluate import EvaluationRequest

logger = logging.getLogger(__name__)

# 128 + SIGTERM: what a scheduler expects from a job that stopped on its signal.
EXIT_INTERRUPTED = 143

TRAIN_EPILOG = """\
Defaults reproduce the Galaxy10 recipe of the Astroformer paper (AdamW wd 2e-5, lr 2e-5
scaled by sqrt(global batch / 256), cosine with 5 warmup epochs from 1e-5, 300 epochs,
mixup 0.8, label smoothing 0.1, dropout 0.1) at the model's registered input size (256 px
for the paper's variants; `galmorph model list`). Precedence: defaults < --config < flags
< --set. Augmentation and mixup keys live in sections: nested mappings in a config file
(`augment: {policy: galaxy}`), dotted keys with --set (augment.hflip, mixup.mixup_alpha).
precision=auto (the default) trains in bf16 autocast where the device computes bf16
natively (CUDA; CPUs with avx512_bf16 or amx_bf16), else fp32; `--set precision=fp32` or
`bf16` forces one. The log and RUN/config.json say what ran.

Your own few hundred to few thousand labelled galaxies: configs/small_data.yaml (the README
section "Train on your own labelled galaxies"; its evidence is in docs/small_data.md).

examples:
  galmorph train --data Galaxy10_DECals.h5 --model astroformer_4 --out runs/a4 \\
      --config configs/paper_galaxy10.yaml
  galmorph train --data mine.h5 --out runs/mine --config configs/small_data.yaml \\
      --class-names elliptical,spiral,edge-on,merger
  galmorph train --data mine.h5 --out runs/ft --config configs/small_data.yaml \\
      --init-from runs/pretrained --set layer_decay=0.75
  galmorph train --data mine.h5 --out runs/student --config configs/small_data.yaml \\
      --model gm_astroformer_tiny --teacher runs/mine
  galmorph train --data zoo.h5 --out runs/zoo --config configs/small_data.yaml \\
      --set targets=votes      # fit the file's Galaxy Zoo vote counts, not its labels
  galmorph train --data synth.h5 --model gm_astroformer_tiny --out runs/demo \\
      --config configs/cpu_demo.yaml --set epochs=5 --set augment.policy=paper
  torchrun --nproc_per_node=8 -m galmorph train --data Galaxy10_DECals.h5 \\
      --model astroformer_4 --out runs/a4 --config configs/paper_galaxy10.yaml --resume

SIGTERM/SIGINT write a checkpoint and exit with code 143; --resume continues exactly.
"""


def _evaluation_request() -> type[EvaluationRequest]:
    from galmorph.training.evaluate import EvaluationRequest

    return EvaluationRequest


# Long on purpose: one flat table of the train/evaluate/export flags as --help lists them;
# splitting it would scatter the order users read.
def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train",
        help="train a model on a Galaxy10-layout HDF5 file (single process or torchrun)",
        description="Train a registered model on a Galaxy10-layout HDF5 file.",
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--data", type=Path, help="Galaxy10-layout HDF5 file")
    train.add_argument("--model", help="registered model name (see `galmorph model list`)")
    train.add_argument("--out", type=Path, required=True, help="run folder to create or resume")
    train.add_argument(
        "--config",
        type=Path,
        help="YAML or TOML file of TrainConfig keys (sections augment and mixup as mappings)",
    )
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key (repeatable), e.g. --set epochs=10 --set ema=true "
        "--set augment.hflip=0 (section keys are dotted)",
    )
    train.add_argument(
        "--class-names",
        type=_names,
        metavar="A,B,...",
        help="names of labels 0,1,... when the file names none (no 'class_names' attribute "
        "and no DATA.classes.txt sidecar); must agree with the file's names when it has some",
    )
    train.add_argument(
        "--val-fraction",
        type=float,
        metavar="F",
        help="share of the file held out for validation each epoch; 0 trains on those rows "
        "too (no val metrics). Sets split_fractions with --test-fraction (the config's test "
        "share otherwise); logged at the start",
    )
    train.add_argument(
        "--test-fraction",
        type=float,
        metavar="F",
        help="share held out as this file's test split (0 when you have a separate test file)",
    )
    train.add_argument(
        "--init-from",
        metavar="RUN|WEIGHTS|synthetic",
        help="start from a galmorph run folder or timm/official Astroformer weights "
        "(.safetensors/.pth); the classifier is re-initialised when the classes differ "
        "(see also freeze_stages, layer_decay). 'synthetic': a start trained on synthetic "
        "galaxies with the small-data recipe, built once per model and size and cached "
        "($GALMORPH_PRETRAIN_CACHE, else ~/.cache/galmorph/synthetic-pretrain; "
        "synthetic_pretrain.images/epochs/seed)",
    )
    train.add_argument(
        "--teacher",
        metavar="RUN|ONNX",
        help="distil from a trained run folder or exported .onnx (distill.kind hard|soft, "
        "distill.alpha, distill.tau)",
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue from the run folder's checkpoint (its config.json is the base config)",
    )
    train.set_defaults(func=run_train)

    evaluate = subparsers.add_parser(
        "evaluate",
        help="top-1, per-class P/R/F1, macro-F1, confusion matrix and calibration of a model",
        description=(
            "Evaluate a run folder (PyTorch) or an exported .onnx (onnxruntime, the serving "
            "engine) on a Galaxy10-layout file: the test split of the file it was trained "
            "on, or every row of any other file (a separate test file). Writes "
            "evaluation.json, confusion_matrix.json/.png and reliability.png; export stores "
            "evaluation.json in the ONNX metadata."
        ),
    )
    evaluate.add_argument("model", type=Path, help="run folder or .onnx file")
    evaluate.add_argument("data_positional", nargs="?", type=Path, metavar="DATA", help="HDF5")
    evaluate.add_argument("--data", type=Path, help="Galaxy10-layout HDF5 file (or positional)")
    evaluate.add_argument(
        "--split",
        choices=("train", "val", "test", "all"),
        help="rows of the training file's split (default: test); another file: all rows",
    )
    evaluate.add_argument(
        "--class-names",
        type=_names,
        metavar="A,B,...",
        help="names of the file's labels 0,1,... if it names none (default: the model's)",
    )
    evaluate.add_argument(
        "--split-file", type=Path, help="split.json to use (default: the one beside the model)"
    )
    evaluate.add_argument(
        "--tta", action="store_true", help="average over the 8 flips/90-degree rotations"
    )
    evaluate.add_argument(
        "--batch-size",
        type=int,
        default=library_default(_evaluation_request, "batch_size"),
        help="images per forward pass (default %(default)s)",
    )
    evaluate.add_argument("--out", type=Path, help="output folder (default: the model's folder)")
    evaluate.add_argument(
        "--device",
        default=library_default(_evaluation_request, "device"),
        choices=("auto", "cpu", "cuda"),
        help="default %(default)s",
    )
    evaluate.add_argument(
        "--precision",
        default=library_default(_evaluation_request, "precision"),
        choices=("fp32", "auto", "bf16"),
        help="a run folder's PyTorch model: fp32, the numbers the exported model gives; auto: "
        "bf16 autocast where the device computes bf16 natively, faster but probabilities move "
        "by ~1e-4 (an .onnx runs as exported); default %(default)s",
    )
    evaluate.add_argument("--threads", type=int, help="CPU threads for inference")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")
    evaluate.set_defaults(func=run_evaluate)


def _names(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(","))
    if len(names) < 2 or not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated class names, got {text!r}")
    return names


def run_train(args: argparse.Namespace) -> int:
    from galmorph.training.config import ConfigError, load_config
    from galmorph.training.reporting import CONFIG_FILE
    from galmorph.training.synthetic_pretrain import resolve_start
    from galmorph.training.train import TrainingInterrupted, train

    config_path = args.config
    saved = args.out / CONFIG_FILE
    if args.resume and config_path is None and saved.is_file():
        config_path = saved  # resume with the settings the run started with
    try:
        config = load_config(
            config_path,
            args.overrides,
            data=str(args.data) if args.data else None,
            model=args.model,
            out=str(args.out),
            class_names=list(args.class_names) if args.class_names else None,
            init_from=args.init_from,
            distill={"teacher": args.teacher} if args.teacher else None,
        )
        config = _with_split_flags(config, args.val_fraction, args.test_fraction)
        if args.resume and config.class_names is None:
            config = replace(config, class_names=_saved_class_names(saved))
        config.validate()
        config = resolve_start(config)  # init_from: synthetic -> its cached folder, built once
        run_dir = train(config, resume=args.resume)
    except ConfigError as exc:  # also what a resume or the data file finds wrong
        logger.error("%s", exc)
        return 2
    except TrainingInterrupted as exc:
        logger.warning("%s", exc)
        return EXIT_INTERRUPTED
    logger.info("run finished: %s", run_dir)
    return 0


def _saved_class_names(saved: Path) -> tuple[str, ...] | None:
    """The class names a run started with (config.json): a resume that does not repeat
    --class-names reads its file as the run did."""
    if not saved.is_file():
        return None
    names = json.loads(saved.read_text()).get("class_names")
    return tuple(names) if names else None


def _with_split_flags(config: TrainConfig, val: float | None, test: float | None) -> TrainConfig:
    """--val-fraction / --test-fraction rewrite split_fractions; train gets the rest."""
    if val is None and test is None:
        return config
    _, config_val, config_test = config.split_fractions
    val = config_val if val is None else val
    test = config_test if test is None else test
    from galmorph.training.config import ConfigError

    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise ConfigError(
            f"--val-fraction {val:g} and --test-fraction {test:g} must be in [0, 1) and leave "
            "a training share"
        )
    return replace(config, split_fractions=(1.0 - val - test, val, test))


@with_library_defaults
def run_evaluate(args: argparse.Namespace) -> int:
    from galmorph.core.data.galaxy10 import Galaxy10Error
    from galmorph.core.data.splits import SplitError
    from galmorph.model.checkpoint import CheckpointError
    from galmorph.training.evaluate import EvaluationError, EvaluationRequest, evaluate

    data = args.data or args.data_positional
    if data is None:
        logger.error("evaluate needs the data file (DATA or --data)")
        return 2
    try:
        report = evaluate(
            EvaluationRequest(
                model=args.model,
                data=data,
                split=args.split,
                split_file=args.split_file,
                class_names=args.class_names,
                tta=args.tta,
                batch_size=args.batch_size,
                out_dir=args.out,
                device=args.device,
                precision=args.precision,
                threads=args.threads,
                progress=not args.no_progress,
            )
        )
    except (EvaluationError, Galaxy10Error, SplitError, CheckpointError) as exc:
        logger.error("%s", exc)
        return 2
    summary = {k: report[k] for k in ("split", "num_images", "top1", "macro_f1", "ece", "tta")}
    print(json.dumps(summary, indent=1))
    return 0
