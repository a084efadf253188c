"""COCO-format detection data (instances and person keypoints) for the detection models, in the
target format of torchvision's detection models (the ``detection`` extra: pycocotools).

The annotation file is checked when it is read. A missing key or a value of the wrong kind is a
:class:`~nonlocalnet.data.datasets.AnnotationError` naming the file and the entry, e.g.
``instances.json: annotations[12] (id 7): bbox: expected [x, y, width, height], got [1, 2]``. Entries
a detector cannot learn from are skipped and counted in ``skipped``:
- images whose file does not exist;
- boxes with zero or negative width or height;
- crowd regions (``iscrowd: 1``), which COCOeval still handles;
- polygons of fewer than 3 points (an annotation left without any takes its box as its mask).
Categories map to labels 1..C in the order of their ids (0 is the background, as torchvision wants);
with ``keypoints=True`` only the categories that list keypoint names do (the others' annotations
are skipped and counted), since a keypoint model learns those alone.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .datasets import AnnotationError

__all__ = ["CocoDetection", "read_coco"]


def _mask_api():
    try:
        from pycocotools import mask
    except ImportError:  # pragma: no cover - the message is the test
        raise ImportError("COCO masks need pycocotools: pip install 'nonlocalnet[detection]'") from None
    return mask


def _need(path, where: str, entry: dict, key: str, kind, what: str):
    if not isinstance(entry, dict) or key not in entry:
        raise AnnotationError(path, None, f"{where}: missing key {key!r}")
    value = entry[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise AnnotationError(path, None, f"{where}: {key}: expected {what}, got {value!r}")
    return value


def read_coco(annotation_file, image_root, *, keypoints: bool = False) -> dict:
    """Parse and check a COCO annotation file. Returns the images kept (in file order), their
    annotations, the category ids (label k + 1 is ``category_ids[k]``) and the ``skipped`` counts."""
    path = Path(annotation_file)
    if not path.is_file():
        raise AnnotationError(path, None, "no such annotation file")
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise AnnotationError(path, None, f"not JSON ({err})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise AnnotationError(path, None, f"expected a top-level list {key!r}")
    categories, with_points, num_keypoints, keypoint_names = [], [], 0, []
    for i, cat in enumerate(data["categories"]):
        categories.append(_need(path, f"categories[{i}]", cat, "id", int, "an int"))
        if cat.get("keypoints"):
            names = _need(path, f"categories[{i}]", cat, "keypoints", list, "the keypoint names")
            if num_keypoints and len(names) != num_keypoints:
                raise AnnotationError(path, None, f"categories[{i}]: keypoints: expected {num_keypoints} names like "
                                                  f"the other keypoint categories, got {len(names)}")
            num_keypoints, keypoint_names = len(names), [str(n) for n in names]
            with_points.append(categories[-1])
    if keypoints and not num_keypoints:
        raise AnnotationError(path, None, "keypoints: no category lists its 'keypoints' names")
    # keypoint models learn only the categories with keypoints (label 1 is the person in COCO)
    category_ids = sorted(set(with_points if keypoints else categories))
    images, skipped = {}, Counter()
    for i, image in enumerate(data["images"]):
        where = f"images[{i}]"
        image_id = _need(path, where, image, "id", int, "an int")
        name = _need(path, f"{where} (id {image_id})", image, "file_name", str, "a file name")
        for key in ("width", "height"):
            if _need(path, f"{where} (id {image_id})", image, key, int, "a positive int") < 1:
                raise AnnotationError(path, None, f"{where} (id {image_id}): {key}: expected a positive int, "
                                                  f"got {image[key]}")
        if not (Path(image_root) / name).is_file():
            skipped["image file missing"] += 1
            continue
        images[image_id] = {**image, "path": str(Path(image_root) / name)}
    per_image = defaultdict(list)
    known, sizes = set(categories), {im["id"]: (im["height"], im["width"]) for im in images.values()}
    for i, ann in enumerate(data["annotations"]):
        where = f"annotations[{i}]"
        ann_id = _need(path, where, ann, "id", int, "an int")
        where = f"{where} (id {ann_id})"
        image_id = _need(path, where, ann, "image_id", int, "an int")
        category = _need(path, where, ann, "category_id", int, "an int")
        if category not in known:
            raise AnnotationError(path, None, f"{where}: category_id {category} is not among the categories")
        box = _need(path, where, ann, "bbox", list, "[x, y, width, height]")
        if len(box) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
            raise AnnotationError(path, None, f"{where}: bbox: expected [x, y, width, height], got {box}")
        if "segmentation" in ann:
            _check_segmentation(path, where, ann["segmentation"], sizes.get(image_id))
            if isinstance(ann["segmentation"], list):  # COCO has a few polygons of < 3 points: drop them
                kept = [p for p in ann["segmentation"] if len(p) >= 6 and len(p) % 2 == 0]
                if len(kept) < len(ann["segmentation"]):
                    skipped["degenerate polygon (fewer than 3 points)"] += len(ann["segmentation"]) - len(kept)
                    ann = {**ann, "segmentation": kept}
        if keypoints and "keypoints" in ann:
            points = _need(path, where, ann, "keypoints", list, "a flat list of x, y, visibility")
            if len(points) != 3 * num_keypoints:
                raise AnnotationError(path, None, f"{where}: keypoints: expected {3 * num_keypoints} values "
                                                  f"({num_keypoints} x, y, visibility), got {len(points)}")
        if image_id not in images:
            skipped["annotation of a skipped or unknown image"] += 1
            continue
        if category not in category_ids:
            skipped["annotation of a category without keypoints"] += 1
            continue
        if ann.get("iscrowd", 0):
            skipped["crowd region"] += 1
            continue
        if box[2] <= 0 or box[3] <= 0:
            skipped["box with zero or negative size"] += 1
            continue
        per_image[image_id].append(ann)
    return {"images": list(images.values()), "annotations": per_image, "category_ids": category_ids,
            "num_keypoints": num_keypoints, "keypoint_names": keypoint_names, "skipped": dict(skipped)}


def _check_segmentation(path, where: str, segmentation, size) -> None:
    """Polygons: lists of numbers (those of fewer than 3 points are dropped by the caller); RLE:
    ``size`` [height, width] and ``counts``."""
    if isinstance(segmentation, list):
        for k, polygon in enumerate(segmentation):
            if not isinstance(polygon, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                        for v in polygon):
                raise AnnotationError(path, None, f"{where}: segmentation[{k}]: expected a polygon, a list of "
                                                  f"x, y numbers, got {str(polygon)[:60]}")
    elif isinstance(segmentation, dict):
        if "counts" not in segmentation or not isinstance(segmentation.get("size"), list):
            raise AnnotationError(path, None, f"{where}: segmentation: expected RLE with 'size' and 'counts', "
                                              f"got keys {sorted(segmentation)}")
        if size is not None and list(segmentation["size"]) != list(size):
            raise AnnotationError(path, None, f"{where}: segmentation: RLE size {segmentation['size']} is not the "
                                              f"image's [height, width] {list(size)}")
    else:
        raise AnnotationError(path, None, f"{where}: segmentation: expected polygons or RLE, got "
                                          f"{type(segmentation).__name__}")


class CocoDetection(Dataset):
    """Images and targets for torchvision's detection models: float image (3, H, W) in [0, 1] and
    ``{"boxes" (N, 4) x1 y1 x2 y2, "labels" (N,), "masks" (N, H, W) uint8, "keypoints" (N, K, 3)
    (keypoints=True), "image_id", "area", "iscrowd"}``. Images without annotations are kept (they
    are negatives) unless ``drop_empty``."""

    def __init__(self, image_root, annotation_file, *, keypoints: bool = False, drop_empty: bool = False):
        parsed = read_coco(annotation_file, image_root, keypoints=keypoints)
        self.annotation_file, self.keypoints = os.fspath(annotation_file), keypoints
        self.category_ids, self.num_keypoints = parsed["category_ids"], parsed["num_keypoints"]
        self.keypoint_names = parsed["keypoint_names"]
        self.label_of = {cid: i + 1 for i, cid in enumerate(self.category_ids)}
        self.annotations = parsed["annotations"]
        self.images = [im for im in parsed["images"] if self.annotations.get(im["id"]) or not drop_empty]
        self.skipped = parsed["skipped"]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        from PIL import Image

        info = self.images[index]
        with Image.open(info["path"]) as image:
            array = np.asarray(image.convert("RGB"))
        height, width = array.shape[:2]
        anns = self.annotations.get(info["id"], [])
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=torch.float32).reshape(-1, 4)
        target = {
            "boxes": boxes,
            "labels": torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64),
            "masks": torch.from_numpy(np.stack([self._mask(a, height, width) for a in anns])
                                      if anns else np.zeros((0, height, width), np.uint8)),
            "image_id": info["id"],
            "area": torch.tensor([float(a.get("area", a["bbox"][2] * a["bbox"][3])) for a in anns]),
            "iscrowd": torch.zeros(len(anns), dtype=torch.int64),
        }
        if self.keypoints:  # an instance without keypoints gets invisible ones
            points = [a.get("keypoints") or [0] * (3 * self.num_keypoints) for a in anns]
            target["keypoints"] = torch.tensor(points, dtype=torch.float32).reshape(len(anns), self.num_keypoints, 3)
        image = torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255
        return image, target

    def _mask(self, ann: dict, height: int, width: int) -> np.ndarray:
        segmentation = ann.get("segmentation")
        if not segmentation:  # no mask: the box
            mask = np.zeros((height, width), np.uint8)
            x, y, w, h = (int(round(v)) for v in ann["bbox"])
            mask[max(y, 0) : y + h, max(x, 0) : x + w] = 1
            return mask
        api = _mask_api()
        if isinstance(segmentation, list):
            rles = api.frPyObjects(segmentation, height, width)
            rle = api.merge(rles)
        elif isinstance(segmentation.get("counts"), list):
            rle = api.frPyObjects(segmentation, height, width)
        else:
            rle = segmentation
        return api.decode(rle).astype(np.uint8)
