"""Metrics: top-k, confusion matrix, per-class accuracy, and mAP against a hand computation."""

import pytest
import torch

from nonlocalnet.metrics import (average_precision, classification_report, confusion_matrix, mean_average_precision,
                                 per_class_accuracy, plot_confusion, topk_accuracy)


def test_topk_and_confusion():
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.6, 0.35, 0.05]])
    targets = torch.tensor([1, 1, 2, 2])
    top = topk_accuracy(scores, targets, (1, 2))
    assert top == {1: 0.5, 2: 0.75}  # row 2: class 1 is second; row 4: class 2 is last
    matrix = confusion_matrix(scores, targets)
    assert matrix.tolist() == [[0, 0, 0], [1, 1, 0], [1, 0, 1]]
    per_class = per_class_accuracy(matrix)
    assert torch.isnan(per_class[0]) and per_class[1:].tolist() == [0.5, 0.5]
    report = classification_report(scores, targets)
    assert report["top1"] == 0.5 and report["mean_class_accuracy"] == 0.5 and "top5" not in report
    with pytest.raises(ValueError, match=r"scores, targets: expected \(N, classes\)"):
        topk_accuracy(scores, targets[:2])


def test_average_precision_by_hand():
    # ranked by score: +, -, +, -, +  -> precisions at the positives 1/1, 2/3, 3/5
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    positives = torch.tensor([1, 0, 1, 0, 1])
    assert average_precision(scores, positives) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    # shuffled rows give the same AP
    perm = torch.tensor([3, 0, 4, 1, 2])
    assert average_precision(scores[perm], positives[perm]) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)


def test_mean_average_precision_by_hand():
    scores = torch.tensor([[0.9, 0.1, 0.3], [0.2, 0.8, 0.4], [0.6, 0.7, 0.1], [0.1, 0.2, 0.9]])
    targets = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 1, 0], [1, 0, 0]])
    # class 0: ranks 0.9(+) 0.6(-) 0.2(-) 0.1(+) -> (1 + 2/4) / 2 = 0.75
    # class 1: ranks 0.8(+) 0.7(+) ... -> 1.0; class 2 has no positive and is left out
    assert mean_average_precision(scores, targets) == pytest.approx((0.75 + 1.0) / 2)
    assert classification_report(scores, targets, multilabel=True)["mAP"] == pytest.approx(0.875)


def test_confusion_picture(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "confusion.png"
    plot_confusion([[3, 1], [0, 4]], ["different", "same"], path, title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
