"""Mask R-CNN and Keypoint R-CNN with non-local blocks (paper §6, Tables 5 and 6; docs/paper.md
§4.5), built on torchvision's detection models (the ``detection`` extra).

Where the blocks go:
- boxes and masks (Table 5): one block in res4 right before its last residual block, i.e. after
  torchvision's ``layer3.4`` (R50) or ``layer3.21`` (R101), applied to that block's output;
- keypoints (Table 6): four blocks in the keypoint head, one after every second of its eight 3x3
  convs (after ReLUs ``3``, ``7``, ``11``, ``15``), and optionally the backbone block above.

Normalisation: detection trains with one or two images per GPU next to a frozen-BN backbone, where
a BatchNorm in the block would see too few samples and would differ between training and testing.
Each block therefore has no norm layer and its output conv W_z starts at zero (``norm=False``),
which is what the official release does for its frozen-BN (affine) video models. The block is
the identity at initialisation, so a non-local model's output equals its baseline's until it trains.
The blocks are 2-D, with C' = C/2 and the keys max-pooled 2x2 (the paper's efficient form).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch.nn as nn

from ..block import NonLocalBlock, add_nonlocal

__all__ = ["BACKBONE_POSITIONS", "KEYPOINT_HEAD_POSITIONS", "mask_rcnn", "keypoint_rcnn", "nonlocal_blocks_of"]

# the residual block of res4 (torchvision layer3) after which the backbone block goes
BACKBONE_POSITIONS = {50: "layer3.4", 101: "layer3.21"}
# the ReLUs of torchvision's KeypointRCNNHeads after the 2nd, 4th, 6th and 8th conv
KEYPOINT_HEAD_POSITIONS = ("3", "7", "11", "15")


def _torchvision():
    try:
        import torchvision  # noqa: F401
        from torchvision.models.detection import backbone_utils, keypoint_rcnn, mask_rcnn  # noqa: F401
    except ImportError:  # pragma: no cover - the message is the test
        raise ImportError("detection models need torchvision: pip install 'nonlocalnet[detection]'") from None
    return torchvision


def _backbone(depth: int, weights: str | os.PathLike | None, trainable_layers: int):
    torchvision = _torchvision()
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import FrozenBatchNorm2d

    if depth not in BACKBONE_POSITIONS:
        raise ValueError(f"depth: expected 50 or 101, got {depth!r}")
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_layers: expected 0..5 (torchvision's convention), got {trainable_layers}")
    resnet = getattr(torchvision.models, f"resnet{depth}")(weights=None, norm_layer=FrozenBatchNorm2d)
    if weights is not None:
        _load_backbone(resnet, weights, depth)
    return _resnet_fpn_extractor(resnet, trainable_layers)


def _load_backbone(resnet: nn.Module, path, depth: int) -> None:
    """A torchvision-format ImageNet ResNet state dict (``fc`` optional; BN statistics folded by
    FrozenBatchNorm2d as torchvision does)."""
    from ..weights import read_weights

    state = dict(read_weights(path)["state_dict"])
    state = {k: v for k, v in state.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    own = {k: v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"backbone_weights: {os.fspath(path)} is not a torchvision ResNet-{depth} state dict: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}, shapes {shapes[:3]}")
    resnet.load_state_dict(state, strict=False)


def _block_options(options: Mapping[str, object] | None) -> dict:
    return {"norm": False, **(options or {})}


def mask_rcnn(depth: int = 50, *, nonlocal_backbone: bool = True, num_classes: int = 81,
              backbone_weights: str | os.PathLike | None = None, trainable_layers: int = 3,
              nonlocal_options: Mapping[str, object] | None = None, **detector_kwargs):
    """torchvision's Mask R-CNN with a ResNet-``depth``-FPN backbone, plus (``nonlocal_backbone``)
    the paper's one non-local block in res4. ``num_classes`` counts the background: 81 for COCO's
    80 categories as :class:`~nonlocalnet.data.coco.CocoDetection` numbers them (torchvision's own
    COCO models use 91, the sparse category ids). ``detector_kwargs`` go to ``MaskRCNN``
    (``min_size``, ``max_size``, RPN and box settings)."""
    _torchvision()
    from torchvision.models.detection import MaskRCNN

    model = MaskRCNN(_backbone(depth, backbone_weights, trainable_layers), num_classes=num_classes, **detector_kwargs)
    if nonlocal_backbone:
        add_nonlocal(model.backbone.body, [BACKBONE_POSITIONS[depth]], **_block_options(nonlocal_options))
    return model


def keypoint_rcnn(depth: int = 101, *, nonlocal_head: bool = True, nonlocal_backbone: bool = True,
                  num_classes: int = 2, num_keypoints: int = 17, backbone_weights: str | os.PathLike | None = None,
                  trainable_layers: int = 3, nonlocal_options: Mapping[str, object] | None = None,
                  **detector_kwargs):
    """torchvision's Keypoint R-CNN (ResNet-``depth``-FPN) with the paper's four non-local blocks in
    the keypoint head (``nonlocal_head``) and one in res4 (``nonlocal_backbone``), Table 6."""
    _torchvision()
    from torchvision.models.detection import KeypointRCNN

    model = KeypointRCNN(_backbone(depth, backbone_weights, trainable_layers), num_classes=num_classes,
                         num_keypoints=num_keypoints, **detector_kwargs)
    options = _block_options(nonlocal_options)
    if nonlocal_backbone:
        add_nonlocal(model.backbone.body, [BACKBONE_POSITIONS[depth]], **options)
    if nonlocal_head:
        head = model.roi_heads.keypoint_head
        channels = head[int(KEYPOINT_HEAD_POSITIONS[0]) - 1].out_channels
        add_nonlocal(head, list(KEYPOINT_HEAD_POSITIONS), in_channels=channels, dims=2, **options)
    return model


def nonlocal_blocks_of(model: nn.Module) -> dict[str, NonLocalBlock]:
    """The non-local blocks of a model by the name of the module they follow."""
    return {name.removesuffix(".nonlocal_block"): m for name, m in model.named_modules()
            if isinstance(m, NonLocalBlock)}

