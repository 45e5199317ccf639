"""Resumable, verified download of Galaxy10 DECaLS (standard library HTTP only).

Bytes go to `<name>.part`; an interrupted download resumes from it with an HTTP Range request
(a server that ignores Range and answers 200 restarts the file from zero). The file gets its
final name only after the SHA256 matched, by galmorph.core.files.durable_replace (fsync, rename,
folder fsync). The SHA256 is computed as the bytes arrive (after re-reading the `.part` prefix
when resuming), so the 2.5 GB file is not read twice. On a checksum mismatch the `.part` is
deleted: resuming from bytes that hash wrong can never succeed. On a network failure it is kept
so the next attempt (automatic retries, or running the command again) resumes.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from galmorph.core.files import durable_replace, sha256_file
from galmorph.core.version import __version__

GALAXY10_URL = "https://zenodo.org/records/10845026/files/Galaxy10_DECals.h5"
GALAXY10_SHA256 = "19aefc477c41bb7f77ff07599a6b82a038dc042f889a111b0d4d98bb755c1571"
CHUNK_BYTES = 1 << 20
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")

log = logging.getLogger(__name__)


class DownloadError(RuntimeError):
    """The download failed or the file does not verify; the message says why."""


class _TruncatedError(DownloadError):
    """The connection ended before the announced length: worth resuming."""


# Failures after which resuming the .part can succeed.
_RETRYABLE = (urllib.error.URLError, OSError, http.client.HTTPException, _TruncatedError)


@dataclass(frozen=True)
class DownloadOptions:
    sha256: str | None = None
    retries: int = 3  # further attempts after a network failure, each resuming the .part
    retry_delay_s: float = 2.0
    timeout_s: float = 60.0
    progress: bool = True


def normalise_sha256(value: str) -> str:
    value = value.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise DownloadError(f"not a SHA256 hex digest: {value!r}")
    return value


def download(url: str, dest: Path, options: DownloadOptions | None = None) -> Path:
    """Fetch `url` to `dest`, resuming `dest.part`; verify SHA256 when given; return dest.

    An existing `dest` is kept if it verifies (or no checksum is given) and is an error if it
    does not: galmorph never overwrites a file it did not write.
    """
    options = options or DownloadOptions()
    expected = normalise_sha256(options.sha256) if options.sha256 else None
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise DownloadError(f"only http(s) URLs can be downloaded: {url}")
    dest = Path(dest)
    if dest.exists():
        if expected is None:
            log.info("%s already exists (no checksum given to verify it)", dest)
            return dest
        actual = sha256_file(dest)
        if actual == expected:
            log.info("%s already exists and verifies", dest)
            return dest
        raise DownloadError(
            f"{dest} exists but its SHA256 is {actual}, expected {expected}; "
            "remove it to download again"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    digest = ""
    for attempt in range(options.retries + 1):
        try:
            digest = _fetch_into(url, part, options)
            break
        except urllib.error.HTTPError as exc:
            if exc.code < 500 or attempt == options.retries:
                raise DownloadError(
                    f"download of {url} failed: HTTP {exc.code} {exc.reason}"
                ) from exc
            log.warning("server error HTTP %d; retrying", exc.code)
        except _RETRYABLE as exc:
            if attempt == options.retries:
                raise DownloadError(f"download of {url} failed: {exc} ({part} kept)") from exc
            log.warning("download interrupted (%s); resuming from %s", exc, part)
        time.sleep(options.retry_delay_s)
    if expected is not None and digest != expected:
        part.unlink()
        raise DownloadError(
            f"SHA256 mismatch for {url}: got {digest}, expected {expected} "
            f"(partial file deleted; nothing written to {dest})"
        )
    durable_replace(part, dest)
    return dest


def _fetch_into(url: str, part: Path, options: DownloadOptions) -> str:
    """One HTTP attempt appending to `part`; return the SHA256 of the complete file."""
    from tqdm import tqdm

    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": f"galmorph/{__version__}"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=options.timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code != 416 or not offset:
            raise
        # Range not satisfiable: the .part is not a prefix of this file; start over.
        log.warning("server rejected resuming at byte %d; restarting", offset)
        part.unlink()
        return _fetch_into(url, part, options)
    with response:
        if offset and response.status == 206:
            start, total = _parse_content_range(response.headers.get("Content-Range", ""))
            if start != offset:
                raise DownloadError(f"server resumed at byte {start}, asked for {offset}")
            mode = "ab"
        else:
            if offset:
                log.warning("server ignored the Range request; restarting from zero")
            offset = 0
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None else None
            mode = "wb"
        if mode == "ab":
            with open(part, "rb") as existing:
                digest = hashlib.file_digest(existing, "sha256")
        else:
            digest = hashlib.sha256()
        written = offset
        with (
            open(part, mode) as out,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=part.name.removesuffix(".part"),
                disable=not options.progress,
            ) as bar,
        ):
            while block := response.read(CHUNK_BYTES):
                out.write(block)
                digest.update(block)
                written += len(block)
                bar.update(len(block))
    if total is not None and written != total:
        raise _TruncatedError(f"truncated: got {written} of {total} bytes")
    return digest.hexdigest()


def _parse_content_range(header: str) -> tuple[int, int | None]:
    match = _CONTENT_RANGE.fullmatch(header.strip())
    if not match:
        raise DownloadError(f"206 response with an unusable Content-Range: {header!r}")
    total = match.group(3)
    return int(match.group(1)), None if total == "*" else int(total)
