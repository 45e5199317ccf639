"""Every command-line default is the library's own (galmorph.core.defaults): one place each.

The walk covers every subcommand of `galmorph`: an option whose default is not None, False or
empty must be in LIBRARY (its value equal to what the library gives, read here from the library
directly) or in CLI_ONLY (with the reason no library object holds it).
"""

from __future__ import annotations

import argparse
import inspect
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h5py
import pytest

from galmorph.cli import build_parser, main
from galmorph.core.defaults import LibraryDefault, default_of
from galmorph.core.modelfile import ood
from galmorph.core.sky.cache import DEFAULT_MAX_BYTES
from galmorph.core.sky.options import CutoutOptions, Politeness
from galmorph.model.export import export_model
from galmorph.model.flops import measure_cost
from galmorph.scoring.catalog import CatalogOptions
from galmorph.scoring.run import ScoreConfig
from galmorph.service.cli import serve_overrides
from galmorph.service.settings import Settings
from galmorph.training.contact_sheet import examples_per_class
from galmorph.training.download import DownloadOptions
from galmorph.training.evaluate import EvaluationRequest
from galmorph.training.synth import synthesize

REPO_ROOT = Path(__file__).resolve().parents[2]

_catalog, _cutouts, _polite = CatalogOptions(), CutoutOptions(), Politeness()
CUTOUT_OPTIONS = {
    "ra_col": _catalog.ra_col,
    "dec_col": _catalog.dec_col,
    "layer": _cutouts.layer,
    "cutout_format": _cutouts.image_format,
    "cutout_url": _cutouts.base_url,
    "cache_size": DEFAULT_MAX_BYTES,
    "fetch_concurrency": _polite.concurrency,
    "fetch_rate": _polite.rate,
    "fetch_timeout": _polite.timeout,
    "fetch_attempts": _polite.attempts,
}
_score = ScoreConfig(catalog="c.csv", model=Path("m.onnx"), out_dir=Path("out"))
_evaluation = EvaluationRequest(model=Path("run"), data=Path("d.h5"))


def _setting(name: str) -> Any:
    """The class default (an instance would read the environment)."""
    return Settings.model_fields[name].default


def _param(function: Callable[..., Any], name: str) -> Any:
    return inspect.signature(function).parameters[name].default


# (subcommand, dest) -> the library's default.
LIBRARY: dict[tuple[str, str], Any] = {
    **{("score", dest): value for dest, value in CUTOUT_OPTIONS.items()},
    **{("fetch", dest): value for dest, value in CUTOUT_OPTIONS.items()},
    ("fetch", "id_col"): _catalog.id_col,
    ("score", "id_col"): _catalog.id_col,
    ("score", "path_col"): _catalog.path_col,
    ("score", "passthrough"): _catalog.passthrough,
    ("score", "format"): _score.output_format,
    ("score", "shard_size"): _score.shard_size,
    ("score", "shard_index"): _score.shard_index,
    ("score", "num_shards"): _score.num_shards,
    ("score", "batch_size"): _score.batch_size,
    ("score", "engine"): _score.engine,
    ("serve", "host"): _setting("host"),
    ("serve", "port"): _setting("port"),
    ("serve", "workers"): _setting("workers"),
    ("serve", "engine"): _setting("engine"),
    ("serve", "wait_interval"): _setting("model_wait_interval_s"),
    ("classify", "top_k"): _setting("default_top_k"),
    ("evaluate", "batch_size"): _evaluation.batch_size,
    ("evaluate", "device"): _evaluation.device,
    ("evaluate", "precision"): _evaluation.precision,
    ("model list", "num_classes"): _param(measure_cost, "num_classes"),
    ("export", "opset"): _param(export_model, "opset"),
    ("export", "ood_fpr"): ood.DEFAULT_FPR,
    ("data synth", "size"): _param(synthesize, "size"),
    ("data synth", "seed"): _param(synthesize, "seed"),
    ("data synth", "workers"): _param(synthesize, "num_workers"),
    ("data synth", "class_balance"): _param(synthesize, "class_balance"),
    ("data synth", "votes"): _param(synthesize, "votes"),
    ("data inspect", "seed"): _param(examples_per_class, "seed"),
    ("data download", "retries"): DownloadOptions().retries,
}

# (subcommand, dest) -> why the command line holds this default itself.
CLI_ONLY = {
    ("export", "parity_count"): "how many --parity-data images the command reads",
    ("export", "calib_count"): "how many --calib-data images the command reads",
    ("export", "eval_count"): "how many --eval-data images the command reads",
    ("export", "fit_count"): "how many images the command reads for the fits",
    ("data synth", "n"): "synthesize() takes no default count",
    ("data inspect", "per_class"): "examples_per_class() takes no default count",
    ("data download", "out"): "where the command puts the file",
    ("classify", "url"): "where the client looks for a server",
    ("classify", "timeout"): "the client's patience per request",
}

# Registered by galmorph.similarity.cli, whose defaults are its own and not reviewed here.
NOT_WALKED = {"index", "similar"}


def _subcommands(
    parser: argparse.ArgumentParser, path: str = ""
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if name in NOT_WALKED:
                    continue
                command = f"{path} {name}".strip()
                yield command, sub
                yield from _subcommands(sub, command)


def _value(default: object) -> object:
    return default.value if isinstance(default, LibraryDefault) else default


def _options() -> Iterator[tuple[str, argparse.ArgumentParser, argparse.Action]]:
    for command, sub in _subcommands(build_parser()):
        for action in sub._actions:
            trivial = action.default in (None, False, argparse.SUPPRESS) or action.default == []
            if not trivial and action.default != ():
                yield command, sub, action


def test_every_default_is_the_librarys_or_says_why_not() -> None:
    seen = set()
    for command, _, action in _options():
        key = (command, action.dest)
        seen.add(key)
        assert key in LIBRARY or key in CLI_ONLY, f"{key}: {action.default!r} restated?"
        if key in LIBRARY:
            assert isinstance(action.default, LibraryDefault), f"{key} restates the default"
            assert _value(action.default) == LIBRARY[key], key
    listed = set(LIBRARY) | set(CLI_ONLY)
    assert seen >= listed, f"listed but not offered: {listed - seen}"


def test_help_shows_the_librarys_value() -> None:
    for command, sub, action in _options():
        if isinstance(action.default, LibraryDefault) and "%(default)" in (action.help or ""):
            text = " ".join(sub.format_help().split())
            assert f"default {action.default.value}" in text, (command, action.dest)


def test_registering_every_command_imports_nothing_heavy() -> None:
    code = (
        "import sys\n"
        "from galmorph.cli import build_parser\n"
        "build_parser()\n"
        "heavy = {'torch', 'onnxruntime', 'numpy', 'pyarrow', 'pydantic'} & set(sys.modules)\n"
        "print(sorted(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_handler_runs_with_the_librarys_values(tmp_path: Path) -> None:
    out = tmp_path / "synth.h5"
    assert main(["data", "synth", "--out", str(out), "--n", "10", "--size", "64", "--quiet"]) == 0
    with h5py.File(out, "r") as data:
        assert data["images"].shape == (10, 64, 64, 3)
        assert "votes" not in data  # --votes left at the library's 0


def test_serve_flags_left_at_their_default_do_not_override_the_environment() -> None:
    parser = build_parser()
    assert serve_overrides(parser.parse_args(["serve"])) == {}
    given = parser.parse_args(["serve", "--port", "9000", "--engine", "onnxruntime"])
    assert serve_overrides(given) == {"port": 9000, "engine": "onnxruntime"}


def test_help_without_the_owners_part_installed_names_the_default_instead() -> None:
    def without_torch() -> object:
        raise ImportError("No module named 'torch'")

    assert str(LibraryDefault(without_torch, "batch_size")) == "the library's batch_size"


def test_a_name_the_library_gives_no_default_is_refused() -> None:
    with pytest.raises(ValueError, match="no default for 'model'"):
        default_of(EvaluationRequest, "model")
    with pytest.raises(ValueError, match="no default for 'n'"):
        default_of(synthesize, "n")
