"""Plots of a gate-training run: layers × KV-heads heatmap, gate histogram, loss curve (RUN/plots/).

Drawn with `duokit.plots` (Agg canvas, no display needed; each PNG written atomically).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from duokit.plots import new_figure, save_png


def plot_gates_heatmap(gates: np.ndarray, path: Path, title: str = "DuoAttention gates") -> Path:
    layers, heads = gates.shape
    figure = new_figure(max(3.0, 0.35 * heads + 2), max(3.0, 0.22 * layers + 1.5))
    axes = figure.add_subplot()
    image = axes.imshow(gates, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    axes.set_xlabel("KV head")
    axes.set_ylabel("layer")
    axes.set_xticks(range(0, heads, max(1, heads // 16)))
    axes.set_yticks(range(0, layers, max(1, layers // 16)))
    axes.set_title(title)
    figure.colorbar(image, ax=axes, label="gate α (1 = retrieval)")
    return save_png(figure, path)


def plot_gate_histogram(gates: np.ndarray, path: Path) -> Path:
    figure = new_figure(4.5, 3.0)
    axes = figure.add_subplot()
    axes.hist(gates.ravel(), bins=np.linspace(0.0, 1.0, 21), color="tab:blue", edgecolor="white")
    axes.set_xlabel("gate α")
    axes.set_ylabel("KV heads")
    axes.set_title(f"{gates.size} gates, mean {gates.mean():.3f}")
    return save_png(figure, path)


def plot_loss(history: list[dict], path: Path) -> Path:
    figure = new_figure(5.5, 3.2)
    axes = figure.add_subplot()
    steps = [r["step"] for r in history]
    for key, label in (("loss", "total"), ("distill_loss", "distillation (MSE)"), ("reg_loss", "mean |gate|")):
        axes.plot(steps, [r[key] for r in history], label=label)
    axes.set_yscale("symlog", linthresh=1e-4)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.legend()
    return save_png(figure, path)


def plot_accuracy_sparsity(curves: dict[str, dict[float, float]], baseline: float, path: Path) -> Path:
    """Accuracy against the fraction of streaming heads, one line per pattern, the baseline dashed."""
    figure = new_figure(4.8, 3.2)
    axes = figure.add_subplot()
    for label, curve in curves.items():
        sparsities = sorted(curve)
        axes.plot(sparsities, [curve[s] for s in sparsities], marker="o", label=label)
    axes.axhline(baseline, color="gray", linestyle="--", label="dense baseline")
    axes.set_xlabel("streaming heads (fraction)")
    axes.set_ylabel("accuracy")
    axes.legend()
    return save_png(figure, path)


def write_plots(directory: str | Path, gates: np.ndarray, history: list[dict]) -> list[Path]:
    directory = Path(directory)
    paths = [plot_gates_heatmap(gates, directory / "gates_heatmap.png"),
             plot_gate_histogram(gates, directory / "gate_histogram.png")]
    if history:
        paths.append(plot_loss(history, directory / "loss.png"))
    return paths
