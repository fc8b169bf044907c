"""Classification metrics, per-class reports and plots (scikit-learn + matplotlib)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str], prefix: str) -> tuple[dict, dict]:
    """Headline metrics (`<prefix>/top1`, `<prefix>/f1_macro`) and sklearn's per-class report
    (precision, recall, F1, support per class)."""
    from sklearn.metrics import classification_report, f1_score

    labels = list(range(len(classes)))
    report = classification_report(y_true, y_pred, labels=labels, target_names=classes, output_dict=True, zero_division=0)
    metrics = {f"{prefix}/top1": float(np.mean(y_true == y_pred)),
               f"{prefix}/f1_macro": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0))}
    return metrics, report


def confusion_plot(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(classes) + 2),) * 2)
    ConfusionMatrixDisplay.from_predictions(y_true, y_pred, labels=list(range(len(classes))), display_labels=classes,
                                            ax=ax, colorbar=False, include_values=len(classes) <= 20,
                                            xticks_rotation="vertical")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def curve_plot(steps: list[int], values: list[float], path: Path, ylabel: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, values)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def results_table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table; numbers with 4 decimals."""
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
