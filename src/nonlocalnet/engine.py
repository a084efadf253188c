"""Training and evaluation of video models as the paper does it (docs/paper.md §4), on one process
or many (torchrun).

- :func:`fit` trains one model by iterations: Nesterov SGD, no weight decay on BN (nor, by
  default, on biases), step or cosine schedule with optional linear warm-up, dropout, AMP on CUDA,
  gradient accumulation, precise BN before evaluation, an atomic checkpoint every N iterations and
  at the end, exact ``resume``, JSONL and TensorBoard logs, a progress bar.
- :func:`evaluate` scores every (clip, crop) view with the fully convolutional test head
  (:meth:`~nonlocalnet.models.ResNet3d.view_scores`), averages per video across ranks and reports
  top-1/top-5, per-class accuracy and the confusion matrix, or mAP for multi-label sets.
- :func:`train_job` is ``nonlocalnet train``: one run, or with ``train.compare_baseline`` the same
  network with and without its non-local blocks, then ``OUT/summary.json``.

Exactness: every clip's randomness is drawn from a seed that depends only on (seed, epoch,
position in the epoch) (:class:`ClipSampler`), the data loader has its own generator, and the
checkpoint holds all RNG states, so a resumed run repeats the uninterrupted one. A global batch is
cut into the same micro-batches whatever the process count: micro-batch j of a step goes to rank
j // accumulate, so one process with ``accumulate = k`` computes what k processes do with 1.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler

from . import distributed as dist
from ._json import dumps as json_dumps
from .checkpoint import load_checkpoint, non_finite, previous_path, remove_stale_temporaries, rng_state, save_checkpoint, \
    set_rng_state
from .config import Config, DataConfig, ModelConfig, OptimConfig, merge_overrides, to_yaml
from .data.datasets import (Annotations, VideoDataset, VideoRecord, collate, read_charades_csv, read_class_folders,
                            read_kinetics_csv, read_list)
from .lock import LockedError, exclusive
from .metrics import classification_report, plot_confusion
from .models import Affine3d, ResNet3d, create_model, merge_options

__all__ = ["ClipSampler", "clip_gradients", "build_model", "load_initial", "build_annotations", "param_groups", "learning_rate", "precise_bn",
           "evaluate", "eval_dataset", "evaluation_report", "evaluate_checkpoint", "fit", "train_job", "summary_table",
           "predict", "load_trained", "read_run", "start_run", "save_run", "run_job", "Run", "train_loop",
           "DivergedError", "UnreadableDataError", "UNREADABLE_FLOOR", "check_unreadable", "val_annotations",
           "load_model_state"]

log = logging.getLogger("nonlocalnet")

#: the share of unreadable items (``data.max_unreadable``) is judged over at least this many items,
#: so that one bad video among the first few does not stop a run
UNREADABLE_FLOOR = 50


class DivergedError(ValueError):
    """Training diverged (a non-finite loss or non-finite weights); the last good checkpoint is kept."""


class UnreadableDataError(ValueError):
    """More of the data could not be read than ``data.max_unreadable`` allows, or none of it."""


def check_unreadable(unreadable: int, seen: int, limit: float, what: str, example: str = "") -> None:
    """An :class:`UnreadableDataError` when ``unreadable`` of ``seen`` items (``what``: e.g.
    ``"training clips"``) exceed the share ``limit`` (``data.max_unreadable``) of ``seen``, counted
    as at least :data:`UNREADABLE_FLOOR` items."""
    if unreadable > limit * max(seen, UNREADABLE_FLOOR):
        raise UnreadableDataError(
            f"data.max_unreadable: {unreadable} of {seen} {what} could not be read ({unreadable / max(seen, 1):.0%}; "
            f"at most {limit:g} of {max(seen, UNREADABLE_FLOOR)} may be){f', e.g. {example}' if example else ''}; "
            f"check the files and data.root, or raise data.max_unreadable (1: never stop)")


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


class ClipSampler(Sampler):
    """Training order: ``(index, seed)`` keys for :class:`VideoDataset`, one global batch after
    another, this rank's micro-batches only (module docstring). The last incomplete global batch
    of an epoch is dropped. ``set_epoch(epoch, start_step)`` picks the permutation and where in it
    to start (a resumed run). With ``groups`` (a group id per item, e.g. images wider or taller
    than high) every global batch holds items of one group, in random batch order; each group's
    incomplete last batch is dropped."""

    def __init__(self, size: int, batch_size: int, *, accumulate: int = 1, world: int = 1, rank: int = 0,
                 seed: int = 0, shuffle: bool = True, groups: Sequence[int] | None = None,
                 items: str = "training videos"):
        if accumulate < 1:
            raise ValueError(f"optim.accumulate: expected a positive int, got {accumulate}")
        if batch_size < 1 or batch_size % (world * accumulate):
            raise ValueError(f"optim.batch_size: expected a multiple of processes x optim.accumulate = {world} x "
                             f"{accumulate}, got {batch_size}")
        if size < batch_size:
            raise ValueError(f"optim.batch_size: expected at most the {size} {items}, got {batch_size}")
        self.size, self.batch_size, self.accumulate, self.world, self.rank = size, batch_size, accumulate, world, rank
        self.micro = batch_size // (world * accumulate)
        self.groups = None if groups is None else torch.as_tensor(list(groups), dtype=torch.int64)
        if self.groups is not None and len(self.groups) != size:
            raise ValueError(f"groups: expected one group id per item ({size}), got {len(self.groups)}")
        counts = [size] if self.groups is None else torch.unique(self.groups, return_counts=True)[1].tolist()
        self.steps = sum(count // batch_size for count in counts)
        if self.steps == 0:
            raise ValueError(f"optim.batch_size: expected at most the largest group's {max(counts)} items, "
                             f"got {batch_size}")
        self.seed, self.shuffle, self.epoch, self.start = seed, shuffle, 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start = epoch, start_step

    def __len__(self) -> int:
        return (self.steps - self.start) * self.accumulate * self.micro

    def __iter__(self):
        generator = torch.Generator().manual_seed(_seed(self.seed, self.epoch))
        order = torch.randperm(self.size, generator=generator) if self.shuffle else torch.arange(self.size)
        if self.groups is not None:  # whole batches of one group each, in random order
            batches = []
            for group in torch.unique(self.groups).tolist():
                members = order[self.groups[order] == group]
                whole = len(members) // self.batch_size * self.batch_size
                batches.extend(members[:whole].split(self.batch_size))
            pick = torch.randperm(len(batches), generator=generator) if self.shuffle else range(len(batches))
            order = torch.cat([batches[i] for i in pick])
        for step in range(self.start, self.steps):
            for m in range(self.accumulate):
                first = step * self.batch_size + (self.rank * self.accumulate + m) * self.micro
                for position in range(first, first + self.micro):
                    yield int(order[position]), _seed(self.seed, self.epoch, position)


# ---------------------------------------------------------------------------------------------- model


def build_model(cfg: ModelConfig, num_classes: int) -> ResNet3d:
    """The network ``cfg`` describes (:func:`model_arguments`), with ``cfg.weights`` loaded (a
    classifier of another shape is left at its initialisation: fine-tuning)."""
    model = ResNet3d(**model_arguments(cfg), num_classes=num_classes)
    if cfg.weights:  # weights without any non-local block (ImageNet, a baseline): the blocks start fresh
        load_initial(model, cfg.weights, heads=("pred.",), optional=("nonlocal_block.",))
    return model


_FIELDS = ("depth", "inflation", "stem", "width", "stage_blocks")  # ModelConfig fields that are ResNet3d arguments


def model_arguments(cfg: ModelConfig) -> dict:
    """:class:`ResNet3d` arguments (but ``num_classes``) of ``cfg``: a zoo model's (``cfg.name``)
    or ResNet3d's defaults, every field given (not null) over them, then ``cfg.options`` over all.

    When ``cfg.options`` is empty, those saved with ``cfg.weights`` (another library's conventions,
    from ``nonlocalnet convert``) are used and written into ``cfg.options``, so that the run's
    checkpoints rebuild the same network without the file. A ``depth`` other than the named
    model's is an error, as are both ``nonlocal_preset`` and ``nonlocal_blocks``."""
    from .models import NONLOCAL_PRESETS, model_card

    if not cfg.options and cfg.weights:
        cfg.options = _saved_options(cfg.weights)
    given = {k: getattr(cfg, k) for k in _FIELDS if getattr(cfg, k) is not None}
    base = {}
    if cfg.name:
        card = model_card(cfg.name)
        if given.get("depth", card.depth) != card.depth:
            raise ValueError(f"model.depth: {given['depth']} differs from model.name {cfg.name!r} (R{card.depth}); "
                             f"name the R{given['depth']} model or leave model.depth out")
        base = card.model_kwargs()
    if cfg.nonlocal_preset and cfg.nonlocal_blocks is not None:
        raise ValueError(f"model.nonlocal_preset ({cfg.nonlocal_preset!r}) and model.nonlocal_blocks "
                         f"({dict(cfg.nonlocal_blocks)}): give one of them")
    if cfg.nonlocal_preset:
        depth = given.get("depth", base.get("depth", 50))
        if cfg.nonlocal_preset not in NONLOCAL_PRESETS or depth not in NONLOCAL_PRESETS[cfg.nonlocal_preset]:
            raise ValueError(f"model.nonlocal_preset: expected one of {sorted(NONLOCAL_PRESETS)} (R50 or R101), "
                             f"got {cfg.nonlocal_preset!r}")
        given["nonlocal_blocks"] = dict(NONLOCAL_PRESETS[cfg.nonlocal_preset][depth])
    elif cfg.nonlocal_blocks is not None:
        given["nonlocal_blocks"] = {k: tuple(v) for k, v in cfg.nonlocal_blocks.items()} or None
    options = dict(cfg.options)
    clash = {k: (given[k], options[k]) for k in given if k in options and _same(given[k]) != _same(options[k])}
    mode = (options.get("nonlocal_options") or {}).get("mode")
    if cfg.nonlocal_mode is not None and mode is not None and mode != cfg.nonlocal_mode:
        clash["nonlocal_mode"] = (cfg.nonlocal_mode, mode)
    if clash:
        raise ValueError("model: " + "; ".join(f"model.{k} is {a!r} but model.options (or the options saved with "
                                               f"model.weights) say {b!r}" for k, (a, b) in clash.items()))
    if cfg.nonlocal_mode is not None:
        if not given.get("nonlocal_blocks", base.get("nonlocal_blocks")):
            raise ValueError(f"model.nonlocal_mode: {cfg.nonlocal_mode!r} given for a model without non-local blocks "
                             f"(model.nonlocal_blocks / model.nonlocal_preset)")
        given["nonlocal_options"] = {"mode": cfg.nonlocal_mode}
    return merge_options(merge_options(base, {**given, "dropout": cfg.dropout}), options)


def _same(value):
    """A comparable form of a model argument: lists and tuples alike, mappings by their items."""
    if isinstance(value, dict):
        return {k: _same(v) for k, v in value.items()}
    return tuple(_same(v) for v in value) if isinstance(value, (list, tuple)) else value


def resolve_model(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with every field that builds the network filled in as :func:`build_model` builds
    it (the name's and the defaults' values, ``options`` over them), so that the configuration a
    run saves describes exactly the network it trained. Errors as :func:`model_arguments`."""
    import inspect

    resolved = copy.deepcopy(cfg)
    arguments = model_arguments(resolved)
    defaults = {k: p.default for k, p in inspect.signature(ResNet3d).parameters.items()}
    for key in ("depth", "inflation", "stem", "width"):
        setattr(resolved, key, arguments.get(key, defaults[key]))
    from .models.resnet3d import DEPTHS

    resolved.stage_blocks = list(arguments.get("stage_blocks") or DEPTHS[resolved.depth])
    blocks = arguments.get("nonlocal_blocks") or {}
    resolved.nonlocal_blocks = {k: list(v) for k, v in blocks.items()}
    resolved.nonlocal_preset = ""
    resolved.nonlocal_mode = (arguments.get("nonlocal_options") or {}).get("mode", "embedded_gaussian") if blocks \
        else None
    return resolved


def _saved_options(path: str | os.PathLike) -> dict:
    """The model options a weights file or a training checkpoint's configuration records."""
    if _is_training_checkpoint(path):
        from omegaconf import OmegaConf

        saved = OmegaConf.to_container(OmegaConf.create(load_checkpoint(path, mmap=True)["config"]))
        return dict((saved.get("model") or {}).get("options") or {})
    from .weights import read_weights

    return dict(read_weights(path, mmap=True)["options"])


def load_initial(model: nn.Module, path: str, *, heads: Sequence[str], optional: Sequence[str] = (),
                 name: str = "model") -> None:
    """Initial weights (``model.weights``) from a weights file or a training checkpoint. Entries of
    the classifier (keys containing one of ``heads``) of another shape keep the model's
    initialisation (fine-tuning), as do missing ones; keys containing one of ``optional`` may be
    missing too when the file has none of them (a baseline's weights in a non-local model), not
    when it has some. Anything else that does not fit is an error naming the keys."""
    from .weights import read_weights

    state = dict(read_weights(path)["state_dict"])
    own = model.state_dict()
    shapes = [k for k in state if k in own and state[k].shape != own[k].shape]
    for key in [k for k in shapes if any(h in k for h in heads)]:
        log.info("initial weights: %s has shape %s, the model %s; kept at its initialisation", key,
                 tuple(state[key].shape), tuple(own[key].shape))
    result = model.load_state_dict({k: v for k, v in state.items() if k not in shapes}, strict=False)
    optional = [o for o in optional if not any(o in k for k in state)]  # all or none of them
    fresh = [k for k in result.missing_keys if any(o in k for o in optional)]
    if fresh:
        log.info("initial weights: %s has no %s entries; %d keep their initialisation", path, "/".join(optional),
                 len(fresh))
    missing = [k for k in result.missing_keys if not any(h in k for h in (*heads, *optional))]
    shapes = [k for k in shapes if not any(h in k for h in heads)]
    if missing or result.unexpected_keys or shapes:
        raise ValueError(f"model.weights: {path} does not fit the {name}: missing {missing[:8]}, unexpected "
                         f"{result.unexpected_keys[:8]}, other shapes {shapes[:8]}")


def param_groups(model: nn.Module, weight_decay: float, decay_biases: bool = False) -> list[dict]:
    """Weight decay on conv and fc weights (and biases if ``decay_biases``), never on BN / affine
    parameters (official ``WEIGHT_DECAY_BN 0``), non-local blocks' BN included."""
    norm = {id(p) for m in model.modules() if isinstance(m, (nn.modules.batchnorm._NormBase, Affine3d))
            for p in m.parameters(recurse=False)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if id(p) in norm or (name.endswith("bias") and not decay_biases) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def learning_rate(cfg: OptimConfig, iteration: int) -> float:
    """LR of a (0-based) iteration: steps (x gamma at each of ``cfg.steps``) or cosine to 0, times
    a linear warm-up over the first ``cfg.warmup`` iterations from ``cfg.warmup_factor``."""
    if cfg.schedule == "cosine":
        lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * iteration / cfg.iterations))
    elif cfg.schedule == "steps":
        lr = cfg.lr * cfg.gamma ** sum(iteration >= s for s in cfg.steps)
    else:
        raise ValueError(f"optim.schedule: expected 'steps' or 'cosine', got {cfg.schedule!r}")
    if iteration < cfg.warmup:  # from warmup_factor (0: 1 / warmup) up to 1
        lr *= cfg.warmup_factor + (1 - cfg.warmup_factor) * (iteration + 1) / cfg.warmup
    return lr


def clip_gradients(optimizer: torch.optim.Optimizer, scaler, max_norm: float) -> None:
    """Clip the gradients' global norm to ``max_norm`` (0: nothing), unscaled first under fp16."""
    if max_norm > 0:
        scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, max_norm)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _loss(logits: torch.Tensor, target: torch.Tensor, multilabel: bool) -> torch.Tensor:
    if multilabel:
        return F.binary_cross_entropy_with_logits(logits.float(), target.float())
    return F.cross_entropy(logits.float(), target)


def _autocast(amp: str, device: torch.device):
    if amp == "none":
        return contextlib.nullcontext()
    if amp not in ("bf16", "fp16"):
        raise ValueError(f"train.amp: expected 'none', 'bf16' or 'fp16', got {amp!r}")
    if device.type != "cuda":
        raise ValueError(f"train.amp: {amp} mixed precision needs a CUDA device, got {device}")
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


# ----------------------------------------------------------------------------------------------- data


def _synthetic(cfg: DataConfig):
    from .data.synthetic import SyntheticSpec

    if len(cfg.synthetic_size) != 2:
        raise ValueError(f"data.synthetic_size: expected [height, width], got {cfg.synthetic_size}")
    spec = SyntheticSpec(train=cfg.synthetic_train, val=cfg.synthetic_val, height=cfg.synthetic_size[0],
                         width=cfg.synthetic_size[1], frames=cfg.synthetic_frames, seed=cfg.synthetic_seed)
    return generated_set(cfg.root, "synthetic", spec, (spec.train, spec.val, spec.height, spec.width, spec.frames,
                                                       spec.seed))


def generated_set(root: str, kind: str, spec, key: Sequence) -> Path:
    """The folder of a data set the package writes (``kind``: synthetic videos or shapes images):
    ``root``, or by default ``~/.cache/nonlocalnet/<kind>-<key>``. Rank 0 writes it once (reused
    while its spec is the same) and the other ranks wait for it."""
    from .data.shapes import make_shapes
    from .data.synthetic import ForeignFolderError, make_synthetic

    given = bool(root)
    if not root:
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nonlocalnet"
        root = cache / f"{kind}-{'-'.join(str(v) for v in key)}"
    if dist.is_main():
        try:
            {"synthetic": make_synthetic, "shapes": make_shapes}[kind](root, spec, log=log.info)
        except ForeignFolderError as err:
            own = {"synthetic": "list, kinetics, folders or charades", "shapes": "coco"}[kind]
            raise ForeignFolderError(
                f"data.root: {err} (data.dataset is {kind!r}, a set the package writes there; to read your own data, "
                f"set data.dataset to {own})" if given else
                f"{err} (the package's cache of the {kind} set: delete that folder if an older nonlocalnet wrote it)"
            ) from None
        except ValueError as err:
            raise ValueError(f"data.root / data.{kind}_*: {err}") from None
    if dist.world_size() > 1:
        torch.distributed.barrier()
    return Path(root)


def build_annotations(cfg: DataConfig) -> tuple[Annotations, Annotations]:
    """Training and validation annotations of ``cfg.dataset``; validation takes training's classes
    and its single- or multi-label kind. Single-label sets must label every entry."""
    kind = cfg.dataset
    if kind == "synthetic":
        root = _synthetic(cfg)
        train, val = (read_list(root / f"{split}.txt", classes=root / "classes.txt") for split in ("train", "val"))
    else:
        for name in ("train", "val"):
            if not getattr(cfg, name):
                raise ValueError(f"data.{name}: dataset {kind!r} needs an annotation file (or folder), got nothing")
        train = _read_split(cfg, "train", cfg.classes or None)
        val = _read_split(cfg, "val", train.classes)
        if kind == "folders" and val.classes != train.classes:
            raise ValueError(f"data.val: class folders {val.classes[:5]}... differ from data.train's")
    val.multilabel = train.multilabel = train.multilabel or val.multilabel
    for split, ann in (("train", train), ("val", val)):
        _check_split(cfg, split, ann)
    return train, val


def val_annotations(cfg: DataConfig, classes: Sequence[str], multilabel: bool = False) -> Annotations:
    """The validation annotations alone (``cfg.val``; ``cfg.train`` is not read), labelled by a
    trained model's ``classes`` unless ``cfg.classes`` names a file (class folders: by their names),
    single- or multi-label as the model."""
    if cfg.dataset == "synthetic":
        root = _synthetic(cfg)
        val = read_list(root / "val.txt", classes=root / "classes.txt")
    else:
        if not cfg.val:
            raise ValueError(f"data.val: dataset {cfg.dataset!r} needs an annotation file (or folder), got nothing")
        val = _read_split(cfg, "val", cfg.classes or list(classes))
    val.multilabel = val.multilabel or multilabel
    _check_split(cfg, "val", val)
    return val


def _read_split(cfg: DataConfig, split: str, classes) -> Annotations:
    """``cfg.<split>``'s annotations of a data set on disk, with ``classes`` (names, a file or None)."""
    kind, path = cfg.dataset, getattr(cfg, split)
    if kind == "list":
        return read_list(path, cfg.root or None, classes)
    if kind == "kinetics":
        return read_kinetics_csv(path, cfg.root, classes)
    if kind == "folders":
        return read_class_folders(path)
    if kind == "charades":
        return read_charades_csv(path, cfg.root, classes)
    raise ValueError(f"data.dataset: expected synthetic, list, kinetics, folders or charades, got {kind!r}")


def _check_split(cfg: DataConfig, split: str, ann: Annotations) -> None:
    """Entries to use, each labelled (single-label), and not too many missing (``data.max_unreadable``)."""
    if not ann.records:
        found = f"; none of its {len(ann.missing)} videos was found (data.root: {cfg.root!r})" if ann.missing else ""
        raise ValueError(f"data.{split}: no usable entries{found}")
    unlabelled = [r.path for r in ann.records if not r.labels]
    if unlabelled and not ann.multilabel:
        raise ValueError(f"data.{split}: {len(unlabelled)} entries have no label, e.g. {unlabelled[0]!r}; "
                         f"training and validation need labels")
    if ann.missing:
        log.warning("%s: %d annotated videos not found, e.g. %s", split, len(ann.missing), ann.missing[:3])
        check_unreadable(len(ann.missing), len(ann.missing) + len(ann.records), cfg.max_unreadable,
                         f"videos listed in data.{split}", f"{ann.missing[0]} (not found)")


def _train_dataset(annotations: Annotations, cfg: DataConfig) -> VideoDataset:
    return VideoDataset(annotations, "train", frames=cfg.frames, rate=cfg.rate, scales=tuple(cfg.scales),
                        crop_size=cfg.crop, flip=cfg.flip)


def eval_dataset(annotations: Annotations, cfg: DataConfig, clips: int | None = None,
                  crops: int | None = None) -> VideoDataset:
    return VideoDataset(annotations, "test", frames=cfg.frames, rate=cfg.rate, test_scale=cfg.test_scale,
                        test_crop=cfg.test_crop, clips=clips or cfg.test_clips, crops=crops or cfg.test_crops)


def _loader(dataset, batch_size: int, sampler, workers: int, persistent: bool = False, collate_fn=collate) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_fn,
                      generator=torch.Generator(), pin_memory=torch.cuda.is_available(),
                      persistent_workers=persistent and workers > 0,
                      multiprocessing_context="fork" if workers and os.name == "posix" else None)


def _report_skipped(skipped, seen: set) -> int:
    for item in skipped:
        if item.path not in seen:
            seen.add(item.path)
            log.warning("skipped %s: %s", item.path, item.reason)
    return len(skipped)


# --------------------------------------------------------------------------------------- precise BN


@torch.no_grad()
def precise_bn(model: nn.Module, batches, device: torch.device, amp: str = "none", *,
               variance: str = "population") -> int:
    """Re-estimate every BatchNorm's statistics from ``batches`` run in training mode (official
    precise BN): the mean is the average of the batch means, over every batch of every rank.

    ``variance``: ``"population"`` (the official recompute): E[x^2] averaged over the batches
    minus the squared mean, the variance of all the batches taken together, so the spread of the
    batch means counts; ``"average"`` (PySlowFast): the average of the (unbiased) batch variances.
    Returns the number of batches used; with none the statistics are left as they were. The RNG is
    left as it was."""
    if variance not in ("population", "average"):
        raise ValueError(f"train.precise_bn_variance: expected 'population' or 'average', got {variance!r}")
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    # per norm: sums over batches of the mean, E[x^2] and the unbiased variance (float64, per channel)
    sums = [torch.zeros(3, m.num_features, dtype=torch.float64, device=device) for m in norms]

    def record(index: int):
        def hook(module, inputs):
            x = inputs[0].detach().float().transpose(0, 1).flatten(1)  # (C, N*T*H*W)
            var, mean = torch.var_mean(x, dim=1, correction=0)
            unbiased = var * (x.shape[1] / max(x.shape[1] - 1, 1))
            sums[index] += torch.stack([mean, var + mean * mean, unbiased]).double()
        return hook

    handles = [m.register_forward_pre_hook(record(i)) for i, m in enumerate(norms)]
    training = model.training
    model.train()
    count = 0
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for batch in batches:
                if "clip" not in batch:
                    continue
                with _autocast(amp, device):
                    model(batch["clip"].to(device, non_blocking=True))
                count += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)
    total = int(dist.all_reduce_sum(torch.tensor([float(count)], dtype=torch.float64)).item())
    if total == 0:
        log.warning("precise BN: no batch could be read; the BN statistics are kept as they were")
        return 0
    for m, s in zip(norms, sums):
        mean, square, unbiased = dist.all_reduce_sum(s) / total
        m.running_mean.copy_(mean)
        m.running_var.copy_((square - mean * mean).clamp_min(0) if variance == "population" else unbiased)
    return count


# --------------------------------------------------------------------------------------- evaluation


def _view_probabilities(model: ResNet3d, clips: torch.Tensor, window: int, multilabel: bool) -> torch.Tensor:
    if multilabel:
        return torch.sigmoid(model.forward_dense(clips, window).float()).mean((2, 3, 4))
    return model.forward_dense(clips, window).float().softmax(1).mean((2, 3, 4))


@torch.no_grad()
def evaluate(model: nn.Module, dataset: VideoDataset, *, batch_size: int = 8, workers: int = 0,
             device: torch.device | str = "cpu", window: int = 7, amp: str = "none") -> dict:
    """Average the class probabilities of every view of each video (this rank scores every
    world-size-th item) and gather them. Returns ``scores`` (videos, classes), ``views`` per
    video, ``targets`` and the ``skipped`` views."""
    device = torch.device(device)
    net = _unwrap(model)
    net.eval()
    if dataset.test_crop == 0:  # whole frames: each video has its own size, so one clip per batch
        batch_size = 1
    videos, classes = len(dataset.records), dataset.num_classes
    totals = torch.zeros(videos, classes, dtype=torch.float64)
    views = torch.zeros(videos, dtype=torch.float64)
    items = list(range(dist.rank(), len(dataset), dist.world_size()))
    skipped, names = 0, set()
    for batch in _loader(dataset, batch_size, items, workers):
        skipped += _report_skipped(batch["skipped"], names)
        if "clip" not in batch:
            continue
        clips = batch["clip"].to(device, non_blocking=True)  # (B, crops, 3, T, S, S)
        with _autocast(amp, device):
            probs = _view_probabilities(net, clips.flatten(0, 1), window, dataset.multilabel)
        probs = probs.view(clips.shape[0], clips.shape[1], -1).mean(1).double().cpu()
        totals.index_add_(0, batch["video"], probs)  # in item order: the same sums every run
        views.index_add_(0, batch["video"], torch.ones(len(probs), dtype=torch.float64))
    dist.all_reduce_sum(totals)
    dist.all_reduce_sum(views)
    scores = totals / views.clamp(min=1).unsqueeze(1)
    targets = torch.stack([dataset.target(v) for v in range(videos)]) if videos else torch.zeros(0)
    return {"scores": scores, "views": views, "targets": targets, "skipped": _total(skipped)}


def evaluation_report(result: dict, multilabel: bool) -> dict:
    """The metrics of :func:`evaluate`'s ``result`` over the videos with a view; an
    :class:`UnreadableDataError` when no video has one (no metric to report)."""
    scored = result["views"] > 0
    if not scored.any():
        raise UnreadableDataError(f"data.val: none of the {len(scored)} validation videos could be read "
                                  f"({result['skipped']} views skipped); nothing to evaluate")
    report = classification_report(result["scores"][scored], result["targets"][scored], multilabel)
    report["videos_without_views"] = int((~scored).sum())
    report["skipped_views"] = result["skipped"]
    return report


# ------------------------------------------------------------------------------------------ training


class _Logger:
    """JSONL (always), TensorBoard (if wanted and installed), on rank 0 only."""

    def __init__(self, out: Path, tensorboard: bool | None, resume_at: int | None):
        self.main = dist.is_main()
        self.path = out / "metrics.jsonl"
        self.writer = None
        if not self.main:
            return
        if resume_at is not None and self.path.exists():  # drop what was logged after the checkpoint
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("iteration", 0) <= resume_at:
                        kept.append(line)
                except ValueError:  # a line torn by the interruption
                    pass
            _write_atomic(self.path, "".join(line + "\n" for line in kept))
        elif resume_at is None and self.path.exists():
            self.path.unlink()
        if tensorboard is not False:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                if tensorboard:
                    raise ImportError("train.tensorboard: needs TensorBoard: pip install 'nonlocalnet[tensorboard]'") \
                        from None
            else:
                self.writer = SummaryWriter(os.fspath(out / "tensorboard"), purge_step=resume_at)

    def __call__(self, record: dict) -> None:
        if not self.main:
            return
        with open(self.path, "a") as f:
            f.write(json_dumps(record) + "\n")
        if self.writer is not None:
            step = record["iteration"]
            for key, value in record.items():
                if key not in ("iteration", "kind") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{record.get('kind', 'train')}/{key}", value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _progress(total: int, initial: int, enabled: bool, desc: str):
    if not (enabled and dist.is_main()):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="it", dynamic_ncols=True, disable=None)


@dataclasses.dataclass
class Run:
    """Where a training run stands: the iteration, this rank's count of unreadable items and its
    sums since the last log record (what a checkpoint keeps per rank); its checkpoint ``path``, the
    iteration of the last checkpoint written or resumed from (``saved``, None before the first)
    and the iteration the unreadable share is counted from (``since``, with this rank's count then,
    ``since_skipped``: not 0 when a resume with another process count restarted it)."""

    iteration: int
    skipped: int
    meter: torch.Tensor
    path: Path | None = None
    saved: int | None = None
    since: int = 0
    since_skipped: int = 0

    def last_good(self) -> str:
        """Where the last good state is, for an error message."""
        if self.saved is None:
            return "no checkpoint was written"
        return f"the last good checkpoint, of iteration {self.saved}, is {self.path}"


def train_loop(cfg, run: Run, sampler: ClipSampler, loader, net: nn.Module, optimizer, scaler, logger, *, name: str,
               unit: str, micro_step, unreadable, summarize, evaluate, save):
    """The iteration loop of the video and detection engines, from ``run.iteration`` to
    ``cfg.optim.iterations``: the epoch and sampler position, the LR schedule, ``accumulate``
    micro-batches per step (``micro_step(batch, m, sync) -> whether it ran backward``; the
    gradients are synchronised across ranks when ``sync``), gradient clipping and the optimizer
    step, log records every ``cfg.train.log_every`` iterations (``summarize(meter, seconds)``
    gives the run's own fields; it leaves out those of a window without items) with a progress bar
    or ETA lines, ``evaluate(iteration)`` at ``eval_every`` and at the end, ``save()`` every
    ``checkpoint_every`` and at the end. Returns the last evaluation's result (None if the run was
    already finished).

    Before each optimizer step every rank learns (one all-reduce) whether any rank's loss so far
    in the log window (``run.meter``) is not finite, and how many items all ranks could not read
    (``unreadable(batch)``): a :class:`DivergedError` or an :class:`UnreadableDataError`
    (``cfg.data.max_unreadable`` of the items drawn, :func:`check_unreadable`) stops every rank
    alike, the step not taken and the checkpoint not written."""
    world = dist.world_size()
    bar = _progress(cfg.optim.iterations, run.iteration, cfg.train.progress, name or "train")
    names: set = set()
    result, example = None, ""
    tick, data_time, window_iterations = time.perf_counter(), 0.0, 0
    started, first_iteration = tick, run.iteration
    try:
        while run.iteration < cfg.optim.iterations:
            epoch, start = divmod(run.iteration, sampler.steps)
            sampler.set_epoch(epoch, start)
            batches = iter(loader)
            for _ in range(start, sampler.steps):
                if run.iteration >= cfg.optim.iterations:
                    break
                lr = learning_rate(cfg.optim, run.iteration)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                net.train()
                optimizer.zero_grad(set_to_none=True)
                backward = False
                for m in range(sampler.accumulate):
                    t0 = time.perf_counter()
                    batch = next(batches)
                    data_time += time.perf_counter() - t0
                    bad = unreadable(batch)
                    run.skipped += _report_skipped(bad, names)
                    if bad:
                        example = f"{bad[0].path}: {bad[0].reason}"
                    backward |= micro_step(batch, m, m == sampler.accumulate - 1 or world == 1)
                _check_step(cfg, run, example)
                if backward:
                    clip_gradients(optimizer, scaler, cfg.optim.clip_grad_norm)
                    scaler.step(optimizer)
                    scaler.update()
                run.iteration += 1
                window_iterations += 1
                if bar is not None:
                    bar.update(1)
                last = run.iteration == cfg.optim.iterations
                if run.iteration % cfg.train.log_every == 0 or last:
                    dist.all_reduce_sum(run.meter)
                    record = {"iteration": run.iteration, "epoch": epoch, "lr": lr,
                              **summarize(run.meter, max(time.perf_counter() - tick, 1e-9)),
                              "data_s_per_iter": data_time / max(window_iterations, 1), "skipped": _total(run.skipped)}
                    logger(record)
                    loss = f"{record['loss']:.4f}" if "loss" in record else "-"  # a window without items
                    if bar is not None and not bar.disable:
                        bar.set_postfix(loss=loss, lr=f"{lr:.2g}")
                    elif dist.is_main():
                        rate = (run.iteration - first_iteration) / max(time.perf_counter() - started, 1e-9)
                        eta = (cfg.optim.iterations - run.iteration) / max(rate, 1e-9)
                        log.info("%s iter %d/%d loss %s lr %.3g %.1f %s/s eta %d:%02d", name or "train", run.iteration,
                                 cfg.optim.iterations, loss, lr, record[f"{unit}_per_s"], unit, eta // 60, eta % 60)
                    run.meter.zero_()
                    tick, data_time, window_iterations = time.perf_counter(), 0.0, 0
                if last or (cfg.train.eval_every and run.iteration % cfg.train.eval_every == 0):
                    result = evaluate(run.iteration)
                if last or run.iteration % cfg.train.checkpoint_every == 0:
                    save()
                    run.saved = run.iteration
    finally:
        if bar is not None:
            bar.close()
        logger.close()
    return result


def _check_step(cfg, run: Run, example: str) -> None:
    """:func:`train_loop`'s checks before a step, the same on every rank."""
    status = torch.tensor([float(not torch.isfinite(run.meter).all()), float(run.skipped - run.since_skipped)],
                          dtype=torch.float64)
    dist.all_reduce_sum(status)
    if status[0]:
        raise DivergedError(f"training diverged: the loss is not finite at iteration {run.iteration + 1}; "
                            f"{run.last_good()} (lower optim.lr, or set optim.clip_grad_norm or optim.warmup)")
    seen = (run.iteration + 1 - run.since) * cfg.optim.batch_size
    check_unreadable(int(status[1].item()), seen, cfg.data.max_unreadable, "training items drawn so far", example)


def fit(cfg: Config, out: str | os.PathLike, *, resume: bool = False, name: str = "") -> dict:
    """Train ``cfg`` into ``out`` (checkpoint.pt, metrics.jsonl, tensorboard/, config.yaml,
    result.json, confusion.png) and evaluate it; returns the evaluation report."""
    out = Path(out)
    device = dist.setup()
    world, rank = dist.world_size(), dist.rank()
    train_ann, val_ann = build_annotations(cfg.data)
    multilabel = train_ann.multilabel
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, len(train_ann.classes)).to(device)
    optimizer = torch.optim.SGD(param_groups(model, cfg.optim.weight_decay, cfg.optim.decay_biases),
                                lr=cfg.optim.lr, momentum=cfg.optim.momentum, nesterov=cfg.optim.nesterov)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.train.amp == "fp16")
    checkpoint_path = out / "checkpoint.pt"
    # the log window's sums: loss, correct, clips
    run = start_run(checkpoint_path, resume, model, optimizer, scaler, cfg, name, meter_size=3,
                    labels={"classes": list(train_ann.classes)})
    iteration = run.iteration
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    train_set = _train_dataset(train_ann, cfg.data)
    sampler = ClipSampler(len(train_set), cfg.optim.batch_size, accumulate=cfg.optim.accumulate, world=world,
                          rank=rank, seed=cfg.train.seed)
    loader = _loader(train_set, sampler.micro, sampler, cfg.data.workers, persistent=True)
    window = max(1, cfg.data.crop // 32)

    def micro_step(batch: dict, m: int, sync: bool) -> bool:
        if "clip" not in batch:  # every clip of this micro-batch was unreadable
            if world == 1:
                return False
            # the other ranks wait for this one's gradients: contribute zeros
            size = (1, 3, cfg.data.frames, cfg.data.crop, cfg.data.crop)
            with (contextlib.nullcontext() if sync else net.no_sync()), _autocast(cfg.train.amp, device):
                zero = net(torch.zeros(size, device=device)).float().sum() * 0.0
            scaler.scale(zero).backward()
            return True
        clips, target = batch["clip"].to(device, non_blocking=True), batch["target"].to(device)
        with (contextlib.nullcontext() if sync else net.no_sync()), _autocast(cfg.train.amp, device):
            logits = net(clips)
            loss = _loss(logits, target, multilabel)
        scaler.scale(loss / sampler.accumulate).backward()
        run.meter += torch.tensor([loss.item() * len(clips), 0.0 if multilabel else
                                   (logits.argmax(1) == target).sum().item(), len(clips)], dtype=torch.float64)
        return True

    def summarize(meter: torch.Tensor, elapsed: float) -> dict:
        clips = meter[2].item()
        if not clips:  # no loss nor accuracy for a window whose clips were all unreadable
            return {"clips_per_s": 0.0}
        record = {"loss": meter[0].item() / clips, "clips_per_s": clips / elapsed}
        if not multilabel:
            record["top1"] = meter[1].item() / clips
        return record

    def evaluate_now(iteration: int) -> dict:
        result = _evaluate_run(net, cfg, train_set, val_ann, device, window, iteration)
        logger({"iteration": iteration, "kind": "val",
                **{k: v for k, v in result.items() if isinstance(v, (int, float))}})
        return result

    def save() -> None:
        save_run(checkpoint_path, model, optimizer, scaler, run.iteration, cfg,
                 {"skipped": run.skipped, "meter": run.meter}, classes=list(train_ann.classes),
                 multilabel=train_ann.multilabel)

    logger = _Logger(out, cfg.train.tensorboard, iteration if resume else None)
    result = train_loop(cfg, run, sampler, loader, net, optimizer, scaler, logger, name=name, unit="clips",
                        micro_step=micro_step, unreadable=lambda batch: batch["skipped"], summarize=summarize,
                        evaluate=evaluate_now, save=save)
    iteration, skipped = run.iteration, run.skipped
    if result is None:  # resumed a finished run
        result = _evaluate_run(net, cfg, train_set, val_ann, device, window, iteration)
    result["skipped_train_clips"] = _total(skipped)
    result["classes"] = train_ann.classes
    if dist.is_main():
        _write_atomic(out / "result.json", json_dumps(result, indent=1) + "\n")
        if "confusion" in result:
            try:
                plot_confusion(result["confusion"], train_ann.classes, out / "confusion.png", title=name or "")
            except ImportError as err:
                log.warning("no confusion picture: %s", err)
    return result


def _evaluate_run(net, cfg: Config, train_set, val_ann, device, window, iteration) -> dict:
    model = _unwrap(net)
    if cfg.train.precise_bn:
        sampler = ClipSampler(len(train_set), cfg.optim.batch_size, accumulate=cfg.optim.accumulate,
                              world=dist.world_size(), rank=dist.rank(), seed=_seed(cfg.train.seed, 1, iteration))
        batches = _batches(sampler, train_set, cfg.data.workers, cfg.train.precise_bn * sampler.accumulate)
        precise_bn(model, batches, device, cfg.train.amp, variance=cfg.train.precise_bn_variance)
    result = evaluate(model, eval_dataset(val_ann, cfg.data), batch_size=max(1, cfg.optim.batch_size //
                      (dist.world_size() * cfg.optim.accumulate)), workers=cfg.data.workers, device=device,
                      window=window, amp=cfg.train.amp)
    return {"iteration": iteration, **evaluation_report(result, val_ann.multilabel)}


def _batches(sampler: ClipSampler, dataset, workers: int, limit: int):
    """The first ``limit`` micro-batches of the sampler's epochs 0, 1, ..."""
    count, epoch = 0, 0
    while count < limit:
        sampler.set_epoch(epoch)
        for batch in _loader(dataset, sampler.micro, sampler, workers):
            yield batch
            count += 1
            if count == limit:
                return
        epoch += 1


def _total(count: int) -> int:
    """A per-rank count summed over ranks."""
    return int(dist.all_reduce_sum(torch.tensor(float(count), dtype=torch.float64)).item())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def start_run(path: Path, resume: bool, model: nn.Module, optimizer, scaler, cfg, name: str = "", *,
              meter_size: int, labels: dict) -> Run:
    """A new run, or (``resume``) the one checkpointed at ``path``: model, optimizer, scaler, this
    rank's RNG state, skip count and log window restored; ``labels`` (the class names or category
    ids) must be the checkpoint's. A new run refuses to overwrite one; ``resume`` without a
    checkpoint, from a checkpoint with non-finite values (a diverged run) or into a model of another
    shape is an error naming the file. Writes ``config.yaml``."""
    if path.exists() and not resume:
        raise ValueError(f"out: {path.parent} already holds a run (checkpoint.pt); pass --resume to continue it or "
                         f"choose another --out")
    if resume and not path.exists():
        raise ValueError(f"out: {path.parent} holds no run to resume (no checkpoint.pt); drop --resume to start one")
    run = Run(0, 0, torch.zeros(meter_size, dtype=torch.float64), path)
    if resume:
        state = load_checkpoint(path)
        for key, value in labels.items():
            if state[key] != value:
                raise ValueError(f"resume: the checkpoint's {key} differ from the data's ({len(state[key])}: "
                                 f"{state[key][:5]}... vs {len(value)}: {value[:5]}...)")
        bad = non_finite(state["model"]) + non_finite(state["optimizer"])
        if bad:
            previous = previous_path(path)
            way = (f"resume from the one before it: move {previous} to {path}" if os.path.exists(previous) else
                   "start again with a lower optim.lr")
            raise DivergedError(f"resume: {path} holds non-finite values ({len(bad)} tensors, e.g. {bad[:3]}): the run "
                                f"had diverged; {way}")
        load_model_state(model, state["model"], path, "resume")
        optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:  # empty when the run so far had no fp16 scaler
            scaler.load_state_dict(state["scaler"])
        rank = dist.rank()
        set_rng_state(state["rng"][rank if rank < len(state["rng"]) else 0])
        run.iteration = run.saved = state["iteration"]
        if rank < len(state["skipped"]):  # another process count restarts the counts and the log window
            run.skipped, run.meter = state["skipped"][rank], state["meter"][rank].clone()
        if len(state["skipped"]) != dist.world_size():  # and the unreadable share, alike on every rank
            run.since, run.since_skipped = run.iteration, run.skipped
        log.info("%sresuming %s at iteration %d", f"{name}: " if name else "", path, run.iteration)
        if state["config"] != to_yaml(cfg):
            log.warning("resume: the configuration differs from the checkpoint's; the run goes on with the new one")
    if dist.is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / "config.yaml").write_text(to_yaml(cfg))
    return run


def save_run(path, model, optimizer, scaler, iteration: int, cfg, per_rank: dict, **fields) -> None:
    """A training checkpoint, written by rank 0: model, optimizer, scaler, iteration, configuration,
    ``fields``, and every rank's RNG state and ``per_rank`` values, gathered as lists (key -> [rank 0's,
    rank 1's, ...]). Model or optimizer tensors with a NaN or an infinity on any rank are a
    :class:`DivergedError` on every rank, and the checkpoint at ``path`` is left as it was."""
    mine = {"rng": rng_state(), **{k: v.clone() if torch.is_tensor(v) else v for k, v in per_rank.items()}}
    bad = non_finite(_unwrap(model).state_dict()) + non_finite(optimizer.state_dict()["state"])
    ranks, bad = zip(*dist.gather_objects((mine, bad)))
    bad = [name for names in bad for name in names]
    if bad:
        kept = f"{path} keeps the last good state" if os.path.exists(path) else "no checkpoint was written"
        raise DivergedError(f"training diverged: {len(bad)} model or optimizer tensors are not finite at iteration "
                            f"{iteration} (e.g. {bad[:3]}); {kept} (lower optim.lr, or set optim.clip_grad_norm)")
    if dist.is_main():
        save_checkpoint(path, {"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                               "scaler": scaler.state_dict(), "iteration": iteration, "config": to_yaml(cfg),
                               **{k: [r[k] for r in ranks] for k in mine}, **fields})


# ----------------------------------------------------------------------------------------------- jobs


def _without_nonlocal(cfg: Config) -> Config:
    base = copy.deepcopy(cfg)
    base.model.nonlocal_blocks, base.model.nonlocal_preset, base.model.nonlocal_mode = {}, "", None
    return base


def train_job(cfg: Config, out: str | os.PathLike, *, resume: bool = False) -> dict:
    """``nonlocalnet train``: one run into ``out``, or with ``train.compare_baseline`` the network
    without (``out/baseline``) and with (``out/nonlocal``) its non-local blocks. Writes and
    returns ``out/summary.json``: per run top1 / top5 (or mAP) and the others' numbers."""
    keep = ("top1", "top5", "mean_class_accuracy", "mAP", "videos", "videos_without_views", "skipped_views",
            "skipped_train_clips")
    cfg = dataclasses.replace(cfg, model=resolve_model(cfg.model))  # config.yaml: the network as built
    baseline = _without_nonlocal(cfg) if cfg.train.compare_baseline else None
    return run_job(cfg, baseline, out, resume, fit, lambda result: {k: result[k] for k in keep if k in result})


def run_job(cfg, baseline, out: str | os.PathLike, resume: bool, fit_run, summarize) -> dict:
    """One run of ``cfg`` into ``out`` or, given a ``baseline`` configuration, both into
    ``out/baseline`` and ``out/nonlocal``. A run whose ``result.json`` exists under the same
    configuration is not repeated on ``resume``. Writes ``out/summary.json``: {run: summarize(result)}.

    The job holds ``out/.lock`` (rank 0 for all) throughout: a second job into the same ``out`` is
    a :class:`~nonlocalnet.lock.LockedError`. Under the lock, checkpoint temporaries a killed job
    left are removed. ``resume`` into a folder without any run of the job is an error; a run of
    the job without a checkpoint yet starts from iteration 0 (logged)."""
    out = Path(out)
    runs = {"baseline": baseline, "nonlocal": cfg} if baseline is not None else {"model": cfg}
    folders = {name: out / name if baseline is not None else out for name in runs}
    if resume and not any((f / "checkpoint.pt").exists() or (f / "config.yaml").exists() for f in folders.values()):
        raise ValueError(f"out: {out} holds no run to resume; drop --resume to start one")
    summary = {}
    with _job_lock(out):
        if dist.is_main():
            for folder in folders.values():
                for stale in remove_stale_temporaries(folder):
                    log.info("removed %s, left by an interrupted checkpoint write", folder / stale)
        for name, run_cfg in runs.items():
            folder = folders[name]
            done = folder / "result.json"
            if resume and done.exists() and (folder / "config.yaml").read_text() == to_yaml(run_cfg):
                result = json.loads(done.read_text())
                log.info("%s: finished before, result read from %s", name, done)
            else:
                started = (folder / "checkpoint.pt").exists()
                if resume and not started:
                    log.info("%s: no checkpoint in %s yet; it starts from iteration 0", name, folder)
                result = fit_run(run_cfg, folder, resume=resume and started, name=name)
            summary[name] = summarize(result)
        if dist.is_main():
            out.mkdir(parents=True, exist_ok=True)
            _write_atomic(out / "summary.json", json_dumps(summary, indent=1) + "\n")
    return summary


@contextlib.contextmanager
def _job_lock(out: Path):
    """``out/.lock`` held by rank 0 for the block; every rank raises rank 0's :class:`LockedError`."""
    with contextlib.ExitStack() as stack:
        error = None
        if dist.is_main():
            try:
                stack.enter_context(exclusive(out / ".lock", what=f"out: {out}"))
            except LockedError as err:
                error = str(err)
        error = dist.broadcast_object(error)
        if error:
            raise LockedError(error)
        yield


def summary_table(summary: dict) -> str:
    metrics = [m for m in ("top1", "top5", "mean_class_accuracy", "mAP") if any(m in r for r in summary.values())]
    lines = [f"{'model':<10}" + "".join(f"{m:>21}" for m in metrics)]
    for name, row in summary.items():
        values = [row.get(m) for m in metrics]  # None: not measured (null in summary.json)
        lines.append(f"{name:<10}" + "".join(f"{float('nan') if v is None else v:>21.3f}" for v in values))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ trained models


def read_run(path: str | os.PathLike, schema: type, required: Sequence[str], overrides: Sequence[str] = (), *,
             what: str) -> tuple[dict, object]:
    """A training checkpoint and its configuration (of dataclass ``schema``, ``overrides`` merged);
    a file without the keys ``required`` or whose configuration is not a ``schema`` is an error."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    state = load_checkpoint(path)
    for key in ("model", "config", *required):
        if key not in state:
            raise ValueError(f"weights: {os.fspath(path)} is not a nonlocalnet {what} checkpoint (no {key!r})")
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(state["config"])))
    except OmegaConfBaseException as err:
        raise ValueError(f"weights: {os.fspath(path)} is not a nonlocalnet {what} checkpoint "
                         f"({str(err).splitlines()[0]})") from None
    return state, merge_overrides(cfg, overrides)


def load_trained(path: str | os.PathLike, overrides: Sequence[str] = ()) -> tuple[ResNet3d, Config, list[str], bool]:
    """A model from a training checkpoint, with its configuration (``overrides`` merged), class
    names and whether it is multi-label."""
    state, cfg = read_run(path, Config, ("classes",), overrides, what="training")
    if cfg.model.name and cfg.model.stage_blocks is None:  # saved before configs were resolved, when a
        for key in (*_FIELDS, "nonlocal_blocks", "nonlocal_mode"):  # name ignored these fields
            setattr(cfg.model, key, None)
        cfg.model.nonlocal_preset = ""
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.weights = ""
    model = build_model(model_cfg, len(state["classes"]))
    load_model_state(model, state["model"], path, "weights")
    return model.eval(), cfg, list(state["classes"]), bool(state.get("multilabel", False))


def load_model_state(model: nn.Module, state: dict, path: str | os.PathLike, key: str) -> None:
    """``model.load_state_dict(state)`` (from the file ``path``); a state of another model is a
    ValueError starting with ``key`` that names the checkpoint and the keys and shapes that differ."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)}" for k, v in state.items()
              if k in own and v.shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{key}: {os.fspath(path)} does not fit the configured model ({len(shapes)} shapes differ, "
                         f"e.g. {shapes[:3]}; missing {missing[:3]}; unexpected {unexpected[:3]}); keep the "
                         f"checkpoint's model settings")
    model.load_state_dict(state)


def evaluate_checkpoint(checkpoint: str | os.PathLike, cfg: Config | None = None, overrides: Sequence[str] = (), *,
                        clips: int | None = None, crops: int | None = None, batch_size: int = 8) -> dict:
    """``nonlocalnet evaluate``: the multi-view test of a training checkpoint on ``cfg.data.val``
    (default: the configuration saved in the checkpoint, with ``overrides``), or of a zoo model's
    weights file (:func:`load_for_inference`: ``nonlocalnet convert`` output) on ``cfg``'s."""
    trained = _is_training_checkpoint(checkpoint)
    if not trained and cfg is None:
        raise ValueError(f"config: {os.fspath(checkpoint)} holds weights without a data set; pass a config whose "
                         f"data.val to evaluate on")
    model, saved, classes, multilabel = load_trained(checkpoint, () if cfg else overrides) if trained else \
        _load_zoo_weights(checkpoint)
    cfg = cfg or saved
    device = dist.setup()
    val = val_annotations(cfg.data, classes, multilabel)  # data.train is not needed: the classes are the model's
    if val.classes != classes:
        raise ValueError(f"weights: the model's {len(classes)} classes differ from data.val's {len(val.classes)}")
    result = evaluate(model.to(device), eval_dataset(val, cfg.data, clips, crops), batch_size=batch_size,
                      workers=cfg.data.workers, device=device, window=max(1, cfg.data.crop // 32))
    return evaluation_report(result, val.multilabel)


def _is_training_checkpoint(path: str | os.PathLike) -> bool:
    state = load_checkpoint(path, mmap=True)  # the keys only
    return isinstance(state, dict) and {"classes", "config", "model"} <= set(state)


def load_for_inference(path: str | os.PathLike) -> tuple[ResNet3d, Config, list[str], bool]:
    """:func:`load_trained` for a training checkpoint; for a weights file of a zoo model
    (``nonlocalnet convert`` output, ``save_weights(..., model=NAME)``) the model with its saved
    options, the default test (10 clips x 3 crops of 256, at the model's frames and rate) and the
    saved class names (``"0"``, ``"1"``, ... without)."""
    return load_trained(path) if _is_training_checkpoint(path) else _load_zoo_weights(path)


def _load_zoo_weights(path: str | os.PathLike) -> tuple[ResNet3d, Config, list[str], bool]:
    from .models import model_card
    from .weights import read_weights

    payload = read_weights(path, mmap=True)  # names, options and shapes; create_model reads the tensors
    if not payload.get("model") or "pred.weight" not in payload["state_dict"]:
        raise ValueError(f"weights: {os.fspath(path)} is neither a training checkpoint nor a weights file naming its "
                         f"zoo model (nonlocalnet convert output)")
    count = payload["state_dict"]["pred.weight"].shape[0]
    model = create_model(payload["model"], num_classes=count, weights=path)
    card = model_card(payload["model"])
    cfg = Config(model=ModelConfig(name=card.name, options=dict(payload["options"])),
                 data=DataConfig(frames=card.frames, rate=card.rate))
    classes = list(payload["classes"] or [str(i) for i in range(count)])
    return model.eval(), cfg, classes, False


def predict(paths, checkpoint: str | os.PathLike, *, top: int = 5, clips: int | None = None,
            crops: int | None = None) -> list[dict]:
    """Top-``top`` labels with their probabilities for each video, as the trained model's test;
    ``checkpoint``: a training checkpoint or a zoo model's weights file (:func:`load_for_inference`)."""
    model, cfg, classes, multilabel = load_for_inference(checkpoint)
    records = [VideoRecord(os.fspath(p), ()) for p in paths]
    annotations = Annotations(records, classes, multilabel)
    dataset = eval_dataset(annotations, cfg.data, clips, crops)
    result = evaluate(model, dataset, batch_size=4, window=max(1, cfg.data.crop // 32))
    rows = []
    for path, scores, views in zip(paths, result["scores"], result["views"]):
        if views == 0:
            rows.append({"video": os.fspath(path), "error": "no view could be decoded", "top": []})
            continue
        values, indices = scores.topk(min(top, len(classes)))
        rows.append({"video": os.fspath(path), "top": [(classes[i], v) for v, i in zip(values.tolist(),
                                                                                       indices.tolist())]})
    return rows

