"""`galmorph data synth | inspect | download` (heavy imports happen inside the handlers)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from galmorph.core.defaults import library_default, with_library_defaults

if TYPE_CHECKING:
    from galmorph.training.download import DownloadOptions


def _synthesize() -> Callable[..., Path]:
    from galmorph.training.synth import synthesize

    return synthesize


def _examples_per_class() -> Callable[..., Any]:
    from galmorph.training.contact_sheet import examples_per_class

    return examples_per_class


def _download_options() -> type[DownloadOptions]:
    from galmorph.training.download import DownloadOptions

    return DownloadOptions


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser(
        "data",
        help="make, inspect and download Galaxy10-layout data",
        description="Galaxy10-layout HDF5 data: synthetic generation, inspection, download.",
    )
    commands = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    _register_synth(commands)
    _register_inspect(commands)
    _register_download(commands)


def _register_synth(commands: argparse._SubParsersAction) -> None:
    synth = commands.add_parser(
        "synth",
        help="generate a synthetic Galaxy10-layout HDF5 file",
        description="Render galaxies of the ten Galaxy10 classes from physical models in g, r, z, "
        "with PSF, noise and field stars, through the Legacy Survey dr2_rgb stretch. "
        "Deterministic by seed, whatever the number of workers.",
    )
    synth.add_argument("--out", type=Path, required=True, help="output HDF5 file")
    synth.add_argument("--n", type=int, default=1000, help="number of images (default 1000)")
    synth.add_argument(
        "--size",
        type=int,
        default=library_default(_synthesize, "size"),
        help="image side in pixels, 64..256; the field is Galaxy10's 67 arcsec "
        "(default %(default)s)",
    )
    synth.add_argument(
        "--seed",
        type=int,
        default=library_default(_synthesize, "seed"),
        help="random seed (default %(default)s)",
    )
    synth.add_argument(
        "--fits-dir",
        type=Path,
        help="also write each galaxy as a Legacy Survey style grz FITS cutout here, "
        "plus catalog.csv (id_str, file_loc, ra, dec, label)",
    )
    synth.add_argument(
        "--workers",
        type=int,
        default=library_default(_synthesize, "num_workers"),
        help="worker processes (default %(default)s)",
    )
    synth.add_argument(
        "--class-balance",
        choices=("balanced", "galaxy10"),
        default=library_default(_synthesize, "class_balance"),
        help="equal class counts, or Galaxy10 DECaLS frequencies (default %(default)s)",
    )
    synth.add_argument(
        "--votes",
        type=int,
        default=library_default(_synthesize, "votes"),
        metavar="N",
        help="also write a 'votes' dataset: N volunteers' votes per galaxy, drawn around its "
        "class (Galaxy Zoo-style vote counts for `galmorph train --set targets=votes`; "
        "default %(default)s: none)",
    )
    synth.add_argument("--quiet", action="store_true", help="no progress bar")
    synth.set_defaults(func=_synth)


def _register_inspect(commands: argparse._SubParsersAction) -> None:
    inspect = commands.add_parser(
        "inspect",
        help="summarise a Galaxy10-layout file and write a contact sheet",
        description="Validate a Galaxy10-layout HDF5 file, print shapes, dtypes, optional "
        "columns and counts per class, and write a contact-sheet PNG of examples.",
    )
    inspect.add_argument("file", type=Path, help="Galaxy10-layout HDF5 file")
    inspect.add_argument(
        "--out", type=Path, help="contact sheet PNG (default: FILE with suffix .sheet.png)"
    )
    inspect.add_argument("--per-class", type=int, default=4, help="examples per class (default 4)")
    inspect.add_argument(
        "--seed",
        type=int,
        default=library_default(_examples_per_class, "seed"),
        help="seed choosing the examples (default %(default)s)",
    )
    inspect.set_defaults(func=_inspect)


def _register_download(commands: argparse._SubParsersAction) -> None:
    download = commands.add_parser(
        "download",
        help="download Galaxy10_DECals.h5 (2.5 GB) with resume and SHA256 check",
        description="Fetch Galaxy10 DECaLS from Zenodo (record 10845026). An interrupted "
        "download resumes from FILE.part; the file gets its final name only after its "
        "SHA256 matches. A checksum mismatch deletes the .part and exits non-zero.",
    )
    download.add_argument(
        "--out", type=Path, default=Path("data"), help="directory (default ./data)"
    )
    download.add_argument("--url", help="download from this URL instead of Zenodo")
    download.add_argument(
        "--sha256",
        help="expected SHA256 (default: the published Galaxy10_DECals.h5 checksum when "
        "downloading from Zenodo; no check for another --url unless given)",
    )
    download.add_argument(
        "--retries",
        type=int,
        default=library_default(_download_options, "retries"),
        help="resume attempts (default %(default)s)",
    )
    download.add_argument("--quiet", action="store_true", help="no progress bar")
    download.set_defaults(func=_download)


@with_library_defaults
def _synth(args: argparse.Namespace) -> int:
    from galmorph.training.synth import synthesize

    try:
        path = synthesize(
            args.out,
            n=args.n,
            size=args.size,
            seed=args.seed,
            fits_dir=args.fits_dir,
            num_workers=args.workers,
            class_balance=args.class_balance,
            votes=args.votes,
            progress=not args.quiet,
        )
    except ValueError as exc:
        print(f"galmorph data synth: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}" + (f" and FITS cutouts in {args.fits_dir}" if args.fits_dir else ""))
    return 0


@with_library_defaults
def _inspect(args: argparse.Namespace) -> int:
    import numpy as np

    from galmorph.core.data.galaxy10 import OPTIONAL_COLUMNS, Galaxy10Error, Galaxy10File
    from galmorph.training.contact_sheet import contact_sheet, examples_per_class

    if args.per_class < 1:
        print("galmorph data inspect: --per-class must be at least 1", file=sys.stderr)
        return 2
    try:
        data = Galaxy10File(args.file)
    except Galaxy10Error as exc:
        print(f"galmorph data inspect: {exc}", file=sys.stderr)
        return 2
    with data:
        size_mb = args.file.stat().st_size / 1e6
        print(f"file:     {args.file} ({size_mb:.1f} MB)")
        print(f"images:   {(data.num_images, *data.image_shape)} uint8")
        print(f"labels:   {data.num_classes} classes ({data.class_names_source})")
        try:
            data.check_class_names()
        except Galaxy10Error as exc:
            print(f"warning:  {exc}", file=sys.stderr)
        for name in OPTIONAL_COLUMNS:
            values = data.column(name)
            if values is None:
                print(f"{name + ':':<10}absent")
            else:
                print(
                    f"{name + ':':<10}min {np.nanmin(values):.4g}  median "
                    f"{np.nanmedian(values):.4g}  max {np.nanmax(values):.4g}"
                )
        if data.votes is None:
            print(f"{'votes:':<10}absent")
        else:
            agree = float((data.votes.argmax(axis=1) == data.labels).mean())
            print(
                f"{'votes:':<10}{data.votes.shape} counts, median "
                f"{np.median(data.votes.sum(axis=1)):.4g} per image; the most-voted class "
                f"is the label for {100 * agree:.1f}%"
            )
        counts = data.class_counts()
        width = max(len(name) for name in data.class_names)
        print(f"\n{'id':>3}  {'class':<{width}}  {'count':>7}  {'share':>6}")
        for k, (name, count) in enumerate(zip(data.class_names, counts, strict=True)):
            print(f"{k:>3}  {name:<{width}}  {count:>7}  {100 * count / data.num_images:>5.1f}%")
        print(f"{'':>3}  {'total':<{width}}  {data.num_images:>7}")
        print(f"\nfingerprint: {data.fingerprint()['digest']}")
        chosen = examples_per_class(data.labels, args.per_class, seed=args.seed)
        out = args.out or args.file.with_suffix(".sheet.png")
        contact_sheet(
            data.images(chosen),
            data.labels[chosen],
            data.class_names,
            out,
            columns=args.per_class,
            title=f"{args.file.name}: {args.per_class} per class",
        )
    print(f"contact sheet: {out}")
    return 0


@with_library_defaults
def _download(args: argparse.Namespace) -> int:
    from urllib.parse import unquote, urlsplit

    from galmorph.training.download import (
        GALAXY10_SHA256,
        GALAXY10_URL,
        DownloadError,
        DownloadOptions,
        download,
    )

    url = args.url or GALAXY10_URL
    sha256 = args.sha256 or (GALAXY10_SHA256 if url == GALAXY10_URL else None)
    name = Path(unquote(urlsplit(url).path)).name
    if not name:
        print(f"galmorph data download: no file name in URL {url}", file=sys.stderr)
        return 2
    if sha256 is None:
        print("warning: no --sha256 given, the download will not be verified", file=sys.stderr)
    options = DownloadOptions(sha256=sha256, retries=args.retries, progress=not args.quiet)
    try:
        path = download(url, args.out / name, options)
    except DownloadError as exc:
        print(f"galmorph data download: {exc}", file=sys.stderr)
        return 1
    print(f"{path} ({'SHA256 verified' if sha256 else 'not verified'})")
    return 0
