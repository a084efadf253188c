"""Video-level metrics: top-k accuracy, per-class accuracy and the confusion matrix (single-label,
Kinetics), mean average precision (multi-label, Charades), and a picture of the confusion matrix.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

__all__ = ["topk_accuracy", "confusion_matrix", "per_class_accuracy", "average_precision", "mean_average_precision",
           "classification_report", "plot_confusion"]


def _check(scores: torch.Tensor, targets: torch.Tensor) -> None:
    if scores.dim() != 2 or targets.shape[0] != scores.shape[0]:
        raise ValueError(f"scores, targets: expected (N, classes) and N targets, got {tuple(scores.shape)} and "
                         f"{tuple(targets.shape)}")


def topk_accuracy(scores: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Fraction of rows whose target is among the k highest scores (k clipped to the classes)."""
    _check(scores, targets)
    if scores.shape[0] == 0:
        return {k: float("nan") for k in ks}
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hits = top == targets.view(-1, 1)
    return {k: hits[:, :k].any(1).float().mean().item() for k in ks}


def confusion_matrix(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(classes, classes) counts: row = true class, column = predicted class."""
    _check(scores, targets)
    classes = scores.shape[1]
    flat = targets.long() * classes + scores.argmax(1)
    return torch.bincount(flat, minlength=classes * classes).view(classes, classes)


def per_class_accuracy(matrix: torch.Tensor) -> torch.Tensor:
    """Recall of each class from a confusion matrix; NaN for a class with no sample."""
    totals = matrix.sum(1).double()
    return torch.where(totals > 0, matrix.diagonal().double() / totals.clamp(min=1), torch.nan)


def average_precision(scores: torch.Tensor, positives: torch.Tensor) -> float:
    """AP of one class: the mean, over positive samples, of the precision at the rank of each
    (ties broken by sample order, as a stable sort would). NaN without positives."""
    positives = positives.bool()
    if not positives.any():
        return float("nan")
    order = torch.sort(scores, descending=True, stable=True).indices
    hits = positives[order].double()
    precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1, dtype=torch.float64)
    return (precision * hits).sum().item() / hits.sum().item()


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """mAP over the classes that have at least one positive (Charades' protocol)."""
    _check(scores, targets)
    aps = [average_precision(scores[:, c], targets[:, c]) for c in range(scores.shape[1])]
    aps = [ap for ap in aps if ap == ap]
    return sum(aps) / len(aps) if aps else float("nan")


def classification_report(scores: torch.Tensor, targets: torch.Tensor, multilabel: bool = False) -> dict:
    """The metrics of a video-level evaluation as plain numbers and lists."""
    if multilabel:
        return {"mAP": mean_average_precision(scores, targets), "videos": int(scores.shape[0])}
    top = topk_accuracy(scores, targets, (1, 5))
    matrix = confusion_matrix(scores, targets)
    per_class = per_class_accuracy(matrix)
    report = {"top1": top[1]} if scores.shape[1] <= 5 else {"top1": top[1], "top5": top[5]}  # top-5 of <= 5 is 1
    return {**report, "mean_class_accuracy": float(per_class.nanmean()),
            "per_class_accuracy": [None if v != v else float(v) for v in per_class.tolist()],
            "confusion": matrix.tolist(), "videos": int(scores.shape[0])}


def plot_confusion(matrix, classes: Sequence[str], path: str | os.PathLike, title: str = "") -> None:
    """Write the confusion matrix, rows normalised, as a picture (PNG; the ``plot`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("the confusion-matrix picture needs matplotlib: pip install 'nonlocalnet[plot]'") from None
    matrix = torch.as_tensor(matrix, dtype=torch.float64)
    rows = matrix / matrix.sum(1, keepdim=True).clamp(min=1)
    n = len(classes)
    size = min(4 + 0.25 * n, 40)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(rows.numpy(), cmap="Blues", vmin=0, vmax=1)
    if n <= 40:
        ax.set_xticks(range(n), classes, rotation=90)
        ax.set_yticks(range(n), classes)
        if n <= 12:
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, f"{int(matrix[i, j])}", ha="center", va="center",
                            color="white" if rows[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=100)
    plt.close(fig)
