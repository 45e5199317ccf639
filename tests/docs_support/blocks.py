"""The code blocks of the Markdown docs, as tests: what is run, what is not, and how.

Sybil parses the Markdown: fenced blocks whose info string is `bash`, `console` or `python`,
and its skip directive. A block that cannot run on a test machine (a GPU, Docker, the
internet, Slurm) is marked in the one way Sybil reads, an HTML comment just before it:

    <!-- skip: next "not run here: needs Docker" -->

Every other block runs as written, in order, in one temporary folder per document that holds
small stand-ins for the files the docs name (tests/docs_support/stand_ins.py). Only sizes,
ports and addresses change (`adapt`), so each difference from what a user types is listed here:

| command | what changes |
| --- | --- |
| `galmorph train` | `TINY_TRAIN` appended: gm_astroformer_tiny at 32 px, 1 epoch, 1 thread |
| `galmorph fetch`, `galmorph score` | `--cutout-url` of a loopback stand-in of the cutout service |
| `galmorph serve` | started in the background; the next command waits until /readyz answers |
| port 8000 anywhere | a free port, one per document |
| `curl` | `--fail-with-body`: an HTTP error fails the block instead of printing a JSON error |
| `/shared/...` | `shared/...` in the document's folder |

`TINY_TRAIN` also shrinks an `init_from: synthetic` start to 40 images and 1 epoch.

A `console` block runs its `$ ` lines (continuation lines included); what follows them is
the expected output, shown to readers and not compared (it holds hashes, times and hosts).
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sybil import Document, Example
from sybil.parsers.markdown import CodeBlockParser, SkipParser

from tests.support.training_helpers import TINY_SYNTHETIC_START

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = (
    "README.md",
    *sorted(str(path.relative_to(REPO_ROOT)) for path in (REPO_ROOT / "docs").glob("*.md")),
    "docker/README.md",
    "benchmarks/README.md",
)
RUN_LANGUAGES = ("bash", "console", "python")
# Fences that are shown, never run: output, configuration, URLs ("" is a bare fence).
SHOWN_LANGUAGES = ("text", "yaml", "")

TINY_TRAIN = (
    *("--model", "gm_astroformer_tiny"),
    *("--set", "img_size=32", "--set", "epochs=1", "--set", "warmup_epochs=0"),
    *("--set", "batch_size=16"),
    *("--set", "num_workers=0", "--set", "threads=1", "--set", "progress=false"),
    # init_from: synthetic builds a seconds-long start (cached per session, tests/conftest.py).
    *TINY_SYNTHETIC_START,
)
DOCS_PORT = 8000


@dataclass(frozen=True)
class Block:
    document: str
    line: int
    language: str
    source: str  # the block's text as Sybil read it
    example: Example
    not_run: str | None  # the reason of the skip marker before it, if any

    @property
    def name(self) -> str:
        return f"{self.document}:{self.line}"


def _no_evaluator(example: Example) -> None:
    raise AssertionError("blocks are run by tests/journeys/test_docs.py, not by Sybil's evaluators")


def read_blocks(document: str) -> list[Block]:
    """The runnable-language blocks of one document, each with its not-run reason."""
    parsers = [CodeBlockParser(language, _no_evaluator) for language in RUN_LANGUAGES]
    parsed = Document.parse(str(REPO_ROOT / document), *parsers, SkipParser())
    blocks: list[Block] = []
    pending: str | None = None
    for example in parsed.examples():
        if isinstance(example.parsed, tuple):  # a skip directive: (action, reason source)
            action, reason_source = example.parsed
            reason = ast.literal_eval(reason_source) if reason_source else None
            if action != "next" or not isinstance(reason, str) or not reason.strip():
                raise ValueError(
                    f"{document}:{example.line}: write a not-run marker as "
                    f'<!-- skip: next "not run here: why" -->'
                )
            pending = reason
            continue
        language = str(example.region.lexemes["arguments"])
        source = str(example.parsed)
        blocks.append(Block(document, example.line, language, source, example, pending))
        pending = None
    if pending is not None:
        raise ValueError(f"{document}: a not-run marker is not followed by a code block")
    return blocks


def fence_languages(document: str) -> list[tuple[int, str]]:
    """(line, info string) of every fenced block, for the check that none is left out."""
    found: list[tuple[int, str]] = []
    inside: str | None = None
    lines = (REPO_ROOT / document).read_text().splitlines()
    for number, line in enumerate(lines, start=1):
        match = re.match(r"\s*(`{3,}|~{3,})\s*([\w-]*)", line)
        if match is None:
            continue
        if inside is None:
            inside = match.group(1)
            found.append((number, match.group(2)))
        elif match.group(1).startswith(inside) and not match.group(2):
            inside = None
    return found


def commands(block: Block) -> list[str]:
    """One shell command per logical line (continuations joined, comment lines dropped)."""
    lines = block.source.splitlines()
    if block.language == "console":
        kept: list[str] = []
        continuing = False
        for line in lines:
            if line.startswith("$ "):
                kept.append(line[2:])
            elif continuing:
                kept.append(line)
            else:
                continue
            continuing = line.rstrip().endswith("\\")
        lines = kept
    joined: list[str] = []
    buffer = ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            buffer += line.rstrip()[:-1] + " "
            continue
        command = (buffer + line).strip()
        buffer = ""
        if command and not command.startswith("#"):
            joined.append(command)
    return joined


def _split_comment(command: str) -> tuple[str, str]:
    """The command and its trailing `# comment` (a `#` outside quotes, after a blank)."""
    quote: str | None = None
    for index, char in enumerate(command):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and index > 0 and command[index - 1].isspace():
            return command[:index].rstrip(), command[index:]
    return command, ""


def adapt(command: str, *, port: int, cutout_url: str) -> str:
    """The command with sizes, ports and addresses of this test machine (table above)."""
    command, _comment = _split_comment(command)
    command = re.sub(rf"\b{DOCS_PORT}\b", str(port), command)
    command = re.sub(r"(?<![\w.])/shared/", "shared/", command)
    words = command.split()
    if words[:2] == ["galmorph", "train"]:
        command += " " + " ".join(TINY_TRAIN)
    if words[:2] in (["galmorph", "fetch"], ["galmorph", "score"]):
        command += f" --cutout-url {cutout_url}"
    if words[:1] == ["curl"]:
        command = "curl --fail-with-body" + command[len("curl") :]
    return command


def adapt_python(source: str, *, port: int) -> str:
    return re.sub(rf"(127\.0\.0\.1|localhost):{DOCS_PORT}\b", rf"\g<1>:{port}", source)


def is_serve(command: str) -> bool:
    return command.split()[:2] == ["galmorph", "serve"]


@dataclass
class Tally:
    """What the docs tests did, printed at the end of the session (tests/conftest.py)."""

    run: int = 0
    failed: list[str] = field(default_factory=list)
    not_run: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        reasons = "; ".join(
            f"{count} x {why.removeprefix('not run here: ')}"
            for why, count in sorted(self.not_run.items())
        )
        failed = f", {len(self.failed)} failed ({', '.join(self.failed)})" if self.failed else ""
        return (
            f"docs blocks: {self.run} run{failed}; "
            f"{sum(self.not_run.values())} marked not runnable here ({reasons})"
        )


TALLY = Tally()
