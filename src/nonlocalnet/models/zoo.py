"""The model zoo: every named model of the paper's Table 2 and the official model zoo, as data.

A name reads ``{c2d|i3d}[_nl{1|5|10}]_r{50|101}[_{input}]``:

- ``c2d``: every conv 1 x k x k (Table 1); ``i3d``: the official I3D 3x1x1 (``inflation="3x3x3"``
  as an override builds the paper's other I3D, Table 2e).
- ``nl1`` / ``nl5`` / ``nl10``: non-local blocks (embedded Gaussian, official settings) after
  these residual blocks (0-based, a block's index within its stage):

  ====== ============================ ==================================================
  blocks R50                          R101
  ====== ============================ ==================================================
  1      res4: 4 ("right before the   res4: 21
         last residual block of res4")
  5      res3: 1, 3; res4: 1, 3, 5    res3: 1, 3; res4: 6, 13, 20 (official code)
  10     res3: 0-3; res4: 0-5         res3: 0-3; res4: 3, 7, 11, 15, 19, 22 (ours, below)
  ====== ============================ ==================================================

  The paper adds the R101 10 blocks "to the corresponding residual blocks" and the official code
  cannot build them (its R101 rule gives 9), so we define them: all of res3, and in res4 the last
  block of each of six near-equal runs of its 23 blocks, as the R50 model has one per block.
- input setting (default ``32x2``): ``32x2`` = 32 frames at stride 2 (the paper's models, official
  ``resnet_video_org``); ``8x8`` = 8 frames at stride 8 (official ``resnet_video``); ``128x1``
  = 128 consecutive frames (Table 2g) and ``32x4`` (official zoo) with every BN frozen into an
  affine and the official frozen-BN non-local blocks: no BN (W_z zero-initialised) and res3
  attention within groups of 4 frames.

Cards hold the paper's Kinetics-400 val top-1/top-5 (docs/paper.md §6; Table 2g for 128x1),
the official release's (its README's model zoo, with the checkpoint file), and the cost computed by our
counter (:func:`nonlocalnet.flops.model_report`; tests recount every card). FLOPs are
2 x multiply-adds; the paper's "FLOPs" (34.2B for R101 C2D, Table 2e) count multiply-adds.
"""

from __future__ import annotations

from dataclasses import dataclass

from .resnet3d import NONLOCAL_PRESETS

__all__ = ["ModelCard", "CARDS", "NONLOCAL_POSITIONS", "INPUTS", "DEFAULT_INPUT"]

NONLOCAL_POSITIONS: dict[tuple[int, int], dict[str, tuple[int, ...]]] = {
    (depth, count): NONLOCAL_PRESETS[f"nl{count}"][depth] for depth in (50, 101) for count in (1, 5, 10)
}


@dataclass(frozen=True)
class InputSetting:
    frames: int
    rate: int  # sampling stride in the source video
    stem: str  # ResNet3d stem
    frozen_bn: bool


INPUTS = {
    "32x2": InputSetting(32, 2, "32x2", False),
    "8x8": InputSetting(8, 8, "8x8", False),
    "128x1": InputSetting(128, 1, "32x2", True),
    "32x4": InputSetting(32, 4, "8x8", True),
}
DEFAULT_INPUT = "32x2"

# (arch, blocks, depth, input) -> (top-1, top-5, where). Kinetics-400 val, the paper's Tables 2 and 3.
PAPER = {
    ("c2d", 0, 50, "32x2"): (71.8, 89.7, "Table 2c"),
    ("c2d", 1, 50, "32x2"): (72.7, 90.5, "Table 2c"),
    ("c2d", 5, 50, "32x2"): (73.8, 91.0, "Table 2c"),
    ("c2d", 10, 50, "32x2"): (74.3, 91.2, "Table 2c"),
    ("c2d", 0, 101, "32x2"): (73.1, 91.0, "Table 2c"),
    ("c2d", 1, 101, "32x2"): (74.3, 91.3, "Table 2c"),
    ("c2d", 5, 101, "32x2"): (75.1, 91.7, "Table 2c"),
    ("c2d", 10, 101, "32x2"): (75.1, 91.6, "Table 2c"),
    ("i3d", 0, 50, "32x2"): (73.3, 90.7, "Table 2f"),
    ("i3d", 5, 50, "32x2"): (74.9, 91.6, "Table 2f"),
    ("i3d", 0, 101, "32x2"): (74.4, 91.1, "Table 2f"),
    ("i3d", 5, 101, "32x2"): (76.0, 92.1, "Table 2f"),
    ("c2d", 0, 50, "128x1"): (73.8, 91.2, "Table 2g"),
    ("i3d", 0, 50, "128x1"): (74.9, 91.7, "Table 2g"),
    ("i3d", 5, 50, "128x1"): (76.5, 92.6, "Table 2g"),
    ("c2d", 0, 101, "128x1"): (75.3, 91.8, "Table 2g"),
    ("i3d", 0, 101, "128x1"): (76.4, 92.7, "Table 2g"),
    ("i3d", 5, 101, "128x1"): (77.7, 93.3, "Table 2g"),
}

# The official release (README of facebookresearch/video-nonlocal-net): top-1, top-5, checkpoint.
OFFICIAL = {
    ("c2d", 0, 50, "32x2"): (72.0, 90.0, "c2d_baseline_32x2_IN_pretrain_400k.pkl"),
    ("c2d", 5, 50, "32x2"): (73.9, 91.0, "c2d_nonlocal_32x2_IN_pretrain_400k.pkl"),
    ("i3d", 0, 50, "32x2"): (73.6, 90.8, "i3d_baseline_32x2_IN_pretrain_400k.pkl"),
    ("i3d", 5, 50, "32x2"): (74.9, 91.6, "i3d_nonlocal_32x2_IN_pretrain_400k.pkl"),
    ("i3d", 0, 50, "128x1"): (75.2, 92.0, "i3d_baseline_128x1_I3D_pretrain_400k.pkl"),
    ("i3d", 5, 50, "128x1"): (76.5, 92.7, "i3d_nonlocal_128x1_I3D_pretrain_400k.pkl"),
    ("c2d", 0, 50, "8x8"): (71.9, 90.0, "c2d_baseline_8x8_IN_pretrain_400k.pkl"),
    ("c2d", 5, 50, "8x8"): (74.4, 91.4, "c2d_nonlocal_8x8_IN_pretrain_400k.pkl"),
    ("i3d", 0, 50, "8x8"): (73.4, 90.9, "i3d_baseline_8x8_IN_pretrain_400k.pkl"),
    ("i3d", 5, 50, "8x8"): (74.7, 91.6, "i3d_nonlocal_8x8_IN_pretrain_400k.pkl"),
    ("i3d", 0, 50, "32x4"): (75.5, 92.0, "i3d_baseline_32x4_I3D_pretrain_400k.pkl"),
    ("i3d", 5, 50, "32x4"): (76.5, 92.6, "i3d_nonlocal_32x4_I3D_pretrain_400k.pkl"),
}

# name -> (parameters, conv/fc weights, GFLOPs of one frames x 224^2 view, of one frames x 256^2
# view), 400 classes, computed by nonlocalnet.flops.model_report (tests/test_zoo.py recounts them).
COSTS = {
    "c2d_r50": (24327632, 24274112, 40.47, 52.92),
    "c2d_nl1_r50": (26429392, 26371264, 42.84, 56.14),
    "c2d_nl5_r50": (31686096, 31614144, 56.72, 76.54),
    "c2d_nl10_r50": (39044560, 38954176, 72.98, 100.17),
    "i3d_r50": (28043472, 27989952, 65.66, 85.86),
    "i3d_nl1_r50": (30145232, 30087104, 68.03, 89.08),
    "i3d_nl5_r50": (35401936, 35329984, 81.92, 109.48),
    "i3d_nl10_r50": (42760400, 42670016, 98.17, 133.1),
    "c2d_r101": (43319760, 43214016, 70.17, 91.71),
    "c2d_nl1_r101": (45421520, 45311168, 72.53, 94.93),
    "c2d_nl5_r101": (50678224, 50554048, 86.42, 115.33),
    "c2d_nl10_r101": (58036688, 57894080, 102.68, 138.95),
    "i3d_r101": (51754192, 51648448, 102.76, 134.31),
    "i3d_nl1_r101": (53855952, 53745600, 105.13, 137.53),
    "i3d_nl5_r101": (59112656, 58988480, 119.01, 157.93),
    "i3d_nl10_r101": (66471120, 66328512, 135.27, 181.55),
    "c2d_r50_8x8": (24327632, 24274112, 38.58, 50.45),
    "c2d_nl1_r50_8x8": (26429392, 26371264, 40.95, 53.68),
    "c2d_nl5_r50_8x8": (31686096, 31614144, 54.83, 74.08),
    "c2d_nl10_r50_8x8": (39044560, 38954176, 71.09, 97.7),
    "i3d_r50_8x8": (28043472, 27989952, 56.22, 73.52),
    "i3d_nl1_r50_8x8": (30145232, 30087104, 58.59, 76.75),
    "i3d_nl5_r50_8x8": (35401936, 35329984, 72.47, 97.15),
    "i3d_nl10_r50_8x8": (42760400, 42670016, 88.73, 120.77),
    "c2d_r101_8x8": (43319760, 43214016, 68.28, 89.24),
    "c2d_nl1_r101_8x8": (45421520, 45311168, 70.65, 92.46),
    "c2d_nl5_r101_8x8": (50678224, 50554048, 84.53, 112.87),
    "c2d_nl10_r101_8x8": (58036688, 57894080, 100.79, 136.49),
    "i3d_r101_8x8": (51754192, 51648448, 93.32, 121.98),
    "i3d_nl1_r101_8x8": (53855952, 53745600, 95.69, 125.2),
    "i3d_nl5_r101_8x8": (59112656, 58988480, 109.57, 145.6),
    "i3d_nl10_r101_8x8": (66471120, 66328512, 125.83, 169.22),
    "c2d_r50_128x1": (24327632, 24274112, 161.86, 211.68),
    "c2d_nl1_r50_128x1": (26427344, 26371264, 175.12, 231.01),
    "c2d_nl5_r50_128x1": (31677904, 31614144, 238.22, 325.49),
    "c2d_nl10_r50_128x1": (39028176, 38954176, 314.57, 439.31),
    "i3d_r50_128x1": (28043472, 27989952, 262.63, 343.42),
    "i3d_nl1_r50_128x1": (30143184, 30087104, 275.89, 362.75),
    "i3d_nl5_r50_128x1": (35393744, 35329984, 338.99, 457.24),
    "i3d_nl10_r50_128x1": (42744016, 42670016, 415.34, 571.05),
    "c2d_r101_128x1": (43319760, 43214016, 280.66, 366.83),
    "c2d_nl1_r101_128x1": (45419472, 45311168, 293.91, 386.16),
    "c2d_nl5_r101_128x1": (50670032, 50554048, 357.01, 480.65),
    "c2d_nl10_r101_128x1": (58020304, 57894080, 433.36, 594.47),
    "i3d_r101_128x1": (51754192, 51648448, 411.02, 537.23),
    "i3d_nl1_r101_128x1": (53853904, 53745600, 424.28, 556.56),
    "i3d_nl5_r101_128x1": (59104464, 58988480, 487.37, 651.05),
    "i3d_nl10_r101_128x1": (66454736, 66328512, 563.72, 764.86),
    "c2d_r50_32x4": (24327632, 24274112, 154.31, 201.81),
    "c2d_nl1_r50_32x4": (26427344, 26371264, 167.57, 221.14),
    "c2d_nl5_r50_32x4": (31677904, 31614144, 230.66, 315.63),
    "c2d_nl10_r50_32x4": (39028176, 38954176, 307.01, 429.45),
    "i3d_r50_32x4": (28043472, 27989952, 224.87, 294.09),
    "i3d_nl1_r50_32x4": (30143184, 30087104, 238.13, 313.42),
    "i3d_nl5_r50_32x4": (35393744, 35329984, 301.22, 407.91),
    "i3d_nl10_r50_32x4": (42744016, 42670016, 377.57, 521.73),
    "c2d_r101_32x4": (43319760, 43214016, 273.1, 356.97),
    "c2d_nl1_r101_32x4": (45419472, 45311168, 286.36, 376.3),
    "c2d_nl5_r101_32x4": (50670032, 50554048, 349.45, 470.78),
    "c2d_nl10_r101_32x4": (58020304, 57894080, 425.8, 584.6),
    "i3d_r101_32x4": (51754192, 51648448, 373.26, 487.9),
    "i3d_nl1_r101_32x4": (53853904, 53745600, 386.51, 507.23),
    "i3d_nl5_r101_32x4": (59104464, 58988480, 449.61, 601.72),
    "i3d_nl10_r101_32x4": (66454736, 66328512, 525.96, 715.54),
}


@dataclass(frozen=True)
class ModelCard:
    """What a zoo name builds and what is known about it."""

    name: str
    arch: str  # "c2d" or "i3d"
    depth: int  # 50 or 101
    nonlocal_count: int  # 0, 1, 5 or 10
    input: str  # "32x2", "8x8", "128x1" or "32x4"
    frames: int
    rate: int
    frozen_bn: bool
    paper: tuple[float, float, str] | None  # top-1, top-5, table
    official: tuple[float, float, str] | None  # top-1, top-5, checkpoint file
    params: int
    weights: int  # conv and fc weights: the official counter's "params" (43.2M for R101 C2D)
    gflops: float  # one training view, frames x 224 x 224
    test_gflops: float  # one test view, frames x 256 x 256 (the official 3-crop test)

    def model_kwargs(self) -> dict:
        """Arguments of :class:`nonlocalnet.models.ResNet3d` for this model."""
        setting = INPUTS[self.input]
        kwargs = dict(
            depth=self.depth, inflation="c2d" if self.arch == "c2d" else "3x1x1", stem=setting.stem,
            frozen_bn=setting.frozen_bn,
        )
        if self.nonlocal_count:
            kwargs["nonlocal_blocks"] = dict(NONLOCAL_POSITIONS[self.depth, self.nonlocal_count])
            if setting.frozen_bn:  # official USE_AFFINE: NONLOCAL.USE_BN False, grouped res3
                kwargs["nonlocal_options"] = {"norm": False}
                kwargs["nonlocal_stage_options"] = {"res3": {"group_size": 4}}
        return kwargs

    @property
    def input_shape(self) -> tuple[int, int, int, int, int]:
        """One training view (1, 3, frames, 224, 224)."""
        return (1, 3, self.frames, 224, 224)


def card_name(arch: str, count: int, depth: int, setting: str) -> str:
    nl = f"_nl{count}" if count else ""
    suffix = "" if setting == DEFAULT_INPUT else f"_{setting}"
    return f"{arch}{nl}_r{depth}{suffix}"


def _cards() -> dict[str, ModelCard]:
    cards = {}
    for setting, spec in INPUTS.items():
        for depth in (50, 101):
            for arch in ("c2d", "i3d"):
                for count in (0, 1, 5, 10):
                    key = (arch, count, depth, setting)
                    name = card_name(*key)
                    params, weights, gflops, test_gflops = COSTS[name]
                    cards[name] = ModelCard(
                        name, arch, depth, count, setting, spec.frames, spec.rate, spec.frozen_bn,
                        PAPER.get(key), OFFICIAL.get(key), params, weights, gflops, test_gflops,
                    )
    return cards


CARDS: dict[str, ModelCard] = _cards()
