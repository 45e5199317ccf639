"""How far a reduced-scale JPEG decode (Pillow's `draft`: libjpeg's 1/2, 1/4, 1/8 DCT scaling)
moves a served answer from the full decode's: whether any factor keeps it within 1e-3 (none
did, so galmorph.core.cutouts.raster_io decodes every JPEG in full).

The 20 real Galaxy10 images in tests/data (10 JPEGs, 10 PNGs) are brought to 256, 512, 1024,
2048 and 4096 px (Lanczos) and saved as JPEGs (quality 90; the 256 px JPEGs are used as they
come). Each is decoded in full and at every draft factor, fitted to the model's input as the
server fits a JPEG (`galmorph.core.cutouts.decode.fit_picture`, "resize", the card's interpolation)
and classified by real exported models: max |dp| is the largest change of any class
probability against the full decode, `kept` the reduced image's side over the input's side.
`noise_max_dp`, for scale, is what adding -1, 0 or +1 to every input pixel does. Results go to
benchmarks/results/jpeg_draft.json.

    .venv/bin/python -m benchmarks.bench_jpeg_draft [--model model.onnx ...]

Without --model it trains and exports the tests' small model (tests/support/trained_model.py's
recipe: 600 synthetic images, 4 epochs, gm_astroformer_tiny) at 32, 64 and 128 px input, about a
minute each on one core.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.common import REAL_DATA, RESULTS_DIR, write_results
from galmorph.core.cutouts.decode import PreprocessInfo, fit_picture
from galmorph.core.modelfile.engine import OnnxModel

RESULTS = RESULTS_DIR / "jpeg_draft.json"
SIDES = (256, 512, 1024, 2048, 4096)
QUALITY = 90
TOLERANCE = 1e-3  # how far the served answer may move from the full decode's
TRAIN_SIZES = (32, 64, 128)
DRAFT_FACTORS = (2, 4, 8)  # the reduced scales libjpeg decodes at, as Pillow's draft offers them


def sources() -> dict[str, Image.Image]:
    folder = REAL_DATA / "galaxy10-real"
    return {
        path.name: Image.open(path).convert("RGB")
        for path in sorted([*folder.glob("*.jpg"), *folder.glob("*.png")])
    }


def jpeg_at(name: str, picture: Image.Image, side: int) -> bytes:
    """The real JPEG itself at its own size; otherwise the picture resized and re-encoded."""
    if name.endswith(".jpg") and picture.size == (side, side):
        return (REAL_DATA / "galaxy10-real" / name).read_bytes()
    buffer = io.BytesIO()
    picture.resize((side, side), Image.Resampling.LANCZOS).save(
        buffer, format="JPEG", quality=QUALITY
    )
    return buffer.getvalue()


def fitted(data: bytes, factor: int, model: OnnxModel) -> np.ndarray:
    """The model's input from `data` decoded at 1/factor scale (1: the full decode)."""
    picture = Image.open(io.BytesIO(data))
    if factor > 1:
        picture.draft("RGB", (picture.width // factor, picture.height // factor))
        assert picture.width * factor == Image.open(io.BytesIO(data)).width, "draft scale"
    picture.load()
    card = model.card
    info = PreprocessInfo(format="jpeg", bands_used=["R", "G", "B"], original_shape=(0, 0, 3))
    return fit_picture(picture, card.input_size, "resize", info, card.interpolation)


def measure(model_path: Path) -> dict[str, Any]:
    model = OnnxModel(model_path, providers=["CPUExecutionProvider"], intra_op_threads=1)
    size = model.card.input_size[0]
    pictures = sources()
    rows = []
    worst_by_kept: dict[float, float] = defaultdict(float)
    for side in SIDES:
        files = [jpeg_at(name, picture, side) for name, picture in pictures.items()]
        full = model.run(np.stack([fitted(data, 1, model) for data in files])).probabilities
        started = time.perf_counter()
        for data in files:
            fitted(data, 1, model)
        full_ms = (time.perf_counter() - started) * 1e3 / len(files)
        for factor in DRAFT_FACTORS:
            if side // factor < size:
                continue  # libjpeg would give less than the input: never drafted
            started = time.perf_counter()
            images = np.stack([fitted(data, factor, model) for data in files])
            draft_ms = (time.perf_counter() - started) * 1e3 / len(files)
            dp = np.abs(model.run(images).probabilities - full).max(axis=1)
            kept = side / factor / size
            worst_by_kept[kept] = max(worst_by_kept[kept], float(dp.max()))
            rows.append(
                {
                    "side": side,
                    "factor": factor,
                    "kept": kept,
                    "max_dp": float(dp.max()),
                    "mean_dp": float(dp.mean()),
                    "images": len(files),
                    "decode_and_fit_ms": round(draft_ms, 2),
                    "full_decode_and_fit_ms": round(full_ms, 2),
                }
            )
            print(
                f"input {size}: {side} px at 1/{factor} (kept {kept:g}x): max |dp| "
                f"{dp.max():.2e}, mean {dp.mean():.2e}",
                flush=True,
            )
    return {
        "model": model_path.name,
        "noise_max_dp": noise_max_dp(model, [jpeg_at(n, p, 512) for n, p in pictures.items()]),
        "model_name": model.card.model_name,
        "input_size": size,
        "interpolation": model.card.interpolation,
        "rows": rows,
        "max_dp_by_kept": {f"{k:g}": v for k, v in sorted(worst_by_kept.items())},
    }


def noise_max_dp(model: OnnxModel, files: list[bytes]) -> float:
    """Max |dp| from adding -1, 0 or +1 (seeded) to every input pixel of the full decodes: how
    far a change too small to see moves the model, for scale."""
    images = np.stack([fitted(data, 1, model) for data in files])
    noise = np.random.default_rng(0).integers(-1, 2, images.shape)
    noisy = np.clip(images.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    change = model.run(noisy).probabilities - model.run(images).probabilities
    return float(np.abs(change).max())


def train_model(root: Path, size: int) -> Path:
    """tests/support/trained_model.py's model at `size` px input."""
    from galmorph.model.export import export_model
    from galmorph.training.train import train
    from tests.support.training_helpers import make_synthetic, tiny_config

    data = make_synthetic(root / f"synth{size}.h5", n=600)
    config = tiny_config(
        data, root / f"run{size}", epochs=4, img_size=size, mixup={"mixup_alpha": 0}
    )
    return export_model(train(config), root / f"model{size}.onnx", intra_op_threads=1).path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, action="append", help="exported .onnx (repeatable)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        paths = args.model or [train_model(Path(scratch), size) for size in TRAIN_SIZES]
        models = [measure(path) for path in paths]
    smallest = min(row["max_dp"] for m in models for row in m["rows"])
    payload = {
        "tolerance": TOLERANCE,
        "sides": SIDES,
        "factors": DRAFT_FACTORS,
        "jpeg_quality": QUALITY,
        "smallest_max_dp": smallest,
        "any_draft_within_tolerance": smallest <= TOLERANCE,
        "models": models,
    }
    print(f"smallest max |dp| of any reduced decode: {smallest:.2e} (tolerance {TOLERANCE})")
    print(write_results(args.out, payload))


if __name__ == "__main__":
    main()
