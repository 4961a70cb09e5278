"""PNG figures without a display: matplotlib's object API on the Agg canvas (no pyplot state), rendered
in memory and written atomically, so a plot is never left half-written on Drive."""

from __future__ import annotations

import io
from pathlib import Path

from duokit.io import atomic_write_bytes


def new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(figure)
    return figure


def save_png(figure, path: Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    return atomic_write_bytes(path, buffer.getvalue())
