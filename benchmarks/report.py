"""Turn benchmarks/results/*.json into summary.md (tables, targets) and throughput_vs_batch.png.

Reads whatever results exist: a benchmark that did not run leaves its section saying so.
The service and scorer owners' JSON layouts are their own; their ratios to raw onnxruntime
are found by key name (any key holding "fraction" and "raw"), so the summary follows them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ORT, EAGER, COMPILED, ORT_SLOW = (
    "onnxruntime",
    "torch_eager",
    "torch_compile",
    "onnxruntime_opset18",
)
CONTENDERS = (ORT, EAGER, COMPILED, ORT_SLOW)
TARGET_MODEL = "astroformer_0"
DEMO_MODEL = "gm_astroformer_tiny"
COMPONENT_TARGET = 0.85  # service and scorer: fraction of raw onnxruntime images/s
# The owners' headline ratios (results file, label, key path suffix), as their issues define
# them: the service at concurrency 8 with batching; the scorer's median round per input format.
HEADLINE_FRACTIONS = (
    ("service", "service", "c8_fraction_of_raw_batch8"),
    ("score", "scorer", "median_fraction_of_raw"),
)


def load_results(results_dir: Path) -> dict[str, dict[str, Any]]:
    documents = {}
    for path in sorted(results_dir.glob("*.json")):
        try:
            documents[path.stem] = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            documents[path.stem] = {"error": f"unreadable JSON: {exc}"}
    return documents


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _rate(figures: dict[str, Any] | None) -> str:
    """images/s as 'median (min–max)', or the contender's status when it did not run."""
    if not figures:
        return "–"
    if "items_per_s" not in figures:
        return str(figures.get("status", "–")).split(":")[0]
    return (
        f"{figures['items_per_s']:.2f} ({figures['items_per_s_min']:.2f}–"
        f"{figures['items_per_s_max']:.2f})"
    )


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def machine_section(documents: dict[str, dict[str, Any]]) -> list[str]:
    # Ours (benchmarks.common.machine_info) first; other files may describe the machine briefly.
    source = next(
        (
            documents[stem]["machine"]
            for stem in ("models", "gemm", "startup", "stages", "run")
            if isinstance(documents.get(stem, {}).get("machine"), dict)
        ),
        None,
    )
    if source is None:
        return ["No results yet."]
    versions = ", ".join(f"{k} {v}" for k, v in source.get("versions", {}).items() if v)
    return [
        f"- CPU: {source.get('cpu_model')}, {source.get('physical_cores')} physical cores, "
        f"{source.get('logical_cpus')} logical CPUs, SIMD {', '.join(source.get('simd', []))}",
        f"- {source.get('platform')}, Python {source.get('python')}; {versions}",
        "- The machine is shared with other work: compare ratios taken within one run, not "
        "absolute figures across runs.",
    ]


def inference_section(models: dict[str, Any]) -> list[str]:
    threads = models.get("threads", {})
    lines = [
        f"Images/s, median (min–max) of interleaved rounds after warm-up; float32; "
        f"{threads.get('onnxruntime_intra_op')} onnxruntime intra-op threads = "
        f"{threads.get('torch')} torch threads; same weights, same uint8 inputs. "
        "Limit = GEMM GFLOP/s measured in the same rounds / FLOPs per image.",
        "",
    ]
    rows = []
    for name, model in models.get("models", {}).items():
        for batch, case in model.get("batches", {}).items():
            figures = case.get("contenders", {})
            speedup = case.get("speedup", {})
            rows.append(
                [
                    f"{name} @{model['img_size']}",
                    batch,
                    *(_rate(figures.get(c)) for c in CONTENDERS),
                    _fmt(speedup.get(f"{ORT}_vs_{EAGER}")),
                    _fmt(speedup.get(f"{ORT}_vs_{COMPILED}")),
                    _fmt(speedup.get(f"{ORT}_vs_{ORT_SLOW}")),
                    f"{_fmt(case.get('limit_images_per_s'))} "
                    f"({_fmt(case.get('limit_gflops'), 1)} GFLOP/s)",
                    _fmt(figures.get(ORT, {}).get("fraction_of_limit")),
                ]
            )
    header = ["model", "batch", "onnxruntime", "torch eager", "torch.compile", "ORT opset 18"]
    header += ["ORT/eager", "ORT/compile", "ORT/opset18", "limit img/s", "ORT of limit"]
    lines += _table(header, rows)
    return lines


def _case(models: dict[str, Any], name: str, batch: str) -> dict[str, Any]:
    return dict(models.get("models", {}).get(name, {}).get("batches", {}).get(batch, {}))


def targets_section(documents: dict[str, dict[str, Any]]) -> list[str]:
    models = documents.get("models", {})
    startup = documents.get("startup", {}).get("models", {})
    rows = []

    def row(what: str, target: float, measured: float | None, higher_is_better: bool) -> None:
        if measured is None:
            rows.append([what, f"{target:g}", "not measured", "–"])
            return
        met = measured >= target if higher_is_better else measured <= target
        rows.append([what, f"{target:g}", f"{measured:.2f}", "yes" if met else "**no**"])

    for batch, target in (("1", 1.8), ("32", 3.0)):
        speedup = _case(models, TARGET_MODEL, batch).get("speedup", {}).get(f"{ORT}_vs_{EAGER}")
        row(f"{TARGET_MODEL} batch {batch}: onnxruntime / PyTorch eager (x)", target, speedup, True)
    fraction = _case(models, TARGET_MODEL, "32").get("contenders", {}).get(ORT, {})
    row(
        f"{TARGET_MODEL} batch 32: onnxruntime fraction of the GEMM limit",
        0.5,
        fraction.get("fraction_of_limit"),
        True,
    )
    ready = startup.get(DEMO_MODEL, {}).get("ready_s", {}).get("median")
    row(f"`galmorph serve` start to ready, {DEMO_MODEL} (s)", 5.0, ready, False)
    for stem, label, suffix in HEADLINE_FRACTIONS:
        found = [(path, value) for path, value in raw_fractions(documents.get(stem, {}))]
        headlines = [(path, value) for path, value in found if path.endswith(suffix)]
        if not headlines:
            row(f"{label}: {suffix}", COMPONENT_TARGET, None, True)
        for path, value in headlines:
            row(f"{label} ({stem}.json `{path}`)", COMPONENT_TARGET, value, True)
    return _table(["target", "goal", "measured", "met"], rows)


def raw_fractions(document: Any, path: str = "") -> Iterator[tuple[str, float]]:
    """(json path, value) of every number under a key naming a fraction of raw throughput."""
    if isinstance(document, dict):
        for key, value in document.items():
            where = f"{path}.{key}" if path else str(key)
            lowered = str(key).lower()
            if isinstance(value, int | float) and "fraction" in lowered and "raw" in lowered:
                yield where, float(value)
            else:
                yield from raw_fractions(value, where)
    elif isinstance(document, list):
        for index, item in enumerate(document):
            yield from raw_fractions(item, f"{path}[{index}]")


def components_section(documents: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for stem, label in (("service", "Service (HTTP)"), ("score", "Batch scorer")):
        document = documents.get(stem)
        if document is None:
            lines += [f"- {label}: no results/{stem}.json (its benchmark did not run)."]
            continue
        found = list(raw_fractions(document))
        what = document.get("benchmark") or document.get("what") or ""
        lines += ["", f"**{label}** ({stem}.json{': ' + what if what else ''})", ""]
        rows = [
            [path, f"{value:.3f}", "yes" if value >= COMPONENT_TARGET else "no"]
            for path, value in found
        ]
        lines += _table(["measurement", "fraction of raw", f">= {COMPONENT_TARGET}"], rows)
    return lines


def int8_section(int8: dict[str, Any]) -> list[str]:
    if not int8:
        return ["Not measured."]
    accuracy = int8.get("accuracy", {})
    lines = [
        f"{int8.get('model')} at {int8.get('img_size')} px; "
        f"{int8.get('training', {}).get('how', '')}. Held-out: {accuracy.get('heldout_images')} "
        f"images ({accuracy.get('heldout')}).",
        "",
        f"- top-1 fp32 {_fmt(accuracy.get('fp32_top1'), 4)}, int8 "
        f"{_fmt(accuracy.get('int8_top1'), 4)}, change {accuracy.get('top1_change', 0):+.4f}; "
        f"same prediction on {_fmt(accuracy.get('prediction_agreement'), 4)} of images; "
        f"max |Δp| {_fmt(accuracy.get('max_abs_prob_diff'), 4)}",
        f"- file size fp32 {int8.get('artifact_bytes', {}).get('fp32', 0) / 1e6:.2f} MB, "
        f"int8 {int8.get('artifact_bytes', {}).get('int8', 0) / 1e6:.2f} MB",
        "",
    ]
    rows = [
        [batch, _rate(case.get("fp32")), _rate(case.get("int8")), _fmt(case.get("int8_speedup"))]
        for batch, case in int8.get("speed", {}).items()
    ]
    return lines + _table(["batch", "fp32 img/s", "int8 img/s", "int8/fp32"], rows)


def startup_section(startup: dict[str, Any]) -> list[str]:
    rows = []
    for name, figures in startup.get("models", {}).items():
        ready, rss = figures["ready_s"], figures["rss_mib_after_warm_requests"]
        rows.append(
            [
                f"{name} @{startup.get('img_size')}",
                f"{ready['median']:.2f} ({ready['min']:.2f}–{ready['max']:.2f})",
                f"{rss['median']:.0f}",
                f"{figures['peak_rss_mib']['median']:.0f}",
                str(figures["runs"]),
            ]
        )
    if not rows:
        return ["Not measured."]
    header = ["model", "start→ready s, median (min–max)", "RSS MiB warm", "peak RSS MiB", "runs"]
    return _table(header, rows)


def gemm_section(gemm: dict[str, Any]) -> list[str]:
    rows = []
    for size in gemm.get("sizes", []):
        for engine, figures in size["engines"].items():
            rows.append(
                [
                    str(size["size"]),
                    engine,
                    f"{figures['gflops']:.1f} ({figures['gflops_min']:.1f}–"
                    f"{figures['gflops_max']:.1f})",
                ]
            )
    if not rows:
        return ["Not measured."]
    lines = [f"{gemm.get('threads')} threads; limit {gemm.get('limit_gflops')} GFLOP/s "
             f"({gemm.get('limit_from')}).", ""]  # fmt: skip
    return lines + _table(["n (n×n @ n×n)", "engine", "GFLOP/s median (min–max)"], rows)


def decode_section(decode: dict[str, Any]) -> list[str]:
    rows = [
        [name, f"{case.get('median_ms', 0):.2f}", f"{case.get('cpu_median_ms', 0):.2f}"]
        for name, case in decode.get("results", {}).items()
    ]
    return _table(["cutout", "wall ms", "CPU ms"], rows) if rows else ["Not measured."]


def stages_section(stages: dict[str, Any]) -> list[str]:
    rows = [
        [name, f"{figures['ms_per_item']:.2f}", f"{figures['cpu_median_ms']:.2f}"]
        for name, figures in stages.get("stages", {}).items()
    ]
    if not rows:
        return ["Not measured."]
    lines = [f"{stages.get('benchmark')}; model {stages.get('model')}.", ""]
    return lines + _table(["stage", "wall ms per image (median)", "CPU ms per call"], rows)


def write_summary(documents: dict[str, dict[str, Any]], path: Path) -> Path:
    models = documents.get("models", {})
    run = documents.get("run", {})
    lines = ["# galmorph benchmark summary", ""]
    if run.get("quick") or models.get("quick"):
        lines += ["**Quick smoke run: tiny sizes and repeats; these figures mean nothing.**", ""]
    lines += ["## Machine", "", *machine_section(documents), ""]
    lines += ["## Targets", "", *targets_section(documents), ""]
    lines += ["## Inference: onnxruntime vs PyTorch", "", *inference_section(models), ""]
    lines += ["## Machine limit: float32 GEMM", "", *gemm_section(documents.get("gemm", {})), ""]
    lines += ["## int8 vs float32", "", *int8_section(models.get("int8", {})), ""]
    lines += ["## Service and scorer vs raw onnxruntime", "", *components_section(documents), ""]
    lines += ["## Server start and memory", "", *startup_section(documents.get("startup", {}))]
    lines += ["", "## Stages of one cutout", "", *stages_section(documents.get("stages", {}))]
    lines += ["", "## Decode (per cutout)", "", *decode_section(documents.get("decode", {}))]
    cuda = models.get("cuda", {})
    lines += ["", "## CUDA", "", f"- {cuda.get('status', 'measured: see models.json')}"]
    lines += ["", "## Benchmarks in this run", ""]
    rows = [
        [name, entry.get("owner", ""), entry.get("status", ""), str(entry.get("seconds", "–"))]
        for name, entry in run.get("benchmarks", {}).items()
    ]
    lines += _table(["benchmark", "owner", "status", "seconds"], rows)
    path.write_text("\n".join(lines) + "\n")
    return path


def plot_throughput(models: dict[str, Any], path: Path) -> Path:
    """images/s against batch size per model: onnxruntime, eager, compile, and the limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = models.get("models", {})
    fig, axes = plt.subplots(1, max(1, len(entries)), figsize=(6 * max(1, len(entries)), 4.5))
    axes_list = list(axes.flat) if hasattr(axes, "flat") else [axes]
    for ax, (name, model) in zip(axes_list, entries.items(), strict=False):
        cases = {int(b): c for b, c in (*model.get("sweep", {}).items(), *model["batches"].items())}
        points: dict[str, dict[int, dict[str, Any]]] = {}
        for batch, case in cases.items():
            for contender, figures in case.get("contenders", {}).items():
                if "items_per_s" in figures:
                    points.setdefault(contender, {})[batch] = figures
        for contender, by_batch in points.items():
            batches = sorted(by_batch)
            median = [by_batch[b]["items_per_s"] for b in batches]
            low = [m - by_batch[b]["items_per_s_min"] for b, m in zip(batches, median, strict=True)]
            high = [
                by_batch[b]["items_per_s_max"] - m for b, m in zip(batches, median, strict=True)
            ]
            ax.errorbar(batches, median, yerr=[low, high], marker="o", capsize=3, label=contender)
        limit_batches = sorted(b for b, case in cases.items() if "limit_images_per_s" in case)
        ax.plot(
            limit_batches,
            [cases[b]["limit_images_per_s"] for b in limit_batches],
            linestyle="--",
            color="grey",
            label="GEMM limit (same rounds)",
        )
        ax.set_xscale("log", base=2)
        ticks = sorted({b for by_batch in points.values() for b in by_batch})
        ax.set_xticks(ticks, labels=[str(b) for b in ticks])
        ax.minorticks_off()
        ax.set_ylim(bottom=0)
        ax.set_xlabel("batch size")
        ax.set_ylabel("images/s (median, min–max)")
        ax.set_title(f"{name} @{model.get('img_size')} px")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    threads = models.get("threads", {}).get("onnxruntime_intra_op")
    fig.suptitle(f"float32 CPU throughput, {threads} threads per engine")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_report(results_dir: Path) -> tuple[Path, Path]:
    documents = load_results(results_dir)
    summary = write_summary(documents, results_dir / "summary.md")
    plot = plot_throughput(documents.get("models", {}), results_dir / "throughput_vs_batch.png")
    return summary, plot
