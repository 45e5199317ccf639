"""Where an exported model lives: one `.onnx` file, or a folder for models over 2 GiB.

protobuf cannot serialise one message above 2 GiB, so a model whose weights exceed that is
exported as a folder holding `model.onnx` (the graph and the metadata) and `model.onnx.data`
(the weights, ONNX external data, found by onnxruntime beside the graph). Wherever a model file
is accepted (`galmorph serve --model`, `galmorph score --model`, `Classifier(...)`), the folder
is accepted too and loaded the same way.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from galmorph.core.files import StrPath, sha256_file

GRAPH_FILE_NAME = "model.onnx"
WEIGHTS_FILE_NAME = "model.onnx.data"


def graph_file(path: StrPath) -> Path:
    """The .onnx file onnxruntime opens: the path itself, or GRAPH_FILE_NAME inside a folder."""
    path = Path(path)
    return path / GRAPH_FILE_NAME if path.is_dir() else path


def artifact_files(path: StrPath) -> list[Path]:
    """The files that make up the model, in a fixed order."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    return sorted(entry for entry in path.iterdir() if entry.is_file())


def artifact_sha256(path: StrPath) -> str:
    """SHA-256 of a model file; for a folder, of its `sha256sum`-style listing (one
    "<sha256>  <name>" line per file, sorted by name), so every byte of every file counts."""
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    listing = "".join(f"{sha256_file(entry)}  {entry.name}\n" for entry in artifact_files(path))
    return hashlib.sha256(listing.encode()).hexdigest()


def artifact_size(path: StrPath) -> int:
    """Bytes on disk of the model file or of every file of the folder."""
    return sum(entry.stat().st_size for entry in artifact_files(path))
