"""Training configuration: dataclasses whose defaults are the paper's Kinetics recipe (docs/paper.md
§4) (:class:`Config`) or the usual COCO detection recipe (:class:`DetectConfig`), read from flat YAML
files (``configs/``) and ``key=value`` overrides.

Merging is strict (OmegaConf structured configs): an unknown key or a value of the wrong type is a
``ValueError`` naming the key. Library code only ever sees the plain dataclasses.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["ModelConfig", "DataConfig", "OptimConfig", "TrainConfig", "Config", "DetectModelConfig",
           "DetectDataConfig", "DetectTrainConfig", "DetectConfig", "load_config", "check_config", "merge_overrides",
           "to_yaml"]


@dataclass
class ModelConfig:
    """The network. ``name`` (a zoo model) gives the defaults of every field left null; a field
    given explicitly overrides the name's value (``depth`` must agree with the name). A run saves
    the resolved configuration: every field as built."""

    name: str = ""  # a zoo name (nonlocalnet models); empty: build ResNet3d from the fields below
    depth: Optional[int] = None  # null: the name's, else 50
    inflation: Optional[str] = None  # c2d | 3x1x1 | 3x3x3; null: the name's, else c2d
    stem: Optional[str] = None  # 32x2 | 8x8 | paper | mmaction2 | slowfast; null: the name's, else 32x2
    width: Optional[int] = None  # null: 64
    stage_blocks: Optional[List[int]] = None  # residual blocks per stage; null: those of the depth
    nonlocal_blocks: Optional[Dict[str, List[int]]] = None  # e.g. {res3: [1, 3], res4: [1, 3, 5]}; {}: none
    nonlocal_preset: str = ""  # nl1 / nl5 / nl10 / res2..res5, instead of nonlocal_blocks
    nonlocal_mode: Optional[str] = None  # null: the name's, else embedded_gaussian
    dropout: float = 0.5  # every paper script
    weights: str = ""  # initial weights: a file from `nonlocalnet convert` / `inflate` / a checkpoint
    # ResNet3d arguments over the above (e.g. {stem: mmaction2}); empty: those saved with `weights`
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    dataset: str = "synthetic"  # synthetic | list | kinetics | folders | charades
    root: str = ""  # videos (synthetic: where the set is written; default ~/.cache/nonlocalnet/synthetic-*)
    train: str = ""  # annotation file (folders: the training root)
    val: str = ""
    classes: str = ""  # class-name file; default from the annotations
    frames: int = 32  # clip length T (32x2: Table 1)
    rate: int = 2  # sampling rate s
    scales: List[int] = field(default_factory=lambda: [256, 320])  # official TRAIN.JITTER_SCALES
    crop: int = 224
    flip: bool = True
    test_scale: int = 256  # official TEST.SCALE
    test_crop: int = 256  # 0: the whole frame, fully convolutional (paper §4.1; test_crops 1)
    test_clips: int = 10  # paper §4.1: 10 clips x 3 crops
    test_crops: int = 3
    workers: int = 4
    # stop when more than this share of the videos is missing or unreadable (of at least 50 drawn; 1: never)
    max_unreadable: float = 0.2
    # synthetic set (dataset: synthetic)
    synthetic_train: int = 960  # videos
    synthetic_val: int = 200
    synthetic_size: List[int] = field(default_factory=lambda: [72, 80])  # height, width
    synthetic_frames: int = 16
    synthetic_seed: int = 0


@dataclass
class OptimConfig:
    batch_size: int = 64  # global: 8 GPUs x 8 clips
    accumulate: int = 1  # micro-batches per step (BN statistics are per micro-batch, as per GPU)
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = True  # official SOLVER.NESTEROV
    weight_decay: float = 1e-4
    decay_biases: bool = False  # the official code decays non-BN biases; BN never (WEIGHT_DECAY_BN 0)
    iterations: int = 400_000
    steps: List[int] = field(default_factory=lambda: [150_000, 300_000])  # LR x gamma at each
    gamma: float = 0.1
    warmup: int = 0  # linear warm-up iterations (the paper has none)
    warmup_factor: float = 0.0  # the LR factor the warm-up starts from (Detectron: 1/3)
    schedule: str = "steps"  # steps | cosine
    clip_grad_norm: float = 0.0  # clip the gradients' global norm to this (0: off)


@dataclass
class TrainConfig:
    seed: int = 0
    amp: str = "none"  # none | bf16 | fp16 (CUDA only)
    precise_bn: int = 200  # training batches for re-estimating BN statistics before evaluation (0: off)
    # population: the official recompute, E[x^2] - E[x]^2 over all those batches; average: PySlowFast's
    # mean of the batch variances (leaves out the spread of the batch means)
    precise_bn_variance: str = "population"
    checkpoint_every: int = 1000
    eval_every: int = 0  # 0: only at the end
    log_every: int = 20
    tensorboard: Optional[bool] = None  # null: if installed; true: required; false: off
    progress: bool = True
    compare_baseline: bool = False  # also train the same network without non-local blocks
    timeout: int = 600  # seconds a torchrun rank waits for the others at a collective before the job stops


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class DetectModelConfig:
    task: str = "mask"  # mask (boxes and masks: Table 5) | keypoint (Table 6)
    depth: int = 50  # ResNet-50 or 101, with FPN
    nonlocal_backbone: bool = True  # one block right before the last res4 block
    nonlocal_head: bool = False  # keypoint: four blocks in the keypoint head
    nonlocal_mode: str = "embedded_gaussian"
    backbone_weights: str = ""  # a torchvision-format ImageNet ResNet state dict (empty: from scratch)
    trainable_layers: int = 3  # torchvision's count of trainable ResNet stages (3: res3-res5, as Detectron)
    weights: str = ""  # initial weights of the whole detector: a detection checkpoint
    min_size: List[int] = field(default_factory=lambda: [800])  # several: one drawn per training batch
    max_size: int = 1333
    detector: Dict[str, Any] = field(default_factory=dict)  # more MaskRCNN / KeypointRCNN keyword arguments


@dataclass
class DetectDataConfig:
    dataset: str = "shapes"  # shapes (made by the package) | coco
    root: str = ""  # shapes: where the set is written (default ~/.cache/nonlocalnet/shapes-*)
    train_images: str = ""  # coco: image folder and annotation file of each split
    train_annotations: str = ""
    val_images: str = ""
    val_annotations: str = ""
    flip: bool = True  # random horizontal flip in training (keypoints: left and right swapped)
    drop_empty: bool = True  # training skips images without annotations (Detectron's filter)
    workers: int = 2
    # stop when more than this share of the images is missing or unreadable (of at least 50 drawn; 1: never)
    max_unreadable: float = 0.2
    shapes_train: int = 64  # images
    shapes_val: int = 16
    shapes_size: List[int] = field(default_factory=lambda: [96, 128])  # height, width
    shapes_seed: int = 0


@dataclass
class DetectTrainConfig:
    seed: int = 0
    amp: str = "none"  # none | bf16 | fp16 (CUDA only)
    checkpoint_every: int = 2000
    eval_every: int = 0  # 0: only at the end
    eval_batch_size: int = 2  # images per process
    log_every: int = 20
    tensorboard: Optional[bool] = None
    progress: bool = True
    compare_baseline: bool = False  # also train the same detector without non-local blocks
    timeout: int = 600  # seconds a torchrun rank waits for the others at a collective before the job stops


def _detect_optim() -> OptimConfig:
    # Detectron's 1x schedule for 16 images per batch (the paper gives no COCO hyperparameters)
    return OptimConfig(batch_size=16, lr=0.02, nesterov=False, iterations=90_000, steps=[60_000, 80_000],
                       warmup=500, warmup_factor=1 / 3)


@dataclass
class DetectConfig:
    model: DetectModelConfig = field(default_factory=DetectModelConfig)
    data: DetectDataConfig = field(default_factory=DetectDataConfig)
    optim: OptimConfig = field(default_factory=_detect_optim)
    train: DetectTrainConfig = field(default_factory=DetectTrainConfig)


def _at_least(low: int, values: dict) -> None:
    """Each ``key: value`` at least ``low`` (1: a positive int, 0: an int >= 0)."""
    for key, value in values.items():
        if value < low:
            raise ValueError(f"{key}: expected {'a positive int' if low == 1 else f'an int >= {low}'}, got {value}")


def _check_share(key: str, value: float) -> None:
    if not 0 <= value <= 1:  # also NaN
        raise ValueError(f"{key}: expected a share in [0, 1] (1: off), got {value}")


def _one_of(key: str, value: str, choices: Sequence[str]) -> None:
    """``value`` is one of ``choices``; otherwise an error naming ``key``, with the closest choice."""
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{key}: expected one of {', '.join(choices)}, got {value!r}{hint}")


def _check_optim(cfg: OptimConfig) -> None:
    _at_least(1, {"optim.batch_size": cfg.batch_size, "optim.accumulate": cfg.accumulate,
                  "optim.iterations": cfg.iterations})
    _at_least(0, {"optim.warmup": cfg.warmup})
    if not cfg.lr > 0:  # also NaN
        raise ValueError(f"optim.lr: expected a learning rate > 0, got {cfg.lr}")
    if not 0 <= cfg.momentum < 1:
        raise ValueError(f"optim.momentum: expected a momentum in [0, 1), got {cfg.momentum}")
    if not cfg.weight_decay >= 0:
        raise ValueError(f"optim.weight_decay: expected a weight decay >= 0, got {cfg.weight_decay}")
    if not cfg.gamma > 0:
        raise ValueError(f"optim.gamma: expected an LR factor > 0, got {cfg.gamma}")
    steps = cfg.steps
    if cfg.schedule == "steps" and (any(b <= a for a, b in zip(steps, steps[1:]))
                                    or any(not 0 < s < cfg.iterations for s in steps)):
        raise ValueError(f"optim.steps: expected increasing iterations between 0 and optim.iterations "
                         f"({cfg.iterations}) at which the LR drops, got {steps}")
    if not 0 <= cfg.warmup_factor <= 1:
        raise ValueError(f"optim.warmup_factor: expected a factor in [0, 1], got {cfg.warmup_factor}")
    if cfg.clip_grad_norm < 0:
        raise ValueError(f"optim.clip_grad_norm: expected a norm >= 0 (0: off), got {cfg.clip_grad_norm}")
    if cfg.schedule not in ("steps", "cosine"):
        raise ValueError(f"optim.schedule: expected 'steps' or 'cosine', got {cfg.schedule!r}")


def _check_amp(amp: str) -> None:
    if amp not in ("none", "bf16", "fp16"):
        raise ValueError(f"train.amp: expected none, bf16 or fp16, got {amp!r}")


def _check_detect(cfg: DetectConfig) -> DetectConfig:
    _check_optim(cfg.optim)
    _check_amp(cfg.train.amp)
    m, d, t = cfg.model, cfg.data, cfg.train
    if m.task not in ("mask", "keypoint"):
        raise ValueError(f"model.task: expected 'mask' or 'keypoint', got {m.task!r}")
    if m.depth not in (50, 101):
        raise ValueError(f"model.depth: expected 50 or 101, got {m.depth}")
    if m.nonlocal_head and m.task != "keypoint":
        raise ValueError("model.nonlocal_head: the head blocks belong to the keypoint head (model.task: keypoint)")
    if not m.min_size or min(m.min_size) < 1 or m.max_size < max(m.min_size):
        raise ValueError(f"model.min_size: expected positive sizes up to model.max_size ({m.max_size}), "
                         f"got {m.min_size}")
    _one_of("data.dataset", d.dataset, ("shapes", "coco"))
    if len(d.shapes_size) != 2 or min(d.shapes_size) < 32:
        raise ValueError(f"data.shapes_size: expected [height, width] of at least 32, got {d.shapes_size}")
    _at_least(1, {"data.shapes_train": d.shapes_train, "data.shapes_val": d.shapes_val,
                  "train.checkpoint_every": t.checkpoint_every, "train.log_every": t.log_every,
                  "train.eval_batch_size": t.eval_batch_size, "train.timeout": t.timeout})
    _at_least(0, {"data.workers": d.workers, "train.eval_every": t.eval_every})
    _check_share("data.max_unreadable", d.max_unreadable)
    return cfg


def check_config(cfg: Config | DetectConfig) -> Config | DetectConfig:
    """Values a run cannot use, named by their key."""
    if isinstance(cfg, DetectConfig):
        return _check_detect(cfg)
    _check_optim(cfg.optim)
    _one_of("data.dataset", cfg.data.dataset, ("synthetic", "list", "kinetics", "folders", "charades"))
    _at_least(1, {"data.frames": cfg.data.frames, "data.rate": cfg.data.rate, "data.crop": cfg.data.crop,
                  "data.test_scale": cfg.data.test_scale, "data.test_clips": cfg.data.test_clips, "train.checkpoint_every": cfg.train.checkpoint_every,
                  "train.log_every": cfg.train.log_every, "model.width": 1 if cfg.model.width is None else cfg.model.width,
                  "train.timeout": cfg.train.timeout})
    _at_least(0, {"data.workers": cfg.data.workers, "train.precise_bn": cfg.train.precise_bn,
                  "train.eval_every": cfg.train.eval_every, "data.test_crop": cfg.data.test_crop})
    _check_share("data.max_unreadable", cfg.data.max_unreadable)
    if cfg.data.test_crop == 0 and cfg.data.test_crops != 1:
        raise ValueError(f"data.test_crops: the whole frame (data.test_crop 0) is one view per clip: expected 1, "
                         f"got {cfg.data.test_crops}")
    if cfg.data.test_crops not in (1, 3):
        raise ValueError(f"data.test_crops: expected 1 or 3, got {cfg.data.test_crops}")
    if len(cfg.data.scales) != 2 or not 0 < cfg.data.scales[0] <= cfg.data.scales[1] or cfg.data.crop > cfg.data.scales[0]:
        raise ValueError(f"data.scales: expected [low, high] with data.crop ({cfg.data.crop}) <= low <= high, "
                         f"got {cfg.data.scales}")
    if cfg.data.test_crop > cfg.data.test_scale:
        raise ValueError(f"data.test_crop: expected at most data.test_scale ({cfg.data.test_scale}), "
                         f"got {cfg.data.test_crop}")
    if cfg.train.precise_bn_variance not in ("population", "average"):
        raise ValueError(f"train.precise_bn_variance: expected 'population' or 'average', "
                         f"got {cfg.train.precise_bn_variance!r}")
    if not 0 <= cfg.model.dropout < 1:
        raise ValueError(f"model.dropout: expected a probability in [0, 1), got {cfg.model.dropout}")
    _check_amp(cfg.train.amp)
    return cfg


def _yaml_problem(err: Exception, where: bool = True) -> str:
    """A YAML parser error on one line: what (and ``where`` in the file)."""
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if where and mark is not None else ""
    return f"malformed YAML ({getattr(err, 'problem', None) or str(err).splitlines()[0]}{where})"


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = (), schema: type = Config):
    """Defaults of ``schema`` (:class:`Config` or :class:`DetectConfig`), then the YAML file at
    ``path``, then ``key=value`` overrides (``optim.lr=0.005``); checked with :func:`check_config`.
    A mapping the file gives (``model.options``) replaces the default's."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    merged = OmegaConf.structured(schema)
    if path is not None:
        name = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config: no such file {name!r}")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            top = yaml.safe_load(text)
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            problem = _yaml_problem(err) if isinstance(err, yaml.YAMLError) else "not a UTF-8 text file"
            raise ValueError(f"config in {name}: {problem}") from None
        if top is not None and not isinstance(top, dict):
            raise ValueError(f"config in {name}: expected sections ({', '.join(merged)}) at the top level, got a "
                             f"{type(top).__name__}")
        for section, values in (top or {}).items():
            if section in merged and values is not None and not isinstance(values, dict):
                raise ValueError(f"config in {name}: {section}: expected a mapping of {section}.* settings, got "
                                 f"{values!r}")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.create(text))
        except OmegaConfBaseException as err:
            raise ValueError(f"config in {name}: {str(err).splitlines()[0]} "
                             f"(key: {getattr(err, 'full_key', '?')})") from None
    return merge_overrides(OmegaConf.to_object(merged), overrides)


def merge_overrides(config: Config, overrides: Sequence[str]) -> Config:
    """``key=value`` overrides on an existing configuration (a checkpoint's), in order. A value
    replaces the key's (``model.nonlocal_blocks={res4: [0]}`` drops the file's res3 blocks); only a
    whole section (``model={name: ...}``) merges into the section."""
    import yaml
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    bad = [o for o in overrides if not o.partition("=")[0] or "=" not in o]
    if bad:
        raise ValueError(f"overrides: expected key=value, got {bad}")
    merged = OmegaConf.structured(config)
    for override in overrides:
        key = override.partition("=")[0]
        try:
            override.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes of a file name: no config file could hold it
            raise ValueError(f"overrides: the value of {key} is not UTF-8 text ({ascii(override.partition('=')[2])}); "
                             f"rename the file or folder it names") from None
        try:
            value = OmegaConf.select(OmegaConf.from_dotlist([override]), key)
        except yaml.YAMLError as err:
            raise ValueError(f"overrides: {override!r}: {_yaml_problem(err, where=False)} (key: {key})") from None
        try:
            node = OmegaConf.select(merged, key)
            section = isinstance(node, DictConfig) and OmegaConf.get_type(node) not in (dict, None)
            OmegaConf.update(merged, key, value, merge=section)
        except OmegaConfBaseException as err:
            raise ValueError(f"overrides: {str(err).splitlines()[0]} "
                             f"(key: {getattr(err, 'full_key', None) or key})") from None
    try:
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ValueError(f"overrides: {str(err).splitlines()[0]} (key: {getattr(err, 'full_key', '?')})") from None
    return check_config(config)


def to_yaml(config: Config) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(asdict(config)))
