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


# ---------------------------------------------------------------------------------------------
# Ablations (`duokit ablate`, notebook 04): one row per cell, with the budget asked and achieved.

ABLATION_COLUMNS = ("row", "cell", "method", "budget_asked", "budget_achieved_kv", "budget_achieved_tokens",
                    "overall", "overall_ci_low", "overall_ci_high", "overall_1try", "ret", "ord", "cnt", "kv_bytes", "kv_bytes_peak",
                    "peak_growth_bytes_median", "prefill_s", "decode_s_per_token", "video_tokens",
                    "visual_token_layers", "prefill_flops", "n_samples", "n_errors", "frames", "fps_first_video",
                    "pixels_per_frame", "input_video_tokens")
ABLATION_TABLE = (("row", "row"), ("cell", "cell"), ("asked", "budget_asked"), ("KV ach.", "budget_achieved_kv"),
                  ("tok ach.", "budget_achieved_tokens"), ("4-try %", "overall"), ("95% CI", "overall_ci"),
                  ("1-try %", "overall_1try"),
                  ("ret %", "ret"), ("ord %", "ord"), ("cnt %", "cnt"), ("KV peak MiB", "kv_bytes_peak"),
                  ("prefill s", "prefill_s"), ("video tok", "video_tokens"), ("frames", "frames"),
                  ("errors", "n_errors"))
ABLATION_PLOTS = {"accuracy_kv": "accuracy vs KV memory (Pareto front)", "accuracy_prefill": "accuracy vs prefill time",
                  "families": "accuracy per task family", "accuracy_budget": "accuracy vs budget per method"}


def wilson_interval(share: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of a proportion `share` measured on `n` samples: the
    sampling noise of an accuracy (Wilson, JASA 1927; good at small n and near 0 or 1)."""
    if n <= 0:
        return float("nan"), float("nan")
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((share * (1 - share) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def ablation_row(eval_dir: str | Path, cell: Any, achieved: dict[str, float], preprocessing: dict) -> dict:
    """A cell's row: `eval_row`'s numbers plus the budget asked and achieved, the prefill FLOPs, the
    visual-token-layers and the cell's preprocessing record."""
    from duokit.data.vnbench import SUBTASKS

    cost = read_json(Path(eval_dir) / "summary.json")["cost"]
    row = eval_row(eval_dir, f"{cell.row}/{cell.name}", settings=read_json(Path(eval_dir) / "config.json")["method"])
    flat = {
        "row": cell.row, "cell": cell.name, "method": cell.method, "budget_asked": cell.budget,
        "budget_achieved_kv": achieved["kv"], "budget_achieved_tokens": achieved["tokens"],
        **dict(zip(("overall_ci_low", "overall_ci_high"), wilson_interval(row["overall"], row["n_samples"]))),
        **{family: row["families"].get(family) for family in ("ret", "ord", "cnt")},
        **{f"subtask_{name}": row["subtasks"].get(name) for name in SUBTASKS},
        "kv_bytes_peak": cost["kv_bytes_peak"], "video_tokens": cost["video_tokens"],
        "input_video_tokens": cost["input_video_tokens"], "visual_token_layers": cost["visual_token_layers"],
        "prefill_flops": cost.get("attention_flops", 0) + cost.get("mlp_flops", 0),
        **preprocessing,
    }
    return {**row, **flat, "method": cell.method, "preprocessing": preprocessing}


def _cell_text(value: Any, key: str) -> str:
    if value is None:
        return "-"
    if key == "overall_ci":
        return f"{100 * value[0]:.0f}-{100 * value[1]:.0f}"
    if key in ("overall", "overall_1try", "ret", "ord", "cnt"):
        return _percent(value)
    if key.startswith("budget"):
        return f"{value:.2f}"
    if key in ("kv_bytes", "kv_bytes_peak"):
        return f"{value / MIB:.4f}"
    if key == "prefill_s":
        return f"{value:.4f}"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def _value(row: dict, key: str) -> Any:
    return (row["overall_ci_low"], row["overall_ci_high"]) if key == "overall_ci" else row.get(key)


def ablation_text_table(rows: list[dict]) -> str:
    lines = [[title for title, _ in ABLATION_TABLE]] + [[_cell_text(_value(row, key), key) for _, key in ABLATION_TABLE]
                                                         for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(ABLATION_TABLE))]
    return "\n".join("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(line, widths))) for line in lines)


def ablation_csv(rows: list[dict]) -> str:
    import csv
    import io

    columns = list(ABLATION_COLUMNS) + sorted({k for row in rows for k in row if k.startswith("subtask_")})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def ablation_markdown(title: str, intro: str, rows: list[dict]) -> str:
    header = "| " + " | ".join(title for title, _ in ABLATION_TABLE) + " |\n|" + "---|" * len(ABLATION_TABLE) + "\n"
    body = "".join("| " + " | ".join(_cell_text(_value(row, key), key) for _, key in ABLATION_TABLE) + " |\n"
                   for row in rows)
    plots = "".join(f"![{alt}](plots/{name}.png)\n" for name, alt in ABLATION_PLOTS.items())
    return f"# {title}\n\n{intro}\n\n{header}{body}\n{plots}"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats (less or equal x and more or equal y, one strictly)."""
    return [i for i, (x, y) in enumerate(points)
            if not any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for x2, y2 in points)]


MARKERS = "osD^vP*X<>"


def _colors(rows: list[dict]) -> dict[str, tuple[str, str]]:
    """(colour, marker) of each row: cells that land on one point stay distinguishable."""
    names = dict.fromkeys(row["row"] for row in rows)
    # The 11th row reuses the first colour with the next marker: unique pairs for up to 100 rows.
    return {name: (f"C{k % 10}", MARKERS[(k + k // 10) % len(MARKERS)]) for k, name in enumerate(names)}


def _scatter(rows: list[dict], key: str, scale: float, xlabel: str, title: str, path: Path, front: bool) -> Path:
    figure = new_figure(6.5, 4)
    axes = figure.add_subplot()
    colors = _colors(rows)
    points = [(row[key] * scale, 100 * row["overall"]) for row in rows]
    for name, (color, marker) in colors.items():
        mine = [p for p, row in zip(points, rows) if row["row"] == name]
        axes.scatter([x for x, _ in mine], [y for _, y in mine], color=color, marker=marker, label=name, alpha=0.8)
    if front:
        best = sorted(points[i] for i in pareto_front(points))
        axes.plot([x for x, _ in best], [y for _, y in best], "k--", linewidth=1, label="Pareto front")
    axes.set_xlabel(xlabel)
    axes.set_ylabel("Overall 4-try accuracy %")
    axes.set_ylim(0, 100)
    axes.legend(fontsize=7, loc="best")
    axes.set_title(title)
    return save_png(figure, path)


def plot_ablation_kv(rows: list[dict], path: Path) -> Path:
    return _scatter(rows, "kv_bytes_peak", 1 / MIB, "KV cache at peak, MiB per sample", "Accuracy vs KV memory",
                    path, front=True)


def plot_ablation_prefill(rows: list[dict], path: Path) -> Path:
    return _scatter(rows, "prefill_s", 1.0, "prefill s per sample", "Accuracy vs prefill time", path, front=True)


def plot_ablation_families(rows: list[dict], path: Path) -> Path:
    import numpy as np

    figure = new_figure(max(6.0, 0.45 * len(rows) + 2), 3.5)
    axes = figure.add_subplot()
    x, width = np.arange(len(rows)), 0.27
    for k, (family, label) in enumerate((("ret", "retrieval"), ("ord", "ordering"), ("cnt", "counting"))):
        axes.bar(x + (k - 1) * width, [100 * (row.get(family) or 0.0) for row in rows], width, label=label)
    axes.set_xticks(x, [row["label"] for row in rows], rotation=60, ha="right", fontsize=7)
    axes.set_ylabel("4-try accuracy %")
    axes.set_ylim(0, 100)
    axes.legend(fontsize=7)
    axes.set_title("Accuracy per task family")
    return save_png(figure, path)


def plot_ablation_budget(rows: list[dict], path: Path) -> Path:
    figure = new_figure(6.5, 4)
    axes = figure.add_subplot()
    for name, (color, marker) in _colors(rows).items():
        mine = [row for row in rows if row["row"] == name]
        axes.scatter([r["budget_achieved_kv"] for r in mine], [100 * r["overall"] for r in mine], color=color,
                     marker=marker, s=12, alpha=0.5)
        # Draws of a random control share a budget: the line joins their means.
        budgets = sorted({r["budget_asked"] for r in mine}, key=lambda b: -1.0 if b is None else b)
        means = [[r for r in mine if r["budget_asked"] == b] for b in budgets]
        points = sorted((sum(r["budget_achieved_kv"] for r in group) / len(group),
                         sum(100 * r["overall"] for r in group) / len(group)) for group in means)
        axes.plot([x for x, _ in points], [y for _, y in points], marker=marker, color=color, label=name, alpha=0.8)
    axes.set_xlabel("achieved budget (retained visual-KV fraction, measured)")
    axes.set_ylabel("Overall 4-try accuracy %")
    axes.set_ylim(0, 100)
    axes.legend(fontsize=7, loc="best")
    axes.set_title("Accuracy vs budget per method (mean over draws)")
    return save_png(figure, path)


ABLATION_PLOTTERS = {"accuracy_kv": plot_ablation_kv, "accuracy_prefill": plot_ablation_prefill,
                     "families": plot_ablation_families, "accuracy_budget": plot_ablation_budget}


def write_ablation_report(folder: str | Path, title: str, intro: str, rows: list[dict],
                          extra: dict[str, Any] | None = None) -> dict[str, Path]:
    """FOLDER/results.csv (one line per cell), results.json ({**extra, "cells": rows}), results.md and
    plots/*.png; returns their paths by name."""
    if not rows:
        raise ValueError("an ablation report needs at least one finished cell")
    folder = Path(folder)
    paths = {"results.csv": atomic_write_text(folder / "results.csv", ablation_csv(rows)),
             "results.json": atomic_write_json(folder / "results.json", {**(extra or {}), "cells": rows}),
             "results.md": atomic_write_text(folder / "results.md", ablation_markdown(title, intro, rows))}
    for name, plot in ABLATION_PLOTTERS.items():
        paths[name] = plot(rows, folder / "plots" / f"{name}.png")
    return paths
