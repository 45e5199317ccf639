"""The data plane every classifying route calls, whatever its protocol (REST or the Open
Inference Protocol), as KServe's DataPlane is for its REST and gRPC servers: a route reads its
request and writes its response; everything between is here.

- `DataPlane` (a dependency, `PlaneDep`): the ready model, settings, metrics and decoder of one
  request, and its clock. `admit(n)` refuses (503) before anything is decoded when the queue
  could not take n images; `start(options)` opens a `Job`; `count(outcome)` and `counting()`
  keep the `galmorph_cutouts` counter (ok, or the status a cutout was refused with).
- `Job`: one request's options and deadline (decode, queue and inference all count).
  `decode(upload)` and `fit(image)` make the model's input on the decode threads within the
  memory budget; `predict(images)` queues them all together for the micro-batcher (all or none)
  and waits within the deadline; `answer(item, prediction)` is /classify's result
  (galmorph.service.results builds it; the Open Inference Protocol's tensors come from there too).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Annotated, Literal

import numpy as np
from fastapi import Depends, HTTPException, Query, Request
from starlette.concurrency import run_in_threadpool

from galmorph.core.cutouts.decode import (
    FIT_MODES,
    CutoutError,
    DecodedCutout,
    fit_array,
    sniff_format,
)
from galmorph.core.cutouts.imaging import STRETCHES
from galmorph.core.cutouts.limits import Reserve
from galmorph.core.modelfile.contract import ModelCard
from galmorph.core.modelfile.engine import OnnxModel
from galmorph.service.batching import Prediction, QueueFullError
from galmorph.service.decoding import DecodeBusyError, Decoder, DecodeRequest, within_deadline
from galmorph.service.dependencies import MetricsDep, ReadyModel, ReadyModelDep, SettingsDep
from galmorph.service.errors import cutout_status
from galmorph.service.metrics import ServiceMetrics
from galmorph.service.results import build_result, png_base64
from galmorph.service.schemas import ClassificationResult
from galmorph.service.settings import Settings
from galmorph.service.uploads import (
    PayloadTooLargeError,
    Upload,
    UploadError,
    read_single_upload,
)

if TYPE_CHECKING:
    StretchName = str
    FitMode = str
else:
    # The decoder's closed sets, validated here and listed as enums in the OpenAPI schema.
    StretchName = Literal[tuple(sorted(STRETCHES))]
    FitMode = Literal[FIT_MODES]

# fit_array's peak over an image: Pillow holds RGB as 4 bytes a pixel (measured 4.01-4.14 at
# 8192^2 with crop_pad and resize), plus the model-sized result.
ARRAY_FIT_BYTES_PER_PIXEL = 5


@dataclass(frozen=True)
class ClassifyOptions:
    stretch: str | None
    fit: str | None
    top_k: int | None
    return_image: bool
    embeddings: bool = False


def classify_options(
    stretch: Annotated[
        StretchName | None,
        Query(description="FITS flux stretch (default: the model's, as in training)"),
    ] = None,
    fit: Annotated[
        FitMode | None,
        Query(description="crop_pad (keep the pixel scale) or resize (default: by format)"),
    ] = None,
    top_k: Annotated[int | None, Query(ge=1, description="classes in top_k")] = None,
    return_image: Annotated[
        bool, Query(description="include the model's input image as a base64 PNG")
    ] = False,
    embeddings: Annotated[
        bool, Query(description="include the pre-logit representation (the embeddings)")
    ] = False,
) -> ClassifyOptions:
    return ClassifyOptions(stretch, fit, top_k, return_image, embeddings)


OptionsDep = Annotated[ClassifyOptions, Depends(classify_options)]


@dataclass(frozen=True)
class DecodedUpload:
    upload: Upload
    cutout: DecodedCutout
    decode_s: float


def get_decoder(request: Request) -> Decoder:
    decoder: Decoder = request.app.state.decoder
    return decoder


DecoderDep = Annotated[Decoder, Depends(get_decoder)]


# What can refuse one cutout of a request (a batch answers each with its own status).
CUTOUT_REFUSALS = (CutoutError, DecodeBusyError, PayloadTooLargeError, UploadError)


def refusal_status(exc: Exception) -> int:
    """The status one cutout's refusal (one of CUTOUT_REFUSALS) is answered with."""
    if isinstance(exc, CutoutError):
        return cutout_status(exc)
    if isinstance(exc, DecodeBusyError):
        return 503
    if isinstance(exc, PayloadTooLargeError):
        return 413
    if isinstance(exc, UploadError):
        return 422
    raise TypeError(f"not a cutout's refusal: {exc!r}")


@dataclass(frozen=True)
class DataPlane:
    """One request's way to the model: what it needs of the app, and its clock."""

    ready: ReadyModel
    settings: Settings
    metrics: ServiceMetrics
    decoder: Decoder
    started: float  # time.perf_counter() as the route was entered: the answer's total_ms

    @property
    def model(self) -> OnnxModel:
        return self.ready.model

    def admit(self, images: int) -> None:
        """Refuse (503) before decoding anything when the queue could not take `images` now."""
        batcher = self.ready.batcher
        if batcher.queue_length + images > batcher.config.max_queue:
            raise QueueFullError(batcher.retry_after_s(images))

    def start(self, options: ClassifyOptions, deadline: float | None = None) -> Job:
        """The request's clock starts once its body is read (slow uploads have their own
        timeout); `deadline` (time.monotonic()) shortens it, as /classify/sky's own does."""
        if options.embeddings and not self.model.has_embeddings:
            raise HTTPException(
                422,
                f"embeddings=true but model {self.model.card.model_name!r} has no embeddings "
                "output (exported before galmorph wrote them): export it again",
            )
        own = time.monotonic() + self.settings.request_timeout_s
        return Job(self, options, own if deadline is None else min(own, deadline))

    def count(self, outcome: int | str) -> None:
        """One cutout handled: "ok" or the HTTP status it was refused with."""
        self.metrics.cutouts.labels(str(outcome)).inc()

    @contextmanager
    def counting(self) -> Iterator[None]:
        """Counts a cutout refused inside (a decode's refusal) under its status, and re-raises."""
        try:
            yield
        except (CutoutError, DecodeBusyError) as exc:
            self.count(refusal_status(exc))
            raise

    @asynccontextmanager
    async def predict_upload(
        self, request: Request, options: ClassifyOptions, filename: str | None
    ) -> AsyncIterator[tuple[Job, DecodedUpload, Prediction]]:
        """One uploaded cutout read, admitted, decoded and predicted. Its body's memory stays
        reserved until the caller's block ends: the answer may still hold the upload."""
        with self.decoder.budget.claim_body() as body_reserve:
            with self.counting():
                upload = await self._read_upload(request, filename, body_reserve)
                self.admit(1)
                job = self.start(options)
                item = await job.decode(upload)
            (prediction,) = await job.predict([item.cutout.image])
            yield job, item, prediction

    async def _read_upload(
        self, request: Request, filename: str | None, reserve: Reserve
    ) -> Upload:
        """The upload; a raw body whose first bytes are no cutout format is refused (415)
        unread, and its connection closed as a 413's is: the rest is never read, so the
        connection cannot carry another request."""
        try:
            return await read_single_upload(
                request,
                self.settings.max_body_bytes,
                filename,
                self.decoder.budget.claim_body,
                reserve,
                check_head=partial(sniff_format, filename=filename),
            )
        except CutoutError as exc:  # only the head check decodes anything here
            status = cutout_status(exc)
            self.count(status)
            raise HTTPException(status, exc.message, {"Connection": "close"}) from None


def get_data_plane(
    request: Request, ready: ReadyModelDep, settings: SettingsDep, metrics: MetricsDep
) -> DataPlane:
    return DataPlane(ready, settings, metrics, get_decoder(request), time.perf_counter())


PlaneDep = Annotated[DataPlane, Depends(get_data_plane)]


def _fit(
    image: np.ndarray, card: ModelCard, fit: str | None, where: str, reserve: Reserve
) -> DecodedCutout:
    height, width = image.shape[:2]
    reserve(ARRAY_FIT_BYTES_PER_PIXEL * height * width, where)
    try:
        return fit_array(image, card.input_spec, fit)
    except CutoutError as exc:
        raise CutoutError(exc.kind, f"{where}: {exc.message}") from None


@dataclass(frozen=True)
class Job:
    """What every cutout of one request shares: its data plane, options and deadline
    (time.monotonic(); decode, queue and inference all count)."""

    plane: DataPlane
    options: ClassifyOptions
    deadline: float

    async def decode(self, upload: Upload, where: str | None = None) -> DecodedUpload:
        """An encoded cutout decoded to the model's input; `where` (e.g. "files[2]") starts
        the message of its refusal."""
        if not upload.data:
            raise UploadError("empty upload: send the cutout as the body or as multipart 'file'")
        started = time.perf_counter()
        plane = self.plane
        request = DecodeRequest(
            upload,
            plane.model.card,
            self.options.stretch,
            self.options.fit,
            plane.settings.decode_limits,
        )
        try:
            decoded = await plane.decoder.decode(request, self.deadline)
        except CutoutError as exc:
            if where is None:
                raise
            raise CutoutError(exc.kind, f"{where}: {exc.message}") from None
        return DecodedUpload(upload, decoded, time.perf_counter() - started)

    async def fit(self, image: np.ndarray, where: str) -> DecodedCutout:
        """A rendered uint8 image fitted to the model's input as a PNG of it would be, on the
        decode threads and paid for from the memory budget."""
        work = partial(_fit, image, self.plane.model.card, self.options.fit, where)
        return await self.plane.decoder.run(work, self.deadline)

    async def predict(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        """All images queued together (or refused together when the queue is full), answered
        within the deadline; each counted ok."""
        plane = self.plane
        predictions = await within_deadline(plane.ready.batcher.submit_many(images), self.deadline)
        for prediction in predictions:
            plane.metrics.queue_time.observe(prediction.queue_s)
            plane.count("ok")
        return predictions

    async def answer(self, item: DecodedUpload, prediction: Prediction) -> ClassificationResult:
        """/classify's result for one cutout (the options' top_k, image and embeddings)."""
        plane, options = self.plane, self.options
        image = item.cutout.image
        image_png = await run_in_threadpool(png_base64, image) if options.return_image else None
        top_k = min(options.top_k or plane.settings.default_top_k, plane.model.card.num_classes)
        return build_result(
            model=plane.model,
            filename=item.upload.filename,
            decoded=item.cutout,
            prediction=prediction,
            top_k=top_k,
            decode_s=item.decode_s,
            total_s=time.perf_counter() - plane.started,
            image_png=image_png,
            embeddings=options.embeddings,
        )
