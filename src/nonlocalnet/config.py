"""Training configuration: dataclasses whose defaults are the paper's Kinetics recipe (shared/PAPER.md
§3), read from flat YAML files (``configs/``) and ``key=value`` overrides.

Merging is strict (OmegaConf structured configs): an unknown key or a value of the wrong type is a
``ValueError`` naming the key. Library code only ever sees the plain dataclasses.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

__all__ = ["ModelConfig", "DataConfig", "OptimConfig", "TrainConfig", "Config", "load_config", "check_config",
           "merge_overrides", "to_yaml"]


@dataclass
class ModelConfig:
    name: str = ""  # a zoo name (nonlocalnet models); empty: build ResNet3d from the fields below
    depth: int = 50
    inflation: str = "c2d"
    stem: str = "32x2"
    width: int = 64
    stage_blocks: Optional[List[int]] = None
    nonlocal_blocks: Dict[str, List[int]] = field(default_factory=dict)  # e.g. {res3: [1, 3], res4: [1, 3, 5]}
    nonlocal_preset: str = ""  # nl1 / nl5 / nl10 / res2..res5, instead of nonlocal_blocks
    nonlocal_mode: str = "embedded_gaussian"
    dropout: float = 0.5  # every paper script
    weights: str = ""  # initial weights: a file from `nonlocalnet convert` / `inflate` / a checkpoint


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
    test_crop: int = 256
    test_clips: int = 10  # paper §4.1: 10 clips x 3 crops
    test_crops: int = 3
    workers: int = 4
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
    schedule: str = "steps"  # steps | cosine


@dataclass
class TrainConfig:
    seed: int = 0
    amp: str = "none"  # none | bf16 | fp16 (CUDA only)
    precise_bn: int = 200  # training batches for re-estimating BN statistics before evaluation (0: off)
    checkpoint_every: int = 1000
    eval_every: int = 0  # 0: only at the end
    log_every: int = 20
    tensorboard: Optional[bool] = None  # null: if installed; true: required; false: off
    progress: bool = True
    compare_baseline: bool = False  # also train the same network without non-local blocks


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def check_config(cfg: Config) -> Config:
    """Values a run cannot use, named by their key."""
    positive = {"data.frames": cfg.data.frames, "data.rate": cfg.data.rate, "data.crop": cfg.data.crop,
                "data.test_scale": cfg.data.test_scale, "data.test_crop": cfg.data.test_crop,
                "data.test_clips": cfg.data.test_clips, "optim.batch_size": cfg.optim.batch_size,
                "optim.accumulate": cfg.optim.accumulate, "optim.iterations": cfg.optim.iterations,
                "train.checkpoint_every": cfg.train.checkpoint_every, "train.log_every": cfg.train.log_every,
                "model.width": cfg.model.width}
    for key, value in positive.items():
        if value < 1:
            raise ValueError(f"{key}: expected a positive int, got {value}")
    for key, value in {"data.workers": cfg.data.workers, "train.precise_bn": cfg.train.precise_bn,
                       "train.eval_every": cfg.train.eval_every, "optim.warmup": cfg.optim.warmup}.items():
        if value < 0:
            raise ValueError(f"{key}: expected an int >= 0, got {value}")
    if cfg.data.test_crops not in (1, 3):
        raise ValueError(f"data.test_crops: expected 1 or 3, got {cfg.data.test_crops}")
    if len(cfg.data.scales) != 2 or not 0 < cfg.data.scales[0] <= cfg.data.scales[1] or cfg.data.crop > cfg.data.scales[0]:
        raise ValueError(f"data.scales: expected [low, high] with data.crop ({cfg.data.crop}) <= low <= high, "
                         f"got {cfg.data.scales}")
    if cfg.data.test_crop > cfg.data.test_scale:
        raise ValueError(f"data.test_crop: expected at most data.test_scale ({cfg.data.test_scale}), "
                         f"got {cfg.data.test_crop}")
    if not 0 <= cfg.model.dropout < 1:
        raise ValueError(f"model.dropout: expected a probability in [0, 1), got {cfg.model.dropout}")
    if cfg.train.amp not in ("none", "bf16", "fp16"):
        raise ValueError(f"train.amp: expected none, bf16 or fp16, got {cfg.train.amp!r}")
    return cfg


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file at ``path``, then ``key=value`` overrides (``optim.lr=0.005``);
    checked with :func:`check_config`."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    merged = OmegaConf.structured(Config)
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config: no such file {os.fspath(path)!r}")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        except OmegaConfBaseException as err:
            raise ValueError(f"config in {os.fspath(path)}: {str(err).splitlines()[0]} "
                             f"(key: {getattr(err, 'full_key', '?')})") from None
    return merge_overrides(OmegaConf.to_object(merged), overrides)


def merge_overrides(config: Config, overrides: Sequence[str]) -> Config:
    """``key=value`` overrides on an existing configuration (a checkpoint's)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"overrides: expected key=value, got {bad}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(config), OmegaConf.from_dotlist(list(overrides)))
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ValueError(f"overrides: {str(err).splitlines()[0]} (key: {getattr(err, 'full_key', '?')})") from None
    return check_config(config)


def to_yaml(config: Config) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(asdict(config)))
