"""The layering, stated as rules: each rule fails the moment an import breaks it.

core (torch-free) at the bottom; model and training on it; service and scoring on the core only.
Imports inside functions count too (tools/import_graph.py reads them all from the source).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from tools.import_graph import (
    PART_FOLDERS,
    core_package_of_module,
    cycles,
    module_graph,
    part_graph,
    part_of_module,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

# part -> parts (and watched libraries) it must never import
FORBIDDEN = {
    "core": {"model", "training", "service", "scoring", "api", "torch"},
    "model": {"training", "service", "scoring", "api"},
    "training": {"service", "scoring", "api"},
    "service": {"model", "training", "scoring", "api", "torch"},
    "scoring": {"model", "training", "service", "api", "torch"},
    # The Python API is a consumer beside the server and the scorer, not under them.
    "api": {"model", "training", "service", "scoring", "torch"},
    # The index reads the scorer's Parquet files, not its code; the server may serve an index.
    "similarity": {"model", "training", "service", "scoring", "api", "torch"},
}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return module_graph(REPO_ROOT)


def test_the_graph_sees_every_part(graph: dict[str, set[str]]) -> None:
    seen = {part_of_module(module) for module in graph}
    assert {"core", "model", "training", "service", "scoring", "api", "galmorph"} <= seen
    assert "torch" in {target for targets in graph.values() for target in targets}


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_no_part_imports_what_its_layer_forbids(graph: dict[str, set[str]], part: str) -> None:
    edges = part_graph(graph)
    broken = [
        edge
        for (source, target), modules in edges.items()
        if source == part and target in FORBIDDEN[part]
        for edge in modules
    ]
    assert not broken, f"{part} must not import {sorted(FORBIDDEN[part])}: {broken}"


# core sub-package -> siblings it must never import. Every one may import core's floor (files,
# version, inputspec: the package `core` here), which imports none of them.
CORE_FORBIDDEN = {
    "core": {"core.cutouts", "core.sky", "core.data", "core.modelfile"},
    "core.cutouts": {"core.sky", "core.data", "core.modelfile"},
    "core.sky": {"core.data", "core.modelfile"},
    "core.data": {"core.sky", "core.modelfile"},
    "core.modelfile": {"core.sky"},
}


@pytest.mark.parametrize("package", sorted(CORE_FORBIDDEN))
def test_no_core_package_imports_a_sibling_its_role_forbids(
    graph: dict[str, set[str]], package: str
) -> None:
    edges = part_graph(graph, core_package_of_module)
    broken = [
        edge
        for (source, target), modules in edges.items()
        if source == package and target in CORE_FORBIDDEN[package]
        for edge in modules
    ]
    assert not broken, f"{package} must not import {sorted(CORE_FORBIDDEN[package])}: {broken}"


def test_only_the_command_line_imports_the_command_line(graph: dict[str, set[str]]) -> None:
    front_doors = {"galmorph.cli", "galmorph.demo", "galmorph.__main__"}
    users = {
        module
        for module, targets in graph.items()
        if targets & front_doors and module not in front_doors
    }
    assert not users, f"parts import the command line: {sorted(users)}"


def test_no_router_imports_another_router(graph: dict[str, set[str]]) -> None:
    """What routes share lives in service/data_plane.py, which they all call."""
    routers = {module for module in graph if module.startswith("galmorph.service.routers.")}
    borrowing = {module: sorted(graph[module] & routers) for module in routers}
    assert routers and not any(borrowing.values()), borrowing


def test_no_import_cycles(graph: dict[str, set[str]]) -> None:
    assert cycles(graph) == []
    parts: dict[str, set[str]] = {}
    for source, target in part_graph(graph):
        parts.setdefault(source, set()).add(target)
    assert cycles(parts) == [], "parts import each other (the root package counts as one)"


def test_the_rule_checker_catches_a_violation(tmp_path: Path) -> None:
    """A tree whose core imports torch and model, and whose scoring has a cycle, is caught."""
    for folder in PART_FOLDERS.values():
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "galmorph" / "core" / "bad.py").write_text(
        "import torch\n\ndef f():\n    from galmorph.model import x\n"
    )
    (tmp_path / "model" / "x.py").write_text("")
    (tmp_path / "scoring" / "a.py").write_text("from galmorph.scoring import b\n")
    (tmp_path / "scoring" / "b.py").write_text("from . import a\n")
    graph = module_graph(tmp_path)
    edges = part_graph(graph)
    assert ("core", "torch") in edges and ("core", "model") in edges
    assert cycles(graph) == [["galmorph.scoring.a", "galmorph.scoring.b"]]


def test_every_package_folder_is_installed() -> None:
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    mapping = {"galmorph": "galmorph", **config["package-dir"]}
    found = set()
    for package, folder in mapping.items():
        for init in (REPO_ROOT / folder).rglob("__init__.py"):
            inner = init.parent.relative_to(REPO_ROOT / folder).parts
            found.add(".".join((package, *inner)))
    assert found == listed


@pytest.mark.slow
def test_the_wheel_installs_nothing_outside_the_galmorph_namespace(tmp_path: Path) -> None:
    source = tmp_path / "src"  # setuptools leaves build/ beside the sources: not in the checkout
    source.mkdir()
    for name in (
        "pyproject.toml",
        "README.md",
        "galmorph",
        "model",
        "training",
        "service",
        "scoring",
    ):
        if (REPO_ROOT / name).is_dir():
            shutil.copytree(
                REPO_ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy(REPO_ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path), str(source)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("galmorph-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = "-".join(wheel.name.split("-")[:2]) + ".dist-info"
    assert {name.split("/")[0] for name in names} == {"galmorph", dist_info}
    for module in ("core/cutouts/decode.py", "api/classifier.py", "model/astroformer.py",
                   "training/train.py", "service/app.py", "scoring/run.py",
                   "service/static/app.js", "service/templates/index.html",
                   "service/static/vendor/hyparquet-writer.js"):  # fmt: skip
        assert f"galmorph/{module}" in names, module


def test_the_layout_tree_mirrors_the_installed_packages(tmp_path: Path) -> None:
    """mypy and editors check what is installed: every package in pyproject is in the tree."""
    from tools.layout_tree import build

    package = build(tmp_path / "layout", REPO_ROOT)
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for name in config["packages"]:
        folder = package.parent.joinpath(*name.split("."))
        assert (folder / "__init__.py").is_file(), name
    assert (package / "model").resolve() == REPO_ROOT / "model"
    assert (package / "core").resolve() == REPO_ROOT / "galmorph" / "core"
