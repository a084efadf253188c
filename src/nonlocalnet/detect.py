"""Detection training and evaluation (the ``detection`` extra: torchvision and pycocotools):
``nonlocalnet detect train|evaluate``.

Training (:func:`fit`) follows the usual COCO recipe (Detectron's 1x schedule, since the paper gives
no COCO hyperparameters): SGD with momentum, weight decay 1e-4 off for biases, the step schedule
with a linear warm-up from 1/3, random horizontal flips (keypoints change sides by name: ``left_*``
and ``right_*`` swap), batches of images of one orientation (wider or taller), AMP on CUDA,
gradient clipping on request, an atomic checkpoint every N iterations and exact ``resume``, under
``torchrun`` with the global batch split as in the video engine (:class:`~nonlocalnet.engine.ClipSampler`).
Every random draw (the flips, the model's choice of training size and its sampled anchors and RoIs)
depends only on the seed, the iteration and the micro-batch, so one process with ``accumulate = k``
trains what k processes do and a resumed run repeats the uninterrupted one.
An image that cannot be read is skipped, counted and named in the log.

Evaluation (:func:`coco_evaluate`) is pycocotools' COCOeval: box, mask and keypoint AP, AP50, AP75
and AP by object size. Predictions are turned into COCO results: boxes as [x, y, width, height],
masks thresholded at 0.5 and RLE-encoded, keypoints as flat (x, y, score) lists, labels mapped
back to the file's category ids. The ground truth is the annotation file itself, restricted to the
images the data set kept. Under torchrun each process predicts a share of the images and rank 0
scores them all.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from . import distributed as dist
from .config import DetectConfig, DetectDataConfig, DetectModelConfig
from .data.coco import CocoDetection
from .data.datasets import Skipped
from ._json import dumps as json_dumps
from .engine import (ClipSampler, UnreadableDataError, _autocast, _Logger, _loader, _seed, _total, _unwrap,
                     _write_atomic, check_unreadable, generated_set, load_initial, load_model_state, param_groups,
                     read_run, run_job, save_run, start_run, train_loop)

__all__ = ["STAT_NAMES", "LOSSES", "to_coco_results", "coco_evaluate", "keypoint_flip_map", "hflip", "ImageItems",
           "collate_images", "build_detector", "build_datasets", "fit", "train_job", "summary_table",
           "load_detector", "evaluate_checkpoint"]

log = logging.getLogger("nonlocalnet")

STAT_NAMES = {
    "bbox": ("AP", "AP50", "AP75", "APs", "APm", "APl"),
    "segm": ("AP", "AP50", "AP75", "APs", "APm", "APl"),
    "keypoints": ("AP", "AP50", "AP75", "APm", "APl"),
}
IOU_TYPES = {"mask": ("bbox", "segm"), "keypoint": ("bbox", "keypoints")}
LOSSES = {"mask": ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"),
          "keypoint": ("loss_classifier", "loss_box_reg", "loss_keypoint", "loss_objectness", "loss_rpn_box_reg")}


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
                  workers: int = 0, amp: str = "none", predict=None) -> dict[str, dict[str, float]]:
    """Run ``model`` (or ``predict(images) -> outputs``) over ``dataset`` and score it with
    COCOeval. Returns ``{iou_type: {"AP": ..., "AP50": ..., ...}, "images": scored,
    "skipped_images": unreadable}`` (fractions; -1 where COCOeval has nothing to score). Under
    torchrun every rank predicts every world-size-th image and all get rank 0's report."""
    COCO, COCOeval, _ = _pycocotools()
    bad = [t for t in iou_types if t not in STAT_NAMES]
    if bad:
        raise ValueError(f"iou_types: expected some of {tuple(STAT_NAMES)}, got {bad}")
    device = torch.device(device)
    if predict is None:
        model.eval().to(device)

        def predict(images):
            with _autocast(amp, device):
                return model([image.to(device) for image in images])

    results = {t: [] for t in iou_types}
    image_ids, unreadable = [], []
    shard = range(dist.rank(), len(dataset), dist.world_size())
    for images, targets, skipped in _loader(ImageItems(dataset), batch_size, list(shard), workers,
                                            collate_fn=collate_images):
        unreadable += [f"{item.path}: {item.reason}" for item in skipped]
        if not images:
            continue
        for target, output in zip(targets, predict(images)):
            image_ids.append(int(target["image_id"]))
            for t, entries in to_coco_results(target["image_id"], output, dataset.category_ids, iou_types).items():
                results[t].extend(entries)
    shares = dist.gather_objects((results, image_ids, unreadable))
    report = None
    if dist.is_main():
        results = {t: [entry for share in shares for entry in share[0][t]] for t in iou_types}
        image_ids = sorted(i for share in shares for i in share[1])
        unreadable = [u for share in shares for u in share[2]]
        for line in unreadable:
            log.warning("evaluation: skipped image %s", line)
        report = _score(COCO, COCOeval, dataset, results, image_ids, iou_types)
        report.update(images=len(image_ids), skipped_images=len(unreadable))
    return dist.broadcast_object(report)


def _no_results(COCO, truth):
    """The result set of a model that detected nothing, which ``truth.loadRes([])`` refuses to
    build: the images and categories, no annotations. COCOeval scores it as it scores misses: 0
    where there is ground truth, -1 only where there is none (no large objects, say)."""
    found = COCO()
    found.dataset = {"images": copy.deepcopy(truth.dataset["images"]), "annotations": [],
                     "categories": copy.deepcopy(truth.dataset["categories"])}
    found.createIndex()
    return found


def _score(COCO, COCOeval, dataset, results, image_ids, iou_types) -> dict:
    truth = _ground_truth(COCO, dataset.annotation_file)
    report = {}
    for t in iou_types:
        with contextlib.redirect_stdout(io.StringIO()):
            found = truth.loadRes(results[t]) if results[t] else _no_results(COCO, truth)
            evaluation = COCOeval(truth, found, t)
            evaluation.params.imgIds = image_ids
            evaluation.params.catIds = list(dataset.category_ids)  # those the data set (and model) has
            if t == "keypoints":
                _keypoint_params(evaluation.params, truth)
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        report[t] = {name: float(v) for name, v in zip(STAT_NAMES[t], evaluation.stats)}
    return report


# ----------------------------------------------------------------------------------------------- data


def keypoint_flip_map(names: Sequence[str]) -> list[int]:
    """For each keypoint, the index of its mirror image under a horizontal flip: names with
    ``left`` and ``right`` swapped (COCO's ``left_eye`` <-> ``right_eye``); the others themselves."""
    swap = {"left": "right", "right": "left", "Left": "Right", "Right": "Left", "LEFT": "RIGHT", "RIGHT": "LEFT"}
    index = {name: i for i, name in enumerate(names)}
    return [index.get(re.sub("left|right|Left|Right|LEFT|RIGHT", lambda m: swap[m.group(0)], name), i)
            for i, name in enumerate(names)]


def hflip(image: torch.Tensor, target: dict, flip_map: Sequence[int] | None = None) -> tuple[torch.Tensor, dict]:
    """Mirror an image (C, H, W) and its target: boxes, masks and keypoints (x -> width - x, the
    continuous-coordinate convention of the boxes; visible points only), keypoints reordered by
    ``flip_map`` (:func:`keypoint_flip_map`)."""
    width = image.shape[-1]
    target = dict(target)
    boxes = target["boxes"]
    target["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    if "keypoints" in target:
        points = target["keypoints"].clone()
        points[..., 0] = torch.where(points[..., 2] > 0, width - points[..., 0], points[..., 0])
        target["keypoints"] = points[:, list(flip_map)] if flip_map is not None else points
    return image.flip(-1), target


class ImageItems(Dataset):
    """Items of a :class:`CocoDetection` keyed by index or by ``(index, seed)`` (what
    :class:`~nonlocalnet.engine.ClipSampler` yields): with ``flip`` the seed decides the
    horizontal flip, whatever the worker. An unreadable image is a :class:`Skipped`."""

    def __init__(self, coco: CocoDetection, flip: bool = False):
        self.coco, self.flip = coco, flip
        self.flip_map = keypoint_flip_map(coco.keypoint_names) if coco.keypoints else None

    def __len__(self) -> int:
        return len(self.coco)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        try:
            image, target = self.coco[index]
        except OSError as err:  # PIL: missing, truncated or not an image
            return Skipped(self.coco.images[index]["path"], f"{type(err).__name__}: {err}")
        if self.flip and seed is not None and np.random.default_rng(seed).random() < 0.5:
            image, target = hflip(image, target, self.flip_map)
        return image, target


def collate_images(items: list) -> tuple[list, list, list]:
    """(images, targets, skipped) lists: detection models take lists of differently sized images."""
    good = [item for item in items if not isinstance(item, Skipped)]
    return [i for i, _ in good], [t for _, t in good], [item for item in items if isinstance(item, Skipped)]


def _shapes(cfg: DetectDataConfig) -> Path:
    from .data.shapes import ShapesSpec

    spec = ShapesSpec(train=cfg.shapes_train, val=cfg.shapes_val, height=cfg.shapes_size[0],
                      width=cfg.shapes_size[1], seed=cfg.shapes_seed)
    return generated_set(cfg.root, "shapes", spec, (spec.train, spec.val, spec.height, spec.width, spec.seed))


def build_datasets(cfg: DetectDataConfig, task: str = "mask") -> tuple[CocoDetection, CocoDetection]:
    """Training and validation sets: the built-in shapes (written once) or COCO-format files."""
    keypoints = task == "keypoint"
    if cfg.dataset == "shapes":
        from .data.shapes import shape_paths

        root = _shapes(cfg)
        train_paths, val_paths = shape_paths(root, "train"), shape_paths(root, "val")
    elif cfg.dataset == "coco":
        for key in ("train_images", "train_annotations", "val_images", "val_annotations"):
            if not getattr(cfg, key):
                raise ValueError(f"data.{key}: dataset 'coco' needs it, got nothing")
        train_paths = (cfg.train_images, cfg.train_annotations)
        val_paths = (cfg.val_images, cfg.val_annotations)
    else:
        raise ValueError(f"data.dataset: expected 'shapes' or 'coco', got {cfg.dataset!r}")
    train = CocoDetection(*train_paths, keypoints=keypoints, drop_empty=cfg.drop_empty)
    val = CocoDetection(*val_paths, keypoints=keypoints)
    for split, ds in (("train", train), ("val", val)):
        if ds.skipped:
            log.warning("%s: skipped %s", split, ", ".join(f"{n} {why}" for why, n in sorted(ds.skipped.items())))
        if not len(ds):
            raise ValueError(f"data.{split}_annotations: no usable image in {ds.annotation_file}")
    if val.category_ids != train.category_ids:
        raise ValueError(f"data.val_annotations: categories {val.category_ids[:8]} differ from the training "
                         f"set's {train.category_ids[:8]}")
    return train, val


# ---------------------------------------------------------------------------------------------- model


def build_detector(cfg: DetectModelConfig, num_classes: int, num_keypoints: int = 0) -> nn.Module:
    """Mask R-CNN (``task: mask``) or Keypoint R-CNN (``task: keypoint``) with the configured
    non-local blocks; ``num_classes`` counts the background. ``cfg.weights`` (a detection checkpoint
    or weights file) initialises it: a baseline's weights fit a non-local model (its blocks keep
    their identity initialisation) and box predictors of another class count are left as built."""
    from .models.detection import keypoint_rcnn, mask_rcnn

    _check_detector_options(cfg.task, cfg.detector)
    kwargs = {"min_size": tuple(cfg.min_size), "max_size": cfg.max_size, "trainable_layers": cfg.trainable_layers,
              "backbone_weights": cfg.backbone_weights or None, "nonlocal_options": {"mode": cfg.nonlocal_mode},
              **cfg.detector}
    try:
        if cfg.task == "mask":
            model = mask_rcnn(cfg.depth, nonlocal_backbone=cfg.nonlocal_backbone, num_classes=num_classes, **kwargs)
        elif cfg.task == "keypoint":
            model = keypoint_rcnn(cfg.depth, nonlocal_head=cfg.nonlocal_head, nonlocal_backbone=cfg.nonlocal_backbone,
                                  num_classes=num_classes, num_keypoints=num_keypoints, **kwargs)
        else:
            raise ValueError(f"model.task: expected 'mask' or 'keypoint', got {cfg.task!r}")
    except TypeError as err:  # an unknown entry of model.detector
        raise ValueError(f"model.detector: {err}") from None
    if cfg.weights:
        load_initial(model, cfg.weights, heads=("predictor",), optional=("nonlocal_block",), name="detector")
    return model


def _check_detector_options(task: str, options) -> None:
    """torchvision passes unknown keyword arguments down to a transform that ignores them: name them."""
    import inspect

    from torchvision.models.detection import FasterRCNN, KeypointRCNN, MaskRCNN
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    known = set()
    for cls in (KeypointRCNN if task == "keypoint" else MaskRCNN, FasterRCNN, GeneralizedRCNNTransform):
        known |= {p.name for p in inspect.signature(cls.__init__).parameters.values()
                  if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD}
    known -= {"self", "backbone", "num_classes", "num_keypoints", "min_size", "max_size"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"model.detector: unknown option(s) {unknown} for torchvision's "
                         f"{'KeypointRCNN' if task == 'keypoint' else 'MaskRCNN'}")


# ---------------------------------------------------------------------------------------------- train


def _empty_target(task: str, num_keypoints: int, size: int = 64) -> dict:
    target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    if task == "keypoint":
        target["keypoints"] = torch.zeros(0, num_keypoints, 3)
    else:
        target["masks"] = torch.zeros(0, size, size, dtype=torch.uint8)
    return target


def _to(target: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in target.items()}


def fit(cfg: DetectConfig, out: str | os.PathLike, *, resume: bool = False, name: str = "") -> dict:
    """Train ``cfg`` into ``out`` (checkpoint.pt, metrics.jsonl, tensorboard/, config.yaml,
    result.json) and evaluate it with COCOeval on the validation set; returns the report."""
    out = Path(out)
    device = dist.setup()
    world, rank = dist.world_size(), dist.rank()
    task = cfg.model.task
    train_set, val_set = build_datasets(cfg.data, task)
    for split, ds in (("train", train_set), ("val", val_set)):
        missing = ds.skipped.get("image file missing", 0)
        check_unreadable(missing, missing + len(ds), cfg.data.max_unreadable, f"images of data.{split}_annotations",
                         f"not found in data.{split}_images")
    if cfg.data.dataset == "coco" and not (cfg.model.backbone_weights or cfg.model.weights):
        log.warning("model.backbone_weights is empty: the backbone trains from scratch (the paper fine-tunes "
                    "from ImageNet)")
    torch.manual_seed(cfg.train.seed)
    model = build_detector(cfg.model, len(train_set.category_ids) + 1, train_set.num_keypoints).to(device)
    optimizer = torch.optim.SGD(param_groups(model, cfg.optim.weight_decay, cfg.optim.decay_biases),
                                lr=cfg.optim.lr, momentum=cfg.optim.momentum, nesterov=cfg.optim.nesterov)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.train.amp == "fp16")
    checkpoint_path = out / "checkpoint.pt"
    # the log window's sums: each loss, micro-batches, images
    run = start_run(checkpoint_path, resume, model, optimizer, scaler, cfg, name, meter_size=len(LOSSES[task]) + 2,
                    labels={"category_ids": list(train_set.category_ids)})
    iteration = run.iteration
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    items = ImageItems(train_set, cfg.data.flip)
    wide = [int(im["width"] >= im["height"]) for im in train_set.images]
    sampler = ClipSampler(len(items), cfg.optim.batch_size, accumulate=cfg.optim.accumulate, world=world, rank=rank,
                          seed=cfg.train.seed, groups=wide, items="training images")
    loader = _loader(items, sampler.micro, sampler, cfg.data.workers, persistent=True, collate_fn=collate_images)
    losses_of = LOSSES[task]

    def micro_step(batch: tuple, m: int, sync: bool) -> bool:
        images, targets, _ = batch
        weight = 1.0
        if not images:  # every image of this micro-batch was unreadable
            if world == 1:
                return False
            # the other ranks wait for this one's gradients: contribute zeros
            images, targets, weight = [torch.zeros(3, 64, 64)], [_empty_target(task, train_set.num_keypoints)], 0.0
        # the model's own draws (training size, sampled anchors and RoIs) depend on the iteration
        # and the micro-batch alone, as the images' flips do
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                (contextlib.nullcontext() if sync else net.no_sync()), _autocast(cfg.train.amp, device):
            torch.manual_seed(_seed(cfg.train.seed, 2, run.iteration, rank * sampler.accumulate + m))
            losses = net([image.to(device, non_blocking=True) for image in images],
                         [_to(target, device) for target in targets])
        loss = sum(losses.values())  # a non-finite one stops the run in train_loop (through the meter)
        scaler.scale(loss * weight / sampler.accumulate).backward()
        if weight:
            run.meter += torch.tensor([losses[k].item() for k in losses_of] + [1.0, len(images)], dtype=torch.float64)
        return True

    def summarize(meter: torch.Tensor, elapsed: float) -> dict:
        steps = meter[-2].item()
        if not steps:  # no losses for a window whose images were all unreadable
            return {"images_per_s": 0.0}
        return {"loss": meter[:-2].sum().item() / steps, **{k: meter[i].item() / steps for i, k in enumerate(losses_of)},
                "images_per_s": meter[-1].item() / elapsed}

    def evaluate_now(iteration: int) -> dict:
        result = _evaluate_run(model, cfg, val_set, device, iteration)
        logger({"iteration": iteration, "kind": "val",
                **{f"{t}_{k}": v for t in IOU_TYPES[task] for k, v in result[t].items()}})
        return result

    def save() -> None:
        save_run(checkpoint_path, model, optimizer, scaler, run.iteration, cfg, {"skipped": run.skipped, "meter": run.meter},
                 category_ids=list(train_set.category_ids), keypoint_names=list(train_set.keypoint_names))

    logger = _Logger(out, cfg.train.tensorboard, iteration if resume else None)
    result = train_loop(cfg, run, sampler, loader, net, optimizer, scaler, logger, name=name, unit="images",
                        micro_step=micro_step, unreadable=lambda batch: batch[2], summarize=summarize,
                        evaluate=evaluate_now, save=save)
    iteration, skipped = run.iteration, run.skipped
    if result is None:  # resumed a finished run
        result = _evaluate_run(model, cfg, val_set, device, iteration)
    result["skipped_train_images"] = _total(skipped)
    if dist.is_main():
        _write_atomic(out / "result.json", json_dumps(result, indent=1) + "\n")
    return result


def _evaluate_run(model, cfg: DetectConfig, val_set, device, iteration: int) -> dict:
    report = coco_evaluate(_unwrap(model), val_set, IOU_TYPES[cfg.model.task], device=device,
                           batch_size=cfg.train.eval_batch_size, workers=cfg.data.workers, amp=cfg.train.amp)
    return {"iteration": iteration, **_scored(report, val_set)}


def _scored(report: dict, dataset: CocoDetection) -> dict:
    """``report``, or an :class:`~nonlocalnet.engine.UnreadableDataError` when no image was scored."""
    if not report["images"]:
        raise UnreadableDataError(f"data.val_images: none of the {len(dataset)} validation images could be read "
                                  f"({report['skipped_images']} skipped); nothing to evaluate")
    return report


def _without_nonlocal(cfg: DetectConfig) -> DetectConfig:
    base = copy.deepcopy(cfg)
    base.model.nonlocal_backbone = base.model.nonlocal_head = False
    return base


def _summary(result: dict) -> dict:
    return {k: v for k, v in result.items() if k in STAT_NAMES or k in ("images", "skipped_train_images")}


def train_job(cfg: DetectConfig, out: str | os.PathLike, *, resume: bool = False) -> dict:
    """``nonlocalnet detect train``: one run into ``out``, or with ``train.compare_baseline`` the
    detector without (``out/baseline``) and with (``out/nonlocal``) its non-local blocks; writes
    and returns ``out/summary.json`` (COCOeval numbers per run)."""
    baseline = _without_nonlocal(cfg) if cfg.train.compare_baseline else None
    return run_job(cfg, baseline, out, resume, fit, _summary)


def summary_table(summary: dict) -> str:
    """AP, AP50 and AP75 (in %) of each run and IoU type."""
    types = [t for t in STAT_NAMES if any(t in row for row in summary.values())]
    names = {"bbox": "box", "segm": "mask", "keypoints": "kp"}
    head = f"{'model':<10}" + "".join(f"{names[t] + ' ' + k:>12}" for t in types for k in ("AP", "AP50", "AP75"))
    lines = [head]
    for run, row in summary.items():
        lines.append(f"{run:<10}" + "".join(f"{100 * row[t][k]:>12.1f}" for t in types for k in ("AP", "AP50", "AP75")))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- trained models


def load_detector(path: str | os.PathLike, overrides: Sequence[str] = ()) -> tuple[nn.Module, DetectConfig, dict]:
    """A detector from a ``nonlocalnet detect train`` checkpoint, its configuration (``overrides``
    merged) and the checkpoint's label information (``category_ids``, ``keypoint_names``)."""
    state, cfg = read_run(path, DetectConfig, ("category_ids",), overrides, what="detection")
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.weights = model_cfg.backbone_weights = ""
    names = list(state.get("keypoint_names", []))
    model = build_detector(model_cfg, len(state["category_ids"]) + 1, len(names))
    load_model_state(model, state["model"], path, "weights")
    return model.eval(), cfg, {"category_ids": list(state["category_ids"]), "keypoint_names": names}


def evaluate_checkpoint(checkpoint: str | os.PathLike, cfg: DetectConfig | None = None,
                        overrides: Sequence[str] = (), *, batch_size: int = 2) -> dict:
    """``nonlocalnet detect evaluate``: COCOeval of a training checkpoint on the validation set of
    ``cfg`` (default: the configuration saved in the checkpoint, with ``overrides``)."""
    model, saved, labels = load_detector(checkpoint, () if cfg else overrides)
    cfg = cfg or saved
    if cfg.model.task != saved.model.task:
        raise ValueError(f"model.task: the checkpoint is a {saved.model.task!r} model, the config says "
                         f"{cfg.model.task!r}")
    device = dist.setup()
    _, val = build_datasets(cfg.data, saved.model.task)
    if val.category_ids != labels["category_ids"]:
        raise ValueError(f"weights: the model's categories {labels['category_ids'][:8]} differ from the validation "
                         f"set's {val.category_ids[:8]}")
    return _scored(coco_evaluate(model, val, IOU_TYPES[saved.model.task], device=device, batch_size=batch_size,
                                 workers=cfg.data.workers, amp=cfg.train.amp), val)
