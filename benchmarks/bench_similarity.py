"""Similarity search over embeddings: which ANN library, and how good the neighbours are.

Three parts, each written to the results file (benchmarks/results/similarity.json):

- `libraries`: the candidates (faiss-cpu HNSW and IVF, usearch HNSW in f32 and f16, hnswlib,
  voyager) on N synthetic embeddings of width D shaped like a model's pre-logit features
  (clustered, of low intrinsic dimension: `synthetic_embeddings`), unit-normalised (cosine).
  Each one is built in a child process (peak RSS of the build), saved, then opened in a fresh
  child (RSS added by opening it, and after the queries) and queried one query at a time, one
  thread, k=10: p50/p99 latency and recall@10 against an exact search on the same data.
  Libraries that are not installed are reported as such (the project installs only the winner,
  usearch; the comparison ran in a scratch venv with all of them).
- `galmorph_index`: galmorph's own index (galmorph.similarity) built from scored Parquet parts
  of the same synthetic embeddings: build time, files on disk, RSS when served memory-mapped,
  latency and recall through `SimilarityIndex.search`.
- `quality`: on labelled images (synthetic Galaxy10 via galmorph.training.synth, and the real
  Galaxy10 images in tests/data), the share of each image's k nearest neighbours that have its
  class, with the model's embeddings (cosine and L2) against raw pixels (the baseline any user
  has without a model). Needs a model: `--model` (an exported ONNX file).

    .venv/bin/python -m benchmarks.bench_similarity --n 1000000 --model demo/model.onnx
    .venv/bin/python -m benchmarks.bench_similarity --quick --out /tmp/similarity.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import REPO_ROOT, RESULTS_DIR, write_results

K = 10
QUERIES = 1000
# Search breadths tried on each built index (usearch's expansion_search, HNSW's ef).
SEARCH_BREADTHS = (32, 64, 128, 256)
CHUNK = 50_000
LIBRARIES = (
    "faiss_hnsw32",
    "faiss_ivf4096_flat",
    "usearch_f32",
    "usearch_f16",
    "hnswlib",
    "voyager",
)


def synthetic_embeddings(n: int, dim: int, seed: int, *, clusters: int = 1000) -> np.ndarray:
    """Unit-norm float32 (n, dim): `clusters` Gaussian clusters in a 32-d latent space mapped
    linearly into dim, plus a little isotropic noise, through a ReLU (pre-logit features are
    post-activation). The centres and the map depend on `seed` // 1000 only, so the index set
    and the query set (seed + 1) share them. Cluster sizes are skewed like survey classes."""
    shared = np.random.default_rng(seed // 1000)
    latent = 32
    centres = shared.normal(0.0, 1.0, (clusters, latent)).astype(np.float32)
    mixing = shared.normal(0.0, 1.0 / np.sqrt(latent), (latent, dim)).astype(np.float32)
    weights = shared.pareto(1.5, clusters) + 1.0
    rng = np.random.default_rng(seed)
    which = rng.choice(clusters, size=n, p=weights / weights.sum())
    z = centres[which] + rng.normal(0.0, 0.45, (n, latent)).astype(np.float32)
    x = z @ mixing + rng.normal(0.0, 0.05, (n, dim)).astype(np.float32)
    np.maximum(x, 0.0, out=x)
    x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-12
    return x.astype(np.float32)


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mb() -> float:
    # VmHWM, not getrusage's ru_maxrss: the latter keeps the parent's peak across fork + exec.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def _chunks(path: Path, dim: int) -> Any:
    """The vectors of a raw float32 file, CHUNK rows at a time, read (not mapped) so a build's
    RSS holds the index and one chunk, not the page cache of the whole file."""
    row_bytes = dim * 4
    with open(path, "rb") as handle:
        start = 0
        while block := handle.read(CHUNK * row_bytes):
            rows = np.frombuffer(bytearray(block), np.float32).reshape(-1, dim)  # writable
            yield start, rows
            start += len(rows)


def exact_neighbours(path: Path, queries: np.ndarray, dim: int, k: int) -> np.ndarray:
    """Row numbers of the k most similar (inner product) rows of the file, per query."""
    best_scores = np.full((len(queries), k), -np.inf, np.float32)
    best_rows = np.zeros((len(queries), k), np.int64)
    for start, rows in _chunks(path, dim):
        scores = queries @ rows.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if scores.shape[1] > k else None
        top = np.tile(np.arange(scores.shape[1]), (len(queries), 1)) if top is None else top
        merged_scores = np.concatenate([best_scores, np.take_along_axis(scores, top, 1)], 1)
        merged_rows = np.concatenate([best_rows, top + start], 1)
        order = np.argsort(-merged_scores, axis=1)[:, :k]
        best_scores = np.take_along_axis(merged_scores, order, 1)
        best_rows = np.take_along_axis(merged_rows, order, 1)
    return best_rows


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True))
    return hits / truth.size


# --- the candidates: build(path, n, dim, threads) -> object; save(obj, file); open(file, dim)
# -> query(vector) -> row numbers. Each is imported only in its own child process.


def _build(library: str, path: Path, n: int, dim: int, threads: int) -> Any:
    if library.startswith("faiss"):
        import faiss

        faiss.omp_set_num_threads(threads)
        if library == "faiss_hnsw32":
            index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = 80
        else:
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, 4096, faiss.METRIC_INNER_PRODUCT)
            sample = next(rows for _, rows in _chunks(path, dim))
            train = np.concatenate([sample] + [r for s, r in _chunks(path, dim) if 0 < s < 4e5])
            index.train(np.ascontiguousarray(train[: 4096 * 64]))
        for _, rows in _chunks(path, dim):
            index.add(np.ascontiguousarray(rows))
        return index
    if library.startswith("usearch"):
        from usearch.index import Index

        dtype = "f16" if library.endswith("f16") else "f32"
        index = Index(ndim=dim, metric="cos", dtype=dtype, connectivity=16, expansion_add=128)
        for start, rows in _chunks(path, dim):
            keys = np.arange(start, start + len(rows), dtype=np.uint64)
            index.add(keys, rows, threads=threads)
        return index
    if library == "hnswlib":
        import hnswlib

        index = hnswlib.Index(space="ip", dim=dim)
        index.init_index(max_elements=n, M=16, ef_construction=128)
        index.set_num_threads(threads)
        for start, rows in _chunks(path, dim):
            index.add_items(rows, np.arange(start, start + len(rows)))
        return index
    if library == "voyager":
        import voyager

        index = voyager.Index(voyager.Space.InnerProduct, num_dimensions=dim, M=16,
                              ef_construction=128, max_elements=n)  # fmt: skip
        for start, rows in _chunks(path, dim):
            index.add_items(rows, list(range(start, start + len(rows))), num_threads=threads)
        return index
    raise ValueError(f"unknown library {library}")


def _save(library: str, index: Any, file: Path) -> None:
    if library.startswith("faiss"):
        import faiss

        faiss.write_index(index, str(file))
    elif library == "hnswlib":
        index.save_index(str(file))
    else:
        index.save(str(file))


def _open(library: str, file: Path, dim: int) -> Callable[[np.ndarray, int], np.ndarray]:
    """The opened index as query(vector, ef) -> row numbers; ef is the search breadth (the
    HNSW candidate list; an IVF index probes ef / 4 lists)."""
    if library.startswith("faiss"):
        import faiss

        faiss.omp_set_num_threads(1)
        flags = faiss.IO_FLAG_MMAP if "ivf" in library else 0
        index = faiss.read_index(str(file), flags)

        def faiss_query(q: np.ndarray, ef: int) -> np.ndarray:
            if library == "faiss_hnsw32":
                index.hnsw.efSearch = ef
            else:
                index.nprobe = ef // 4
            return index.search(q[None], K)[1][0]

        return faiss_query
    if library.startswith("usearch"):
        from usearch.index import Index

        graph = Index.restore(str(file), view=True)

        def usearch_query(q: np.ndarray, ef: int) -> np.ndarray:
            graph.expansion_search = ef
            return graph.search(q, K, threads=1).keys.astype(np.int64)

        return usearch_query
    if library == "hnswlib":
        import hnswlib

        hnsw = hnswlib.Index(space="ip", dim=dim)
        hnsw.load_index(str(file))
        hnsw.set_num_threads(1)

        def hnswlib_query(q: np.ndarray, ef: int) -> np.ndarray:
            hnsw.set_ef(ef)
            return hnsw.knn_query(q, K)[0][0].astype(np.int64)

        return hnswlib_query
    import voyager

    loaded = voyager.Index.load(str(file))
    return lambda q, ef: np.asarray(loaded.query(q, K, query_ef=ef)[0], np.int64)


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One candidate, in its own process: `build` or `serve` (open, then query)."""
    path, dim, file = Path(args.vectors), args.dim, Path(args.index_file)
    if args.child == "build":
        base = _rss_mb()
        started, cpu_started = time.perf_counter(), _cpu_s()
        index = _build(args.library, path, args.n, dim, args.threads)
        seconds, cpu = time.perf_counter() - started, _cpu_s() - cpu_started
        _save(args.library, index, file)
        return {
            "build_s": round(seconds, 1),
            # CPU seconds over the threads: on a shared machine wall time is inflated by the
            # neighbours' load; cpu / threads is what the build takes on idle cores.
            "build_cpu_s": round(cpu, 1),
            "build_s_on_idle_cores": round(cpu / args.threads, 1),
            "build_peak_rss_mb": round(_peak_rss_mb() - base, 1),
            "file_mb": round(file.stat().st_size / 2**20, 1),
        }
    queries = np.load(args.queries)
    base = _rss_mb()
    started = time.perf_counter()
    query = _open(args.library, file, dim)
    open_s = time.perf_counter() - started
    opened = _rss_mb()
    truth = np.load(args.truth)
    results: dict[str, Any] = {
        "open_s": round(open_s, 2),
        "rss_opened_mb": round(opened - base, 1),
    }
    for ef in SEARCH_BREADTHS:
        for q in queries[:20]:  # warm-up
            query(q, ef)
        found, samples = [], []
        for q in queries:
            start = time.perf_counter()
            found.append(query(q, ef))
            samples.append(time.perf_counter() - start)
        results[f"ef{ef}"] = {
            "query_p50_ms": round(float(np.percentile(samples, 50)) * 1e3, 3),
            "query_p99_ms": round(float(np.percentile(samples, 99)) * 1e3, 3),
            "recall_at_10": round(recall_at_k(np.stack(found), truth), 4),
        }
    results["rss_after_queries_mb"] = round(_rss_mb() - base, 1)
    return results


def _run_child(argv: list[str], timeout: float) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.bench_similarity", *argv]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)  # fmt: skip
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {done.returncode}: {tail[0][:300]}"}
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _installed(library: str) -> bool:
    import importlib.util

    module = library.split("_")[0]
    return importlib.util.find_spec(module) is not None


def make_vectors(folder: Path, n: int, dim: int, seed: int) -> tuple[Path, Path, Path]:
    """The raw float32 vector file, the queries (.npy) and their exact neighbours (.npy)."""
    vectors = folder / f"vectors_{n}x{dim}.f32"
    with open(vectors, "wb") as handle:
        for start in range(0, n, CHUNK):
            handle.write(synthetic_embeddings(min(CHUNK, n - start), dim, seed + start).tobytes())
    queries = synthetic_embeddings(QUERIES, dim, seed + 999)
    truth = exact_neighbours(vectors, queries, dim, K)
    np.save(folder / "queries.npy", queries)
    np.save(folder / "truth.npy", truth)
    return vectors, folder / "queries.npy", folder / "truth.npy"


def compare_libraries(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    started = time.perf_counter()
    vectors, queries, truth = make_vectors(folder, args.n, args.dim, args.seed)
    results: dict[str, Any] = {
        "n": args.n,
        "dim": args.dim,
        "metric": "cosine (unit vectors, inner product)",
        "data_s": round(time.perf_counter() - started, 1),
        "queries": QUERIES,
        "k": K,
        "raw_vectors_mb": round(vectors.stat().st_size / 2**20, 1),
    }
    for library in args.libraries:
        if not _installed(library):
            results[library] = {"status": "not installed"}
            continue
        file = folder / f"{library}.index"
        common = ["--library", library, "--vectors", str(vectors), "--dim", str(args.dim),
                  "--index-file", str(file), "--n", str(args.n)]  # fmt: skip
        built = _run_child(
            ["--child", "build", *common, "--threads", str(args.threads)], args.timeout
        )
        served = {} if "error" in built else _run_child(
            ["--child", "serve", *common, "--queries", str(queries), "--truth", str(truth)],
            args.timeout,
        )  # fmt: skip
        results[library] = {**built, **served}
        file.unlink(missing_ok=True)
        print(library, results[library], flush=True)
    vectors.unlink()
    return results


def _neighbour_agreement(vectors: np.ndarray, labels: np.ndarray, k: int, metric: str) -> float:
    """Share of each item's k nearest others (exact search) that have its label."""
    x = vectors.astype(np.float64)
    x = x - x.mean(axis=0) if metric == "cosine_centred" else x
    if metric.startswith("cosine"):
        x = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)
        distance = -x @ x.T
    else:
        squared = (x**2).sum(1)
        distance = squared[:, None] + squared[None, :] - 2 * x @ x.T
    np.fill_diagonal(distance, np.inf)
    nearest = np.argsort(distance, axis=1)[:, :k]
    return round(float((labels[nearest] == labels[:, None]).mean()), 4)


def _agreements(embeddings: np.ndarray, pixels: np.ndarray, labels: np.ndarray, k: int) -> dict:
    counts = np.bincount(labels)
    chance = float(((counts * (counts - 1)).sum()) / (len(labels) * (len(labels) - 1)))
    return {
        "n": len(labels),
        "k": k,
        "chance": round(chance, 4),
        "embeddings_cosine": _neighbour_agreement(embeddings, labels, k, "cosine"),
        "embeddings_l2": _neighbour_agreement(embeddings, labels, k, "l2"),
        "pixels_cosine": _neighbour_agreement(pixels, labels, k, "cosine"),
        "pixels_cosine_centred": _neighbour_agreement(pixels, labels, k, "cosine_centred"),
        "pixels_l2": _neighbour_agreement(pixels, labels, k, "l2"),
    }


def neighbour_quality(model_path: Path, folder: Path, n: int, seed: int) -> dict[str, Any]:
    """Neighbours' class agreement with the model's embeddings against raw pixels (the model's
    input images, so both see the same pixels), on synthetic and real labelled images."""
    import h5py

    from galmorph.core.cutouts.decode import decode_path, fit_array
    from galmorph.core.modelfile.engine import OnnxModel

    model = OnnxModel(model_path, providers=["CPUExecutionProvider"], intra_op_threads=2)
    spec = model.card.input_spec

    def embed(images: np.ndarray) -> np.ndarray:
        batches = [model.run(images[i : i + 64]).embeddings for i in range(0, len(images), 64)]
        return np.concatenate([b for b in batches if b is not None])

    synth = folder / "quality.h5"
    subprocess.run(
        [sys.executable, "-m", "galmorph.cli", "data", "synth", "--out", str(synth), "--n",
         str(n), "--size", "64", "--seed", str(seed), "--quiet"],
        check=True, cwd=REPO_ROOT,
    )  # fmt: skip
    with h5py.File(synth) as handle:
        raw, labels = handle["images"][:], handle["ans"][:].astype(np.int64)
    images = np.stack([fit_array(image, spec, None).image for image in raw])
    flat = images.reshape(len(images), -1).astype(np.float32)
    results: dict[str, Any] = {
        "model": str(model_path),
        "model_sha256": model.sha256,
        "synthetic": {"seed": seed, **_agreements(embed(images), flat, labels, K)},
    }
    real = sorted((REPO_ROOT / "tests" / "data" / "galaxy10-real").glob("class*_*"))
    real += sorted((REPO_ROOT / "tests" / "data" / "galaxy10-real").glob("sample_*"))
    if real:
        # classK_Name.png is Galaxy10 class K; sample_J_Name.jpg is class J - 1.
        real_labels = np.array(
            [int(p.stem[5]) if p.stem.startswith("class") else int(p.stem.split("_")[1]) - 1
             for p in real]
        )  # fmt: skip
        images = np.stack([decode_path(p, spec=spec).image for p in real])
        flat = images.reshape(len(images), -1).astype(np.float32)
        results["real_galaxy10"] = {
            "files": [p.name for p in real],
            **_agreements(embed(images), flat, real_labels, 1),
        }
    return results


def galmorph_index(folder: Path, n: int, dim: int, seed: int, threads: int) -> dict[str, Any]:
    """galmorph.similarity's own index, built from scored Parquet parts like the scorer's."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from galmorph.core.data.tables import embeddings_array
    from galmorph.similarity.index import EXPANSION_SEARCH, SimilarityIndex, build_index

    scores = folder / "scores"
    scores.mkdir()
    vectors = folder / "index_vectors.f32"
    with open(vectors, "wb") as raw:
        for part, start in enumerate(range(0, n, CHUNK)):
            rows = synthetic_embeddings(min(CHUNK, n - start), dim, seed + start)
            raw.write(rows.tobytes())
            table = pa.table(
                {
                    "id_str": pa.array([f"g{start + i:09d}" for i in range(len(rows))]),
                    "pred_label": pa.array(["Round Smooth"] * len(rows)),
                    "pred_prob": pa.array(np.full(len(rows), 0.9, np.float32)),
                    "embeddings": embeddings_array(rows),
                    "model_sha256": pa.array(["0" * 64] * len(rows)),
                }
            )
            pq.write_table(table, scores / f"part-{part:05d}.parquet")
    queries = synthetic_embeddings(QUERIES, dim, seed + 999)
    truth = exact_neighbours(vectors, queries, dim, K)
    vectors.unlink()
    started, cpu_started = time.perf_counter(), _cpu_s()
    build_index([scores], folder / "index", threads=threads)
    build_s, cpu = time.perf_counter() - started, _cpu_s() - cpu_started
    base = _rss_mb()
    index = SimilarityIndex(folder / "index")
    opened = _rss_mb()
    samples, found = [], []
    for q in queries:
        start = time.perf_counter()
        found.append(index.search(q, K)["id_str"].to_pylist())
        samples.append(time.perf_counter() - start)
    keys = np.array([[int(i[1:]) for i in row] for row in found])
    files = {p.name: round(p.stat().st_size / 2**20, 1) for p in (folder / "index").iterdir()}
    return {
        "n": n,
        "dim": dim,
        "search_breadth": EXPANSION_SEARCH,
        "build_s": round(build_s, 1),
        "build_s_on_idle_cores": round(cpu / threads, 1),
        "files_mb": files,
        "rss_opened_mb": round(opened - base, 1),
        "rss_after_queries_mb": round(_rss_mb() - base, 1),
        "query_p50_ms": round(float(np.percentile(samples, 50)) * 1e3, 3),
        "query_p99_ms": round(float(np.percentile(samples, 99)) * 1e3, 3),
        "recall_at_10": round(recall_at_k(keys, truth), 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="synthetic embeddings")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="threads for building")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per child")
    parser.add_argument("--libraries", nargs="+", default=list(LIBRARIES), choices=LIBRARIES)
    parser.add_argument("--parts", nargs="+", default=["libraries"],
                        choices=["libraries", "galmorph_index", "quality"])  # fmt: skip
    parser.add_argument("--index-n", type=int, default=200_000, help="galmorph_index's size")
    parser.add_argument(
        "--model", type=Path, default=REPO_ROOT / "demo" / "model.onnx", help="for quality"
    )
    parser.add_argument("--quality-n", type=int, default=1000, help="synthetic labelled images")
    parser.add_argument("--quick", action="store_true", help="a small run for the smoke test")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "similarity.json")
    parser.add_argument("--work-dir", type=Path, default=None, help="scratch (default: a temp)")
    # Child processes of the library comparison.
    parser.add_argument("--child", choices=["build", "serve"], help=argparse.SUPPRESS)
    parser.add_argument("--library", help=argparse.SUPPRESS)
    parser.add_argument("--vectors", help=argparse.SUPPRESS)
    parser.add_argument("--index-file", help=argparse.SUPPRESS)
    parser.add_argument("--queries", help=argparse.SUPPRESS)
    parser.add_argument("--truth", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    if args.quick:
        args.n, args.index_n, args.quality_n = 20_000, 5000, 200
    with tempfile.TemporaryDirectory(dir=args.work_dir) as scratch:
        payload: dict[str, Any] = {"parts": args.parts}
        if "libraries" in args.parts:
            payload["libraries"] = compare_libraries(args, Path(scratch))
        if "galmorph_index" in args.parts:
            folder = Path(scratch) / "galmorph_index"
            folder.mkdir()
            payload["galmorph_index"] = galmorph_index(
                folder, args.index_n, args.dim, args.seed, args.threads
            )
            print("galmorph_index", payload["galmorph_index"], flush=True)
        if "quality" in args.parts:
            if args.model.is_file():
                quality = neighbour_quality(args.model, Path(scratch), args.quality_n, seed=11)
            else:
                quality = {"status": f"not run: no model at {args.model} (make demo, or --model)"}
            payload["quality"] = quality
            print("quality", json.dumps(quality), flush=True)
    write_results(args.out, payload)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
