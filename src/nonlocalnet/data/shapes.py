"""The built-in detection set of ``nonlocalnet detect train``: COCO-format files (PNG images, an
instances JSON per split) with squares, discs and triangles, each annotated with its box, its
polygon mask and, for triangles, three keypoints (``top``, ``left``, ``right``).

Objects have random sizes, positions and colours over a noisy background and do not overlap, so
every polygon is exactly the drawn region. Colour says nothing about the category: only shape does.
The triangles' keypoint names make the horizontal flip swap ``left`` and ``right``, as COCO's
person keypoints do.

:func:`make_shapes` writes the set once per parameters (``manifest.json``):
``images/{train,val}/NNNNN.png`` and ``annotations/{train,val}.json``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .synthetic import build_once

__all__ = ["CATEGORIES", "ShapesSpec", "make_shapes", "shape_paths"]

CATEGORIES = [{"id": 1, "name": "square", "supercategory": "shape"},
              {"id": 2, "name": "disc", "supercategory": "shape"},
              {"id": 3, "name": "triangle", "supercategory": "shape", "keypoints": ["top", "left", "right"],
               "skeleton": [[1, 2], [2, 3], [3, 1]]}]
_VERSION = 1


@dataclass(frozen=True)
class ShapesSpec:
    train: int = 64  # images
    val: int = 16
    height: int = 96
    width: int = 128
    seed: int = 0
    max_objects: int = 3

    def check(self) -> None:
        if self.train < 1 or self.val < 1:
            raise ValueError(f"train / val: expected positive image counts, got {self.train} / {self.val}")
        if min(self.height, self.width) < 32:
            raise ValueError(f"height / width: expected at least 32 pixels, got {self.height} x {self.width}")
        if self.max_objects < 1:
            raise ValueError(f"max_objects: expected a positive int, got {self.max_objects}")


def _outline(category: int, x: float, y: float, size: float, rng) -> tuple[list[tuple[float, float]], list]:
    """The polygon of a shape in the box (x, y, size, size), and its keypoints (triangles)."""
    if category == 1:
        return [(x, y), (x + size, y), (x + size, y + size), (x, y + size)], []
    if category == 2:
        r = size / 2
        return [(x + r + r * math.cos(2 * math.pi * k / 24), y + r + r * math.sin(2 * math.pi * k / 24))
                for k in range(24)], []
    top = (x + size * rng.uniform(0.3, 0.7), y)
    left, right = (x, y + size), (x + size, y + size)
    return [top, right, left], [top, left, right]


def render_image(rng, height: int, width: int, max_objects: int) -> tuple[np.ndarray, list[dict]]:
    """One image and its annotations (without ids)."""
    from PIL import Image, ImageDraw

    background = rng.integers(30, 200)
    pixels = np.clip(background + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    boxes, annotations = [], []
    low, high = 0.2 * min(height, width), 0.45 * min(height, width)
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(20):  # a free place, objects 2 pixels apart
            size = float(rng.uniform(low, high))
            x, y = float(rng.uniform(1, width - size - 2)), float(rng.uniform(1, height - size - 2))
            if all(x + size + 2 < bx or bx + bs + 2 < x or y + size + 2 < by or by + bs + 2 < y
                   for bx, by, bs in boxes):
                break
        else:
            continue
        category = int(rng.integers(1, 4))
        polygon, keypoints = _outline(category, x, y, size, rng)
        colour = tuple(int(c) for c in (background + rng.choice([-1, 1]) * rng.integers(60, 110) + rng.integers(
            -40, 40, 3)).clip(0, 255))
        draw.polygon(polygon, fill=colour)
        mask = Image.new("L", (width, height))
        ImageDraw.Draw(mask).polygon(polygon, fill=1)
        rows, cols = np.nonzero(np.asarray(mask))
        boxes.append((x, y, size))
        annotation = {"category_id": category, "iscrowd": 0, "area": float(len(rows)),
                      "bbox": [float(cols.min()), float(rows.min()), float(cols.max() - cols.min() + 1),
                               float(rows.max() - rows.min() + 1)],
                      "segmentation": [[round(v, 2) for point in polygon for v in point]]}
        if keypoints:
            annotation["keypoints"] = [v for px, py in keypoints for v in (round(px, 2), round(py, 2), 2)]
            annotation["num_keypoints"] = 3
        annotations.append(annotation)
    return np.asarray(image), annotations


def shape_paths(root: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """The image folder and annotation file of a split of a set written by :func:`make_shapes`."""
    return Path(root) / "images" / split, Path(root) / "annotations" / f"{split}.json"


def make_shapes(root: str | os.PathLike, spec: ShapesSpec | None = None, *, log=print) -> Path:
    """Write the set under ``root`` unless the same one is already there; returns ``root``."""
    from PIL import Image

    spec = spec or ShapesSpec()
    spec.check()

    def build(work: Path) -> None:
        rng = np.random.default_rng(spec.seed)
        annotation_id = 0
        for split, count in (("train", spec.train), ("val", spec.val)):
            images, annotations = [], []
            folder, file = shape_paths(work, split)
            folder.mkdir(parents=True)
            file.parent.mkdir(exist_ok=True)
            for i in range(count):
                pixels, found = render_image(rng, spec.height, spec.width, spec.max_objects)
                Image.fromarray(pixels).save(folder / f"{i:05d}.png")
                images.append({"id": i + 1, "file_name": f"{i:05d}.png", "height": spec.height, "width": spec.width})
                for annotation in found:
                    annotation_id += 1
                    annotations.append({"id": annotation_id, "image_id": i + 1, **annotation})
            file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))

    return build_once(root, {"version": _VERSION, **asdict(spec)}, build, log,
                      f"the shapes set ({spec.train} train + {spec.val} val images)", kind="shapes")
