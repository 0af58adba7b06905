"""Metric curves of several runs as one PNG: a subplot per metric, a line per run."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Literal

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

from experiments.run_history import STEP_KEY, TIME_KEY, History, is_number  # noqa: E402

# (divisor, unit) for the time axis, picked from the longest run.
_TIME_UNITS = ((3600.0, "h"), (60.0, "min"), (1.0, "s"))


def plot_metrics(
    histories: dict[str, History],
    metrics: list[str],
    out_png: Path,
    x: Literal["step", "time"] = "step",
) -> Path:
    """Write the curves of ``metrics`` for each run to ``out_png``; x is the global step or
    the training time (``_elapsed``, continued over resumes). Returns ``out_png``."""
    if x not in ("step", "time"):
        raise ValueError(f"x must be 'step' or 'time', got {x!r}")
    if not metrics:
        raise ValueError("no metrics to plot")
    x_key = STEP_KEY if x == "step" else TIME_KEY
    scale, unit = _time_unit(histories) if x == "time" else (1.0, "")

    ncols = 1 if len(metrics) == 1 else 2
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.4 * ncols, 3.6 * nrows), squeeze=False)
    try:
        for ax, metric in zip(axes.flat, metrics):
            for run_id, history in histories.items():
                points = [(row[x_key] / scale, row[metric]) for row in history
                          if is_number(row.get(metric)) and is_number(row.get(x_key))]
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, label=run_id, marker="o" if len(points) <= 20 else None, markersize=3)
            ax.set_title(metric)
            ax.set_xlabel("global step" if x == "step" else f"training time ({unit})")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize="small")
        for ax in axes.flat[len(metrics):]:
            ax.set_visible(False)
        fig.tight_layout()
        return _save_atomically(fig, Path(out_png))
    finally:
        plt.close(fig)


def _time_unit(histories: dict[str, History]) -> tuple[float, str]:
    longest = max((row.get(TIME_KEY, 0.0) for h in histories.values() for row in h), default=0.0)
    return next((div, unit) for div, unit in _TIME_UNITS if longest >= 2 * div or div == 1.0)


def _save_atomically(fig: "plt.Figure", out_png: Path) -> Path:
    """Save beside the target and rename, so a crash never leaves half a PNG."""
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_png.parent, prefix=f".{out_png.stem}-", suffix=".png")
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        os.replace(tmp, out_png)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out_png
