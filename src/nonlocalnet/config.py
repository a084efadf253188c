"""Training configuration: dataclasses whose defaults are the paper's Kinetics recipe (shared/PAPER.md
§3), read from flat YAML files (``configs/``) and ``key=value`` overrides.

Merging is strict (OmegaConf structured configs): an unknown key or a value of the wrong type is a
``ValueError`` naming the key. Library code only ever sees the plain dataclasses.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

__all__ = ["ModelConfig", "DataConfig", "OptimConfig", "TrainConfig", "Config", "load_config", "to_yaml"]


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
    root: str = ""  # videos (synthetic: where the set is written; default OUT/../synthetic-data)
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


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file at ``path``, then ``key=value`` overrides (``optim.lr=0.005``)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    merged = OmegaConf.structured(Config)
    try:
        if path is not None:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"config: no such file {os.fspath(path)!r}")
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ValueError(f"overrides: expected key=value, got {bad}")
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        source = f" in {os.fspath(path)}" if path is not None else ""
        raise ValueError(f"config{source}: {str(err).splitlines()[0]} (key: {getattr(err, 'full_key', '?')})") from None


def to_yaml(config: Config) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(asdict(config)))
