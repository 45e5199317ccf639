"""The `galmorph` command line.

Each component registers its own subcommands. Registration modules must import nothing heavy
at module level (no torch, no onnxruntime): `galmorph serve` runs in an image without torch, and
`galmorph --help` should be instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import Any

from galmorph import __version__

# Modules exposing `register(subparsers)`; each subcommand sets `func` via set_defaults.
COMMAND_MODULES = (
    "galmorph.training.data_cli",  # data synth | inspect | download
    "galmorph.training.train_cli",  # train, evaluate
    "galmorph.model.cli",  # model list, export
    "galmorph.service.cli",  # serve, classify
    "galmorph.scoring.cli",  # score, merge
    "galmorph.scoring.fetch_cli",  # fetch
    "galmorph.similarity.cli",  # index build | add, similar
)


class Parser(argparse.ArgumentParser):
    """argparse without abbreviations: `fetch --cache DIR` must be refused, not read as
    `--cache-size DIR`. Subparsers are made of the parent's class, so every subcommand of the
    tree, nested ones included, is a Parser too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "allow_abbrev": False})


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="galmorph",
        description="Galaxy morphology classification: data, training, export, serving, scoring.",
    )
    parser.add_argument("--version", action="version", version=f"galmorph {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # A component whose module is missing from this install simply offers no commands.
            if exc.name != module_name:
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Our own packages talk at INFO; libraries (onnxscript, onnx_ir, ray...) only when it matters.
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("galmorph").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
