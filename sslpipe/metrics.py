"""Classification metrics and sklearn's per-class report, as every classifier stage logs them."""

from __future__ import annotations

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
