"""The machine's limit: float32 GEMM throughput (GFLOP/s) at a fixed thread count.

Large square matrix products are the best case for a CPU's floating-point units (compute
bound, cache-blocked by the library), so images/s can be no better than
GEMM FLOP/s / FLOPs per image. Three libraries are timed in interleaved rounds, because each
inference engine runs its own GEMM: torch.mm (oneDNN/MKL, what PyTorch eager uses),
numpy.matmul (OpenBLAS) and a one-node onnxruntime MatMul graph (MLAS, what our ONNX models
use). The limit is the best of them. Results: benchmarks/results/gemm.json.

    .venv/bin/python -m benchmarks.bench_gemm [--threads 2] [--sizes 1024 2048 4096]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import RESULTS_DIR, time_interleaved, write_results

ENGINES = ("torch.mm", "numpy.matmul", "onnxruntime.MatMul")
SETTLE_S = 0.25


def gemm_flops(size: int) -> int:
    """FLOPs of one (size x size) @ (size x size) product: size^3 multiply-adds."""
    return 2 * size**3


def _onnx_matmul(size: int, threads: int) -> Callable[[np.ndarray, np.ndarray], object]:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    shape = [size, size]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "gemm",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, shape),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, shape),
        ],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, shape)],
    )
    # IR version pinned: the installed onnx writes a newer one than onnxruntime reads.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return lambda a, b: session.run(None, {"a": a, "b": b})


def gemm_callables(size: int, threads: int, seed: int = 0) -> dict[str, Callable[[], object]]:
    """One float32 size x size product per call, for each engine, on the same matrices.

    torch's pool is set here; numpy's OpenBLAS pool is fixed at import by OPENBLAS_NUM_THREADS
    (benchmarks.run sets it for every child process).
    """
    import torch

    torch.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    ort_matmul = _onnx_matmul(size, threads)
    return {
        "torch.mm": lambda: torch.mm(ta, tb),
        "numpy.matmul": lambda: np.matmul(a, b),
        "onnxruntime.MatMul": lambda: ort_matmul(a, b),
    }


def measure_gemm(size: int, threads: int, *, warmup: int, repeats: int) -> dict[str, Any]:
    """GFLOP/s per engine (median, min, max) and the best engine's median as the limit."""
    # The pause lets one library's busy-waiting threads (OpenBLAS spins ~2^28 cycles after a
    # call) go idle before the next library is timed.
    timings = time_interleaved(
        gemm_callables(size, threads), warmup=warmup, repeats=repeats, settle_s=SETTLE_S
    )
    flops = gemm_flops(size)
    engines: dict[str, dict[str, Any]] = {}
    for name, timing in timings.items():
        engines[name] = {
            "gflops": round(flops / timing.median / 1e9, 2),
            "gflops_min": round(flops / max(timing.samples) / 1e9, 2),
            "gflops_max": round(flops / min(timing.samples) / 1e9, 2),
            "timing": timing.to_dict(),
        }
    best = max(engines, key=lambda name: float(engines[name]["gflops"]))
    return {
        "size": size,
        "engines": engines,
        "best_engine": best,
        "limit_gflops": engines[best]["gflops"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="threads for every engine")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "gemm.json")
    args = parser.parse_args(argv)

    results = []
    for size in args.sizes:
        result = measure_gemm(size, args.threads, warmup=args.warmup, repeats=args.repeats)
        results.append(result)
        summary = ", ".join(f"{k} {v['gflops']:.1f}" for k, v in result["engines"].items())
        print(f"GEMM {size}x{size}, {args.threads} threads: {summary} GFLOP/s", flush=True)
    limit = max(results, key=lambda result: result["limit_gflops"])
    write_results(
        args.out,
        {
            "benchmark": "float32 GEMM throughput, the machine's limit",
            "threads": args.threads,
            "sizes": results,
            "limit_gflops": limit["limit_gflops"],
            "limit_from": f"{limit['best_engine']} at {limit['size']}",
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
