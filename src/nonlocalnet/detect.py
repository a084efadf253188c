"""Detection evaluation with pycocotools' COCOeval (the ``detection`` extra): box, mask and keypoint
AP, AP50, AP75 and AP by object size, for torchvision-style detection models on a
:class:`~nonlocalnet.data.coco.CocoDetection` set.

Predictions are turned into COCO results: boxes as [x, y, width, height], masks thresholded at 0.5
and RLE-encoded, keypoints as flat (x, y, score) lists, labels mapped back to the file's category
ids. The ground truth is the annotation file itself, restricted to the images the data set kept.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import torch

from .data.coco import CocoDetection

__all__ = ["STAT_NAMES", "to_coco_results", "coco_evaluate"]

STAT_NAMES = {
    "bbox": ("AP", "AP50", "AP75", "APs", "APm", "APl"),
    "segm": ("AP", "AP50", "AP75", "APs", "APm", "APl"),
    "keypoints": ("AP", "AP50", "AP75", "APm", "APl"),
}


def _pycocotools():
    try:
        from pycocotools import mask
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:  # pragma: no cover - the message is the test
        raise ImportError("COCO evaluation needs pycocotools: pip install 'nonlocalnet[detection]'") from None
    return COCO, COCOeval, mask


def to_coco_results(image_id: int, output: dict, category_ids, iou_types) -> dict[str, list[dict]]:
    """One image's model output -> COCO result entries per IoU type."""
    _, _, mask_api = _pycocotools()
    boxes = output["boxes"].detach().cpu().float()
    scores = output["scores"].detach().cpu().float().tolist()
    labels = [int(label) for label in output["labels"].cpu()]
    bad = [label for label in labels if not 1 <= label <= len(category_ids)]
    if bad:
        raise ValueError(f"labels: the model predicts label {bad[0]}, but the data set has labels 1..{len(category_ids)}"
                         f" (build the model with num_classes={len(category_ids) + 1})")
    categories = [category_ids[label - 1] for label in labels]
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist() if len(boxes) else []
    results = {t: [] for t in iou_types}
    for k, (box, score, category) in enumerate(zip(xywh, scores, categories)):
        entry = {"image_id": int(image_id), "category_id": int(category), "score": float(score)}
        if "bbox" in results:  # masks and keypoints go without their box, so that COCOeval sizes them by
            results["bbox"].append({**entry, "bbox": box})  # the mask's area and the keypoints' extent
        if "segm" in results:
            binary = (output["masks"][k, 0] > 0.5).cpu().numpy().astype(np.uint8)
            rle = mask_api.encode(np.asfortranarray(binary))
            rle["counts"] = rle["counts"].decode("ascii")
            results["segm"].append({**entry, "segmentation": rle})
        if "keypoints" in results:
            points = output["keypoints"][k].detach().cpu().float()
            flat = torch.cat([points[:, :2], output["keypoints_scores"][k].detach().cpu().float().unsqueeze(1)], 1)
            results["keypoints"].append({**entry, "keypoints": flat.flatten().tolist()})
    return results


def _ground_truth(COCO, path):
    """The annotation file as COCOeval's ground truth, with the fields it needs and a hand-made
    file may lack: ``area`` (the box's), ``iscrowd`` (0) and ``num_keypoints`` (the visible ones)."""
    data = json.loads(open(path).read())
    for ann in data["annotations"]:
        ann.setdefault("iscrowd", 0)
        if "area" not in ann and isinstance(ann.get("bbox"), list) and len(ann["bbox"]) == 4:
            ann["area"] = float(ann["bbox"][2] * ann["bbox"][3])
        if "num_keypoints" not in ann:
            ann["num_keypoints"] = sum(1 for v in ann.get("keypoints", [])[2::3] if v > 0)
        if "keypoints" not in ann:  # ignored by the keypoint evaluation (num_keypoints 0)
            ann["keypoints"] = [0] * (3 * max((len(c.get("keypoints", [])) for c in data["categories"]), default=0))
    truth = COCO()
    truth.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        truth.createIndex()
    return truth


def _keypoint_params(params, truth) -> None:
    """Score only the categories with keypoints; COCO's 17 person keypoints keep COCOeval's
    per-keypoint sigmas, any other set gets their mean for each keypoint."""
    with_points = [c for c in truth.dataset["categories"] if c.get("keypoints")]
    if not with_points:
        raise ValueError("iou_types: 'keypoints' needs a category with keypoint names in the annotation file")
    params.catIds = sorted(c["id"] for c in with_points)
    count = max(len(c["keypoints"]) for c in with_points)
    if count != len(params.kpt_oks_sigmas):
        params.kpt_oks_sigmas = np.full(count, float(np.mean(params.kpt_oks_sigmas)))


@torch.no_grad()
def coco_evaluate(model, dataset: CocoDetection, iou_types=("bbox", "segm"), *, device="cpu", batch_size: int = 2,
                  predict=None) -> dict[str, dict[str, float]]:
    """Run ``model`` (or ``predict(images) -> outputs``) over ``dataset`` and score it with
    COCOeval. Returns ``{iou_type: {"AP": ..., "AP50": ..., ...}}`` (fractions; -1 where COCOeval
    has nothing to score)."""
    COCO, COCOeval, _ = _pycocotools()
    bad = [t for t in iou_types if t not in STAT_NAMES]
    if bad:
        raise ValueError(f"iou_types: expected some of {tuple(STAT_NAMES)}, got {bad}")
    if predict is None:
        model.eval().to(device)

        def predict(images):
            return model([image.to(device) for image in images])

    results = {t: [] for t in iou_types}
    image_ids = []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        outputs = predict([image for image, _ in items])
        for (_, target), output in zip(items, outputs):
            image_ids.append(int(target["image_id"]))
            for t, entries in to_coco_results(target["image_id"], output, dataset.category_ids, iou_types).items():
                results[t].extend(entries)
    truth = _ground_truth(COCO, dataset.annotation_file)
    report = {}
    for t in iou_types:
        if not results[t]:  # nothing detected: nothing for COCOeval to score
            report[t] = {name: -1.0 for name in STAT_NAMES[t]}
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            found = truth.loadRes(results[t])
            evaluation = COCOeval(truth, found, t)
            evaluation.params.imgIds = sorted(image_ids)
            evaluation.params.catIds = list(dataset.category_ids)  # those the data set (and model) has
            if t == "keypoints":
                _keypoint_params(evaluation.params, truth)
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        report[t] = {name: float(v) for name, v in zip(STAT_NAMES[t], evaluation.stats)}
    return report
