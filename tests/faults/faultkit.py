"""Helpers of the fault-injection suite (``from .faultkit import ...``)."""

from nonlocalnet.config import load_config
from nonlocalnet.data.synthetic import SyntheticSpec

TINY_SPEC = SyntheticSpec(train=8, val=4, height=32, width=40, frames=8)


def tiny_overrides(root, **extra) -> list[str]:
    """``--set`` overrides of a run that takes seconds: a width-4 C2D with one non-local block."""
    values = {
        "model.width": 4, "model.stage_blocks": "[1,1,1,1]", "model.stem": "8x8", "model.nonlocal_blocks": "{res3: [0]}",
        "data.dataset": "list", "data.train": root / "train.txt", "data.val": root / "val.txt",
        "data.classes": root / "classes.txt", "data.frames": 4, "data.rate": 2, "data.scales": "[32,36]",
        "data.crop": 32, "data.test_scale": 32, "data.test_crop": 32, "data.test_clips": 1, "data.test_crops": 1,
        "data.workers": 0, "optim.batch_size": 4, "optim.iterations": 4, "optim.lr": 0.05, "optim.steps": "[3]",
        "train.precise_bn": 1, "train.checkpoint_every": 2, "train.log_every": 1, "train.progress": False,
        "train.tensorboard": False, "train.compare_baseline": False,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def tiny_config(root, **extra):
    return load_config(None, tiny_overrides(root, **extra))
