"""ResNet-50/101 for video: C2D and I3D backbones with non-local blocks (paper §4, Table 1).

The layout follows the official Caffe2 builders (docs/paper.md §3), and the module names follow
its blob names so that checkpoints map one to one: ``conv1``/``res_conv1_bn`` (stem),
``res2``..``res5`` (stages of :class:`Bottleneck3d` with ``branch2a``/``branch2b``/``branch2c``,
their ``*_bn``, and the projection ``branch1``/``branch1_bn``), a non-local block after a residual
block as that block's ``nonlocal_block`` (``res4.5.nonlocal_block.theta.weight`` is the official
``nonlocal_conv4_5_theta_w``), and the classifier ``pred``.

Stems (``stem``):
- ``"32x2"`` (official ``resnet_video_org``, the paper's models): conv1 temporal stride 2, pool1
  [2,3,3] stride [2,2,2], pool2 [2,1,1] stride [2,1,1]; 32 frames give T = 8 at res2, 4 from res3.
- ``"8x8"`` (official ``resnet_video``): conv1 temporal stride 1, pool1 [1,3,3] stride [1,2,2],
  pool2 [2,1,1] stride [2,1,1]; 8 frames give the same map sizes from res2 on.
pool1 has no spatial padding, so a 224 input gives 55 x 55 at res2 as in the official code (the
paper's table says 56); res3..res5 are 28, 14, 7 either way.
- ``"paper"`` (Table 1 as printed): conv1 temporal stride 2, pool1 3x3x3 stride 2 and pool2 3x1x1
  stride [2,1,1], both padded by 1 where the kernel is 3; 32 frames give 8 x 56 x 56 at res2 and
  4 x 56 x 56 after pool2. Its weights are those of ``"32x2"`` (the pools have none).
Two more stems carry other libraries' trained models (``nonlocalnet convert --from ...``):
- ``"mmaction2"`` (mmaction2 ``ResNet3d`` I3D, its 32x2 models): conv1 temporal stride 2, pool1
  [1,3,3] stride [2,2,2] padded [0,1,1], pool2 [2,1,1]; 32 frames give T = 8 at res2, 56 x 56.
- ``"slowfast"`` (PySlowFast ``ResNet`` C2D/I3D, its 8x8 models): conv1 temporal stride 1, pool1
  [1,3,3] stride [1,2,2] padded [0,1,1], pool2 [2,1,1] after res2.

Normalisation (``frozen_bn``): BatchNorm with the official epsilon 1.0000001e-5 and PyTorch
momentum 0.1 (Caffe2's 0.9), or, as the official ``MODEL.USE_AFFINE`` models (128x1, 32x4), a
per-channel scale and shift without statistics (:class:`Affine3d`) under the same names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

from ..block import NonLocalBlock

BN_EPS = 1.0000001e-5  # official MODEL.BN_EPSILON and NONLOCAL.BN_EPSILON
DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
STAGES = ("res2", "res3", "res4", "res5")
INFLATIONS = ("c2d", "3x1x1", "3x3x3")
STEMS = {
    # conv1 stride, pool1 (kernel, stride, padding), pool2 (kernel, stride, padding)
    "32x2": ((2, 2, 2), ((2, 3, 3), (2, 2, 2), (0, 0, 0)), ((2, 1, 1), (2, 1, 1), (0, 0, 0))),
    "8x8": ((1, 2, 2), ((1, 3, 3), (1, 2, 2), (0, 0, 0)), ((2, 1, 1), (2, 1, 1), (0, 0, 0))),
    "paper": ((2, 2, 2), ((3, 3, 3), (2, 2, 2), (1, 1, 1)), ((3, 1, 1), (2, 1, 1), (1, 0, 0))),
    "mmaction2": ((2, 2, 2), ((1, 3, 3), (2, 2, 2), (0, 1, 1)), ((2, 1, 1), (2, 1, 1), (0, 0, 0))),
    "slowfast": ((1, 2, 2), ((1, 3, 3), (1, 2, 2), (0, 1, 1)), ((2, 1, 1), (2, 1, 1), (0, 0, 0))),
}
OFFICIAL_PIXELS = (114.75, 57.375)  # official MODEL.MEAN / MODEL.STD: what the data pipeline gives


# Non-local positions (residual blocks followed by a block, 0-based within the stage) of the
# paper's models, by preset and depth. "nl1" and "res2".."res5": one block "right before the last
# residual block" of that stage (Tables 2a-2b); "nl5": the official code's; "nl10": every block
# of res3 and res4 for R50; for R101 the paper gives no positions and the code cannot build 10,
# so we take all of res3 and the last block of each of six near-equal runs of res4's 23.
NONLOCAL_PRESETS: dict[str, dict[int, dict[str, tuple[int, ...]]]] = {
    "nl1": {50: {"res4": (4,)}, 101: {"res4": (21,)}},
    "nl5": {50: {"res3": (1, 3), "res4": (1, 3, 5)}, 101: {"res3": (1, 3), "res4": (6, 13, 20)}},
    "nl10": {50: {"res3": (0, 1, 2, 3), "res4": (0, 1, 2, 3, 4, 5)},
             101: {"res3": (0, 1, 2, 3), "res4": (3, 7, 11, 15, 19, 22)}},
    "res2": {50: {"res2": (1,)}, 101: {"res2": (1,)}},
    "res3": {50: {"res3": (2,)}, 101: {"res3": (2,)}},
    "res4": {50: {"res4": (4,)}, 101: {"res4": (21,)}},
    "res5": {50: {"res5": (1,)}, 101: {"res5": (1,)}},
}


def inflated_blocks(depth: int | Sequence[int]) -> dict[str, tuple[int, ...]]:
    """Which residual blocks carry a temporal kernel of 3 in I3D (official ``obtain_arc``): every
    other block, res2 entirely, res5 only its middle block. ``depth``: 50, 101 or blocks per stage."""
    counts = DEPTHS[depth] if isinstance(depth, int) else tuple(depth)
    return {
        "res2": tuple(range(counts[0])),
        "res3": tuple(range(0, counts[1], 2)),
        "res4": tuple(range(0, counts[2], 2)),
        "res5": (counts[3] // 2,),
    }


class Affine3d(nn.Module):
    """y = weight * x + bias per channel: a batch norm frozen into its affine form (official
    ``AffineNd``). Scale and shift stay learnable; there are no statistics to update."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return torch.addcmul(self.bias.view(shape), x, self.weight.view(shape))

    def extra_repr(self) -> str:
        return str(self.num_features)


def _norm(channels: int, frozen: bool, eps: float = BN_EPS) -> nn.Module:
    return Affine3d(channels) if frozen else nn.BatchNorm3d(channels, eps=eps)


class Bottleneck3d(nn.Module):
    """Residual bottleneck 1x1x1 -> 1x3x3 (spatial stride here) -> 1x1x1, each conv with BN.

    ``temporal_a`` / ``temporal_b``: temporal kernel (1 or 3, padded to keep T) of branch2a (the
    paper's I3D 3x1x1) or branch2b (I3D 3x3x3). A projection shortcut ``branch1`` is used when the
    channels or the stride change. ``nonlocal_block``, when set, is applied after the final ReLU.
    """

    def __init__(self, in_channels: int, inner: int, out_channels: int, stride: int, temporal_a: int = 1,
                 temporal_b: int = 1, frozen_bn: bool = False, bn_eps: float = BN_EPS):
        super().__init__()
        self.branch2a = nn.Conv3d(in_channels, inner, (temporal_a, 1, 1), padding=(temporal_a // 2, 0, 0), bias=False)
        self.branch2a_bn = _norm(inner, frozen_bn, bn_eps)
        self.branch2b = nn.Conv3d(inner, inner, (temporal_b, 3, 3), stride=(1, stride, stride),
                                  padding=(temporal_b // 2, 1, 1), bias=False)
        self.branch2b_bn = _norm(inner, frozen_bn, bn_eps)
        self.branch2c = nn.Conv3d(inner, out_channels, 1, bias=False)
        self.branch2c_bn = _norm(out_channels, frozen_bn, bn_eps)
        self.branch1 = self.branch1_bn = None
        if stride != 1 or in_channels != out_channels:
            self.branch1 = nn.Conv3d(in_channels, out_channels, 1, stride=(1, stride, stride), bias=False)
            self.branch1_bn = _norm(out_channels, frozen_bn, bn_eps)
        self.relu = nn.ReLU(inplace=True)
        self.nonlocal_block: NonLocalBlock | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.branch1 is None else self.branch1_bn(self.branch1(x))
        y = self.relu(self.branch2a_bn(self.branch2a(x)))
        y = self.relu(self.branch2b_bn(self.branch2b(y)))
        y = self.relu(self.branch2c_bn(self.branch2c(y)) + shortcut)
        return y if self.nonlocal_block is None else self.nonlocal_block(y)


class ResNet3d(nn.Module):
    """C2D / I3D ResNet for clips (B, 3, T, H, W) -> logits (B, num_classes).

    Args:
        depth: 50 or 101.
        inflation: ``"c2d"`` (every conv 1 x k x k), ``"3x1x1"`` (the official I3D: conv1 5x7x7 and
            branch2a 3x1x1 in every other block) or ``"3x3x3"`` (the same blocks inflate branch2b).
        stem: ``"32x2"`` or ``"8x8"``, or the peers' ``"mmaction2"`` and ``"slowfast"`` (module
            docstring).
        nonlocal_blocks: residual blocks followed by a non-local block, e.g.
            ``{"res3": (1, 3), "res4": (1, 3, 5)}`` (the paper's 5 blocks in R50), or a preset
            name of :data:`NONLOCAL_PRESETS`: ``"nl1"``, ``"nl5"``, ``"nl10"`` or one block in
            ``"res2"`` .. ``"res5"`` (Table 2b).
        nonlocal_options: further :class:`NonLocalBlock` arguments for every block (``mode``,
            ``affinity``, ``norm``, ...); channels and dims are set here.
        nonlocal_stage_options: per-stage arguments over ``nonlocal_options``, e.g.
            ``{"res3": {"group_size": 4}}`` (the official frozen-BN models' res3).
        frozen_bn: every BN (the non-local blocks' aside) is an :class:`Affine3d` (official
            ``USE_AFFINE``); the non-local blocks take ``norm`` from the options.
        num_classes: outputs of ``pred``.
        dropout: before ``pred`` (0.5 in every paper recipe).
        zero_init_residual: start each ``branch2c_bn`` scale at 0, as the official recipes do.
        width: channels of the stem; stage k has inner width ``width * 2**k`` and outputs 4x that
            (64 in the paper; smaller for the built-in CPU job).
        stage_blocks: residual blocks in res2..res5, overriding ``depth``'s (3, 4, 6, 3) /
            (3, 4, 23, 3); presets still take their positions from ``depth``.
        bn_eps: epsilon of every BN, the non-local blocks' included (official 1.0000001e-5;
            mmaction2 and PySlowFast use PyTorch's 1e-5).
        pixel_mean, pixel_std: the per-channel (RGB, 0-255) input normalisation the weights were
            trained with. The data pipeline normalises as the official code, (pixel - 114.75) /
            57.375; other values (mmaction2's ImageNet mean and std) make the model first map its
            input to theirs, exactly, before conv1.

    ``forward`` averages over all remaining positions, so any T, H, W the strides allow works.
    The official test instead slides the training-size pool over the map and scores each position
    (:meth:`forward_dense`, :meth:`view_scores`); at the training size the two agree.
    """

    def __init__(
        self,
        depth: int = 50,
        inflation: str = "c2d",
        stem: str = "32x2",
        nonlocal_blocks: Mapping[str, Sequence[int]] | str | None = None,
        nonlocal_options: Mapping[str, object] | None = None,
        nonlocal_stage_options: Mapping[str, Mapping[str, object]] | None = None,
        num_classes: int = 400,
        dropout: float = 0.5,
        zero_init_residual: bool = True,
        frozen_bn: bool = False,
        *,
        width: int = 64,
        stage_blocks: Sequence[int] | None = None,
        bn_eps: float = BN_EPS,
        pixel_mean: float | Sequence[float] = OFFICIAL_PIXELS[0],
        pixel_std: float | Sequence[float] = OFFICIAL_PIXELS[1],
    ):
        super().__init__()
        if isinstance(nonlocal_blocks, str):
            if nonlocal_blocks not in NONLOCAL_PRESETS:
                raise ValueError(f"nonlocal_blocks: expected a mapping or a preset from {tuple(NONLOCAL_PRESETS)}, "
                                 f"got {nonlocal_blocks!r}")
            nonlocal_blocks = NONLOCAL_PRESETS[nonlocal_blocks].get(depth, {})
        counts = _check_shape(depth, width, stage_blocks)
        _check_args(depth, inflation, stem, nonlocal_blocks, num_classes, counts)
        for name in nonlocal_stage_options or {}:
            if name not in STAGES:
                raise ValueError(f"nonlocal_stage_options: expected stage names from {STAGES}, got {name!r}")
        self.depth, self.inflation, self.stem, self.frozen_bn = depth, inflation, stem, bool(frozen_bn)
        self.width, self.stage_blocks = width, counts
        if not (isinstance(bn_eps, (int, float)) and bn_eps > 0):
            raise ValueError(f"bn_eps: expected a positive float, got {bn_eps!r}")
        self.bn_eps = float(bn_eps)
        self._set_pixels(pixel_mean, pixel_std)
        conv1_stride, pool1, pool2 = STEMS[stem]
        t1 = 1 if inflation == "c2d" else 5
        self.conv1 = nn.Conv3d(3, width, (t1, 7, 7), stride=conv1_stride, padding=(t1 // 2, 3, 3), bias=False)
        self.res_conv1_bn = _norm(width, frozen_bn, self.bn_eps)
        self.relu = nn.ReLU(inplace=True)
        self.pool1 = nn.MaxPool3d(*pool1)
        self.pool2 = nn.MaxPool3d(*pool2)
        inflated = inflated_blocks(counts) if inflation != "c2d" else {}
        in_channels = width
        for index, (name, blocks) in enumerate(zip(STAGES, counts)):
            inner = width * 2**index
            stage = []
            for i in range(blocks):
                t = 3 if i in inflated.get(name, ()) else 1
                stage.append(Bottleneck3d(
                    in_channels, inner, inner * 4, stride=2 if i == 0 and index > 0 else 1,
                    temporal_a=t if inflation == "3x1x1" else 1, temporal_b=t if inflation == "3x3x3" else 1,
                    frozen_bn=frozen_bn, bn_eps=self.bn_eps,
                ))
                in_channels = inner * 4
            self.add_module(name, nn.Sequential(*stage))
        self.dropout = nn.Dropout(dropout)
        self.pred = nn.Linear(in_channels, num_classes)
        self.nonlocal_positions = {k: tuple(v) for k, v in (nonlocal_blocks or {}).items()}
        for name, indices in self.nonlocal_positions.items():
            stage = getattr(self, name)
            options = {**(nonlocal_options or {}), **(nonlocal_stage_options or {}).get(name, {})}
            for i in indices:
                block = NonLocalBlock(stage[i].branch2c.out_channels, dims=3, **options)
                if isinstance(block.norm, nn.BatchNorm3d):
                    block.norm.eps = self.bn_eps
                stage[i].nonlocal_block = block
        self.reset_parameters(zero_init_residual)

    def reset_parameters(self, zero_init_residual: bool = True) -> None:
        """Official initialisation: MSRA (fan-out) convs, unit BN, pred N(0, 0.01^2), zero biases;
        each non-local block its own (:meth:`NonLocalBlock.reset_parameters`)."""
        blocks = [m for m in self.modules() if isinstance(m, NonLocalBlock)]
        inside = {id(m) for block in blocks for m in block.modules()}
        for block in blocks:
            block.reset_parameters()
        for module in self.modules():
            if id(module) in inside:
                continue
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (nn.BatchNorm3d, Affine3d)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, Bottleneck3d):
                    nn.init.zeros_(module.branch2c_bn.weight)
        nn.init.normal_(self.pred.weight, std=0.01)
        nn.init.zeros_(self.pred.bias)

    def _set_pixels(self, mean, std) -> None:
        """The input map (pipeline normalisation -> the weights') as a per-channel scale and shift,
        or None when the two agree."""
        values = []
        for name, value in (("pixel_mean", mean), ("pixel_std", std)):
            v = [value] * 3 if isinstance(value, (int, float)) else list(value)
            if len(v) != 3 or not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in v) or \
                    (name == "pixel_std" and min(v) <= 0):
                raise ValueError(f"{name}: expected a number or 3 numbers (RGB, 0-255)"
                                 f"{', positive' if name == 'pixel_std' else ''}, got {value!r}")
            values.append([float(c) for c in v])
        self.pixel_mean, self.pixel_std = values
        base_mean, base_std = OFFICIAL_PIXELS
        if all(m == base_mean for m in values[0]) and all(s == base_std for s in values[1]):
            self.input_map = None
            return
        # x_theirs = (pixel - mean) / std with pixel = x * base_std + base_mean
        self.input_map = ([base_std / s for s in values[1]], [(base_mean - m) / s for m, s in zip(*values)])

    def map_input(self, x: torch.Tensor) -> torch.Tensor:
        """A pipeline-normalised clip in the normalisation the weights expect (see ``pixel_mean``)."""
        if self.input_map is None:
            return x
        scale, shift = (torch.tensor(v, dtype=x.dtype, device=x.device).view(1, 3, 1, 1, 1) for v in self.input_map)
        return torch.addcmul(shift, x, scale)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) -> res5 features (B, 2048, T', H', W')."""
        _check_input(x)
        x = self.map_input(x)
        x = self.pool1(self.relu(self.res_conv1_bn(self.conv1(x))))
        x = self.pool2(self.res2(x))
        return self.res5(self.res4(self.res3(x)))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.pred(self.dropout(features.mean((2, 3, 4))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_dense(self, x: torch.Tensor, window: int = 7) -> torch.Tensor:
        """Logits at every position of the official fully convolutional test: (B, classes, t, h, w).

        The official test keeps the training head's average pool (all frames x 7 x 7, the res5 map
        of a 224 crop) with stride 1 and applies ``pred`` as a 1x1x1 conv, so a 256 crop (8 x 8 at
        res5) gives a 2 x 2 grid of predictions. ``window`` is clipped to the map.
        """
        features = self.forward_features(x)  # (B, 2048, T', H', W')
        kernel = (features.shape[2], min(window, features.shape[3]), min(window, features.shape[4]))
        pooled = torch.nn.functional.avg_pool3d(features, kernel, stride=1)
        logits = torch.einsum("bcthw,kc->bkthw", pooled, self.pred.weight)
        return logits + self.pred.bias.view(1, -1, 1, 1, 1)

    def view_scores(self, x: torch.Tensor, window: int = 7) -> torch.Tensor:
        """Class probabilities of one test view as the official test computes them: the softmax at
        each position of :meth:`forward_dense`, averaged over positions. (B, classes)."""
        return self.forward_dense(x, window).softmax(1).mean((2, 3, 4))


def _check_shape(depth, width, stage_blocks) -> tuple[int, ...]:
    if depth not in DEPTHS:
        raise ValueError(f"depth: expected one of {tuple(DEPTHS)}, got {depth!r}")
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"width: expected a positive int (64 in the paper), got {width!r}")
    if stage_blocks is None:
        return DEPTHS[depth]
    counts = tuple(stage_blocks)
    if len(counts) != 4 or not all(isinstance(c, int) and c >= 1 for c in counts):
        raise ValueError(f"stage_blocks: expected 4 positive ints (res2..res5), got {stage_blocks!r}")
    return counts


def _check_args(depth, inflation, stem, nonlocal_blocks, num_classes, counts) -> None:
    if inflation not in INFLATIONS:
        raise ValueError(f"inflation: expected one of {INFLATIONS}, got {inflation!r}")
    if stem not in STEMS:
        raise ValueError(f"stem: expected one of {tuple(STEMS)}, got {stem!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
    for name, indices in (nonlocal_blocks or {}).items():
        if name not in STAGES:
            raise ValueError(f"nonlocal_blocks: expected stage names from {STAGES}, got {name!r}")
        count = counts[STAGES.index(name)]
        bad = [i for i in indices if not isinstance(i, int) or not 0 <= i < count]
        if bad:
            raise ValueError(f"nonlocal_blocks[{name!r}]: expected block indices in 0..{count - 1} for "
                             f"{name} of {count} blocks, got {bad}")


def _check_input(x: torch.Tensor) -> None:
    if x.dim() != 5 or x.shape[1] != 3:
        raise ValueError(f"x: expected a clip batch (B, 3, T, H, W), got shape {tuple(x.shape)}")
