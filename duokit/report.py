"""Tables and plots of finished runs, shared by `duokit demo` and the notebooks (03's comparison, 01's
needle coverage), so every place reports the same numbers the same way.

A row is one `duokit eval` run directory read back (`eval_row`): its scores and costs as summary.json holds
them, plus a label and the share of streaming KV heads. Plots are PNGs written atomically (duokit.plots),
so a report on Drive is never half-written; notebooks display the files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from duokit.io import atomic_write_json, atomic_write_text, iter_jsonl, read_json
from duokit.plots import new_figure, save_png

MIB = 2**20
COLUMNS = ("method", "streaming %", "Overall 4-try %", "1-try %", "retrieval %", "ordering %", "counting %",
           "KV cache MiB", "peak +MiB", "prefill s", "decode ms/token", "errors")
PLOTS = {"accuracy_subtasks": "per sub-task", "accuracy_kv": "accuracy vs KV cache", "latency": "latency"}
# What the table's memory and latency columns mean, for a report's introduction.
COLUMNS_NOTE = ("Accuracy: VNBench 4-try circular (all 4 option orders right) and 1-try; KV cache: bytes held "
                "after the prefix (mean per sample); peak +: memory a sample added at its peak over what was in use "
                "at its start (median over samples; weights excluded; RSS on CPU, allocated memory on CUDA); "
                "latency: mean per sample; errors: samples that failed (counted wrong, listed in "
                "predictions.jsonl).")


def median_peak_growth(eval_dir: Path) -> float:
    """Median over samples of the memory a sample added at its peak. Not the run's max: the first sample
    of a process pays one-off allocations, which would favour whichever method runs later."""
    import numpy as np

    growth = [r["cost"]["peak_memory_growth_bytes"] for r in iter_jsonl(Path(eval_dir) / "predictions.jsonl")
              if r.get("cost")]
    return float(np.median(growth)) if growth else float("nan")


def eval_row(eval_dir: str | Path, label: str, streaming_heads: float = 0.0,
             settings: dict[str, Any] | None = None) -> dict:
    """One table row from a finished `duokit eval` run directory (its summary.json and predictions.jsonl)."""
    eval_dir = Path(eval_dir)
    summary_path = eval_dir / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{summary_path}: no summary; run (or resume) that evaluation to the end first")
    summary = read_json(summary_path)
    scores, cost = summary["scores"], summary["cost"]
    if not cost.get("n_samples"):
        raise ValueError(f"{summary_path}: no sample finished without an error ({cost.get('n_errors', 0)} failed); "
                         f"their errors are in {eval_dir / 'predictions.jsonl'}")
    return {
        "method": eval_dir.name, "label": label, "settings": settings or {}, "streaming_heads": streaming_heads,
        "overall": scores["overall"], "overall_1try": scores["overall_1try"], "families": scores["families"],
        "subtasks": {name: s["accuracy"] for name, s in scores["subtasks"].items()},
        "n_samples": scores["n_samples"], "n_unparsed": scores["n_unparsed"],
        "n_errors": cost["n_errors"],
        "kv_bytes": cost["kv_bytes"], "peak_memory_bytes": cost["peak_memory_bytes_max"],
        "peak_growth_bytes_median": median_peak_growth(eval_dir),
        "peak_memory_exact": cost["peak_memory_exact"], "prefill_s": cost["prefill_s"],
        "decode_s_per_token": cost["decode_s_per_token"], "prefix_tokens": cost["prefix_tokens"],
    }


def finished_runs(folder: str | Path) -> list[Path]:
    """Every eval run directory under `folder` (any depth) that has a summary.json, sorted."""
    return sorted(path.parent for path in Path(folder).rglob("summary.json") if (path.parent / "config.json").is_file())


def run_rows(eval_dirs: list[Path], labels: list[str] | None = None) -> list[dict]:
    """Rows of any finished eval runs; the streaming share is the run's own `sparsity` setting (0 without one)."""
    rows = []
    for k, eval_dir in enumerate(eval_dirs):
        method = read_json(Path(eval_dir) / "config.json").get("method", {})
        label = labels[k] if labels else Path(eval_dir).name
        rows.append(eval_row(eval_dir, label, float(method.get("sparsity", 0.0)), method))
    return rows


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def table_cells(row: dict) -> list[str]:
    families = row["families"]
    return [row["label"], f"{100 * row['streaming_heads']:.0f}", _percent(row["overall"]),
            _percent(row["overall_1try"]), *(_percent(families.get(f)) for f in ("ret", "ord", "cnt")),
            f"{row['kv_bytes'] / MIB:.4f}", f"{row['peak_growth_bytes_median'] / MIB:.2f}", f"{row['prefill_s']:.4f}",
            f"{1000 * row['decode_s_per_token']:.2f}", str(row["n_errors"])]


def text_table(rows: list[dict]) -> str:
    lines = [list(COLUMNS)] + [table_cells(row) for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(line, widths))) for line in lines)


def markdown(title: str, intro: str, rows: list[dict]) -> str:
    """A results.md: title, introduction, the table, and links to the plots `write_report` writes."""
    header = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    body = "".join("| " + " | ".join(table_cells(row)) + " |\n" for row in rows)
    plots = "".join(f"![{alt}](plots/{name}.png)\n" for name, alt in PLOTS.items())
    return f"# {title}\n\n{intro}\n\n{header}{body}\n{plots}"


def plot_subtasks(rows: list[dict], path: Path) -> Path:
    import numpy as np

    from duokit.data.vnbench import PAPER_LABELS, SUBTASKS

    figure = new_figure(9, 3.5)
    axes = figure.add_subplot()
    x, width = np.arange(len(SUBTASKS)), 0.8 / len(rows)
    for k, row in enumerate(rows):
        axes.bar(x + (k - (len(rows) - 1) / 2) * width, [100 * row["subtasks"].get(t, 0.0) for t in SUBTASKS],
                 width, label=row["label"])
    axes.set_xticks(x, [PAPER_LABELS[t] for t in SUBTASKS])
    axes.set_ylabel("4-try accuracy %")
    axes.set_ylim(0, 100)
    axes.legend()
    axes.set_title("Accuracy per sub-task")
    return save_png(figure, path)


def plot_accuracy_kv(rows: list[dict], path: Path) -> Path:
    figure = new_figure(5, 3.5)
    axes = figure.add_subplot()
    for row in rows:
        x, y = row["kv_bytes"] / MIB, 100 * row["overall"]
        axes.scatter([x], [y])
        axes.annotate(row["label"], (x, y), textcoords="offset points", xytext=(5, 5))
    axes.set_xlabel("KV cache MiB (per sample)")
    axes.set_ylabel("Overall 4-try accuracy %")
    axes.set_xlim(0, 1.3 * max(row["kv_bytes"] for row in rows) / MIB)  # room for the labels
    axes.set_ylim(0, 100)
    axes.set_title("Accuracy vs KV-cache memory")
    return save_png(figure, path)


def plot_latency(rows: list[dict], path: Path) -> Path:
    figure = new_figure(8, 3)
    labels = [row["label"] for row in rows]
    for k, (key, scale, unit) in enumerate((("prefill_s", 1.0, "prefill s"), ("decode_s_per_token", 1000.0,
                                                                              "decode ms/token"))):
        axes = figure.add_subplot(1, 2, k + 1)
        axes.bar(labels, [scale * row[key] for row in rows], color=[f"C{i}" for i in range(len(rows))])
        axes.set_ylabel(unit)
    figure.suptitle("Latency (mean per sample)")
    return save_png(figure, path)


PLOTTERS = {"accuracy_subtasks": plot_subtasks, "accuracy_kv": plot_accuracy_kv, "latency": plot_latency}


def write_report(folder: str | Path, title: str, intro: str, rows: list[dict],
                 extra: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write FOLDER/results.md, FOLDER/results.json ({**extra, "methods": rows}) and FOLDER/plots/*.png;
    returns their paths by name ("results.md", "results.json", then the plot names)."""
    if not rows:
        raise ValueError("a report needs at least one finished run")
    folder = Path(folder)
    paths = {"results.json": atomic_write_json(folder / "results.json", {**(extra or {}), "methods": rows}),
             "results.md": atomic_write_text(folder / "results.md", markdown(title, intro, rows))}
    for name, plot in PLOTTERS.items():
        paths[name] = plot(rows, folder / "plots" / f"{name}.png")
    return paths


def plot_coverage(budgets: list[int], shares: list[float], path: Path) -> Path:
    """Share of samples whose every needle a uniform sample of N frames shows, against N (01_data):
    an upper bound on any model's accuracy at that frame budget (docs/video.md)."""
    if len(budgets) != len(shares) or not budgets:
        raise ValueError(f"need one share per frame budget, got {len(budgets)} budgets and {len(shares)} shares")
    figure = new_figure(5, 3.5)
    axes = figure.add_subplot()
    axes.plot(budgets, shares, marker="o")
    axes.set_xscale("log", base=2)
    axes.set_xticks(budgets, [str(b) for b in budgets])
    axes.set_xlabel("frames sampled")
    axes.set_ylabel("samples with every needle seen")
    axes.set_ylim(0, 1.05)
    axes.set_title("Needle coverage bounds accuracy")
    return save_png(figure, path)
