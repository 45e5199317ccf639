"""The fetch stage of sky catalogs: positions in, cache files (or error texts) out.

Blocks of a sky catalog carry `source` = struct<ra, dec, error> (galmorph.scoring.catalog).
`SkyStage` makes each position's cutout present in the disk cache
(galmorph.core.sky.client.CutoutFetcher: the cache first, the service for what is missing) and hands
the rows on, in order, with `source` = struct<path, error>: the cache file, or the row's error
text ("fetch: HTTP 500 from ... (after 5 attempts)", "invalid: dec 95.0 is outside [-90, 90]
degrees", "invalid: ra 'n/a' is not a number of degrees"). Decode workers then only read files:
no network I/O happens in them.

The fetching runs on one asyncio event loop in a helper thread with one HTTP client for the
whole run, `LOOKAHEAD` chunks of rows ahead of the rows being decoded, so downloads overlap
decoding and inference and one cutout waiting out a backoff does not idle the others. The same
stage serves `galmorph fetch` (galmorph.scoring.fetch_cli), which only counts the outcomes.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Coroutine, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa

from galmorph.core.sky.cache import DEFAULT_MAX_BYTES, CutoutCache, default_cache_dir
from galmorph.core.sky.client import CutoutFetcher, CutoutSpec, FetchOutcome
from galmorph.core.sky.options import CutoutOptions, Politeness

SOURCE_TYPE = pa.struct([("path", pa.string()), ("error", pa.string())])
CHUNK_ROWS = 64  # rows handed on at once; the scorer rounds it up to whole inference batches
LOOKAHEAD = 8  # chunks being fetched ahead of the one handed on
_T = TypeVar("_T")


@dataclass(frozen=True)
class SkyConfig:
    """How a run gets cutouts for positions: what to ask for, the cache, how politely."""

    cutouts: CutoutOptions = field(default_factory=CutoutOptions)
    cache_dir: Path | None = None  # None: default_cache_dir()
    cache_max_bytes: int = DEFAULT_MAX_BYTES
    offline: bool = False  # the cache only: a miss is an error row, no request is made
    politeness: Politeness = field(default_factory=Politeness)

    def cache(self) -> CutoutCache:
        return CutoutCache(self.cache_dir or default_cache_dir(), self.cache_max_bytes)


@dataclass
class FetchCounts:
    """Rows by what happened to their cutout, for progress bars and summaries."""

    cached: int = 0
    fetched: int = 0
    failed: int = 0  # the service or the cache could not provide it: a `fetch` error row
    bad_positions: int = 0  # no usable ra/dec in the row: `missing` / `invalid` error rows
    requests: int = 0  # HTTP requests sent, retries included
    failures: dict[str, int] = field(default_factory=dict)  # "HTTP 500", "ConnectError"...

    def add(self, outcome: FetchOutcome) -> None:
        if outcome.source == "cached":
            self.cached += 1
        elif outcome.source == "fetched":
            self.fetched += 1
        else:
            self.failed += 1
            reason = (outcome.error or "").split(":", 1)[0].split(" from ", 1)[0]
            self.failures[reason] = self.failures.get(reason, 0) + 1

    def postfix(self) -> dict[str, int]:
        return {"fetched": self.fetched, "cached": self.cached, "failed": self.failed}

    def to_dict(self) -> dict[str, Any]:
        return {
            "cached": self.cached,
            "fetched": self.fetched,
            "failed": self.failed,
            "bad_positions": self.bad_positions,
            "requests": self.requests,
            "failures": dict(sorted(self.failures.items())),
        }


class SkyStage:
    """Resolve sky rows to cache files; see the module docstring."""

    def __init__(
        self,
        config: SkyConfig,
        spec: CutoutSpec,
        *,
        progress: bool = True,
        total: int | None = None,
        progress_position: int = 0,
        verify_cached: bool = False,
        chunk_rows: int = CHUNK_ROWS,
    ) -> None:
        self.config = config
        self.spec = spec
        self.progress = progress
        self.total = total
        self.progress_position = progress_position
        # `galmorph fetch` reads every cached entry back and checks it; the scorer's decode
        # workers check what they decode instead, so a hit costs the scorer one stat.
        self.verify_cached = verify_cached
        self.chunk_rows = chunk_rows
        self.counts = FetchCounts()

    def resolve(self, blocks: Iterable[pa.Table]) -> Iterator[pa.Table]:
        """The rows of `blocks`, in order, with `source` turned into struct<path, error>."""
        from tqdm import tqdm

        fetcher = CutoutFetcher(
            self.spec,
            self.config.cache(),
            self.config.politeness,
            offline=self.config.offline,
        )
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="cutout-fetch", daemon=True)
        thread.start()

        def call(coroutine: Coroutine[Any, Any, _T]) -> _T:
            return asyncio.run_coroutine_threadsafe(coroutine, loop).result()

        pending: deque[tuple[pa.Table, Future[pa.Array]]] = deque()
        bar = tqdm(
            total=self.total,
            desc="cutouts",
            unit="pos",
            disable=not self.progress,
            dynamic_ncols=True,
            position=self.progress_position,
            leave=self.progress_position == 0,
        )
        try:
            call(fetcher.__aenter__())
            for piece in _chunks(blocks, self.chunk_rows):
                job = self._sources(fetcher, piece, bar)
                pending.append((piece, asyncio.run_coroutine_threadsafe(job, loop)))
                if len(pending) > LOOKAHEAD:
                    yield _with_sources(*pending.popleft())
            while pending:
                yield _with_sources(*pending.popleft())
        finally:
            for _, future in pending:
                future.cancel()
            call(_shut_down(fetcher))
            self.counts.requests = fetcher.requests_sent
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()
            bar.close()

    async def _sources(self, fetcher: CutoutFetcher, piece: pa.Table, bar: Any) -> pa.Array:
        positions = piece.column("source").combine_chunks()
        ras = positions.field("ra").to_pylist()
        decs = positions.field("dec").to_pylist()
        unreadable = positions.field("error").to_pylist()  # cells that are not degrees
        paths: list[str | None] = [None] * len(piece)
        errors: list[str | None] = [None] * len(piece)
        wanted: list[int] = []
        for i, (ra, dec) in enumerate(zip(ras, decs, strict=True)):
            if unreadable[i] is not None:
                errors[i] = f"invalid: {unreadable[i]}"
                continue
            if ra is None or dec is None:
                errors[i] = "missing: no ra/dec in the catalog row"
                continue
            try:
                self.spec.request(ra, dec)
            except ValueError as exc:
                errors[i] = f"invalid: {exc}"
                continue
            wanted.append(i)
        self.counts.bad_positions += len(piece) - len(wanted)
        bar.update(len(piece) - len(wanted))

        def record(outcome: FetchOutcome) -> None:
            self.counts.add(outcome)
            bar.set_postfix(self.counts.postfix(), refresh=False)
            bar.update(1)

        outcomes = await fetcher.ensure_many(
            [(ras[i], decs[i]) for i in wanted], verify=self.verify_cached, on_outcome=record
        )
        for i, outcome in zip(wanted, outcomes, strict=True):
            if outcome.path is not None:
                paths[i] = str(outcome.path)
            else:
                errors[i] = f"fetch: {outcome.error}"
        return pa.StructArray.from_arrays(
            [pa.array(paths, pa.string()), pa.array(errors, pa.string())],
            fields=list(SOURCE_TYPE),
        )


async def _shut_down(fetcher: CutoutFetcher) -> None:
    """Cancel what is still running (a run stopped early), then close the HTTP client."""
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)
    await fetcher.aclose()


def _chunks(blocks: Iterable[pa.Table], rows: int) -> Iterator[pa.Table]:
    for block in blocks:
        for start in range(0, len(block), rows):
            yield block.slice(start, rows)


def _with_sources(piece: pa.Table, sources: Future[pa.Array]) -> pa.Table:
    index = piece.schema.get_field_index("source")
    return piece.set_column(index, "source", sources.result())
