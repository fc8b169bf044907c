"""Figures a run saves (matplotlib, headless): `pyplot()` to draw, `save_figure()` to write one.
Loss and learning-rate curves and confusion matrices are drawn here; visualize's embedding
scatter and segment's sample masks draw their own and save them through `save_figure`."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display on cluster nodes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Lay `fig` out, write it to `path` (PNG, 100 dpi) and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
    return Path(path)


def confusion_plot(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str], path: Path, title: str) -> Path:
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = pyplot().subplots(figsize=(max(4, 0.5 * len(classes) + 2),) * 2)
    ConfusionMatrixDisplay.from_predictions(y_true, y_pred, labels=list(range(len(classes))), display_labels=classes,
                                            ax=ax, colorbar=False, include_values=len(classes) <= 20,
                                            xticks_rotation="vertical")
    ax.set_title(title)
    return save_figure(fig, path)


def curve_plot(steps: list[int], values: list[float], path: Path, ylabel: str) -> Path:
    fig, ax = pyplot().subplots(figsize=(6, 4))
    ax.plot(steps, values)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)
