"""Command-line defaults that are the library's own, so that each default has one place.

An option whose default is `library_default(owner, name)` gets the default of `name` in what
`owner()` returns: a dataclass field, a pydantic settings field, a function's parameter or a
module attribute; `%(default)s` in its help text shows that value. The owner is imported only
when the value is first needed (a subcommand's `--help`, or its handler running), because the
owners import torch, onnxruntime or pyarrow: registering every subcommand must stay instant, and
`galmorph serve` runs in an image without torch. Handlers wrapped in `with_library_defaults`
see the values; `given` tells an option the user set from one left at its default.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
from collections.abc import Callable
from types import ModuleType
from typing import Any, cast

Handler = Callable[[argparse.Namespace], int]


class LibraryDefault:
    """The default that `owner()` gives `name`, read on first use."""

    def __init__(self, owner: Callable[[], object], name: str) -> None:
        self.owner = owner
        self.name = name

    @functools.cached_property
    def value(self) -> Any:
        return default_of(self.owner(), self.name)

    def __str__(self) -> str:
        try:
            return str(self.value)
        except ImportError:  # the help of a part this install lacks (train without torch)
            return f"the library's {self.name}"

    def __repr__(self) -> str:
        return f"LibraryDefault({self.name})"


def library_default(owner: Callable[[], object], name: str) -> Any:
    """An argparse `default=` standing for the library's default of `name` (typed Any, as
    argparse's own defaults are)."""
    return LibraryDefault(owner, name)


def default_of(owner: object, name: str) -> Any:
    """The default `owner` (a dataclass, pydantic model, function or module) gives `name`."""
    if isinstance(owner, ModuleType):
        return getattr(owner, name)
    if dataclasses.is_dataclass(owner):
        field = {f.name: f for f in dataclasses.fields(owner)}[name]
        if field.default_factory is not dataclasses.MISSING:
            return field.default_factory()
        value: Any = field.default
    elif hasattr(owner, "model_fields"):
        value = owner.model_fields[name].get_default(call_default_factory=True)
    else:
        value = inspect.signature(cast(Callable[..., Any], owner)).parameters[name].default
    if value is dataclasses.MISSING or value is inspect.Parameter.empty:
        raise ValueError(f"{owner!r} has no default for {name!r}")
    return value


def given(value: object) -> bool:
    """Whether an option was set on the command line (not None, not a library default)."""
    return value is not None and not isinstance(value, LibraryDefault)


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Replace every library default in `args` by its value, in place."""
    for dest, value in vars(args).items():
        if isinstance(value, LibraryDefault):
            setattr(args, dest, value.value)
    return args


def with_library_defaults(handler: Handler) -> Handler:
    """`handler`, seeing the values of the library defaults its options were left at."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        return handler(resolve(args))

    return run
