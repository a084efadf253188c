"""Detection models with non-local blocks: positions (paper §6), identity at initialisation, and
ImageNet backbone files in torchvision's format."""

import pytest
import torch

torchvision = pytest.importorskip("torchvision")

from nonlocalnet import NonLocalBlock  # noqa: E402
from nonlocalnet.models.detection import keypoint_rcnn, mask_rcnn, nonlocal_blocks_of  # noqa: E402

SMALL = {"min_size": 128, "max_size": 160, "rpn_pre_nms_top_n_test": 50, "rpn_post_nms_top_n_test": 20,
         "box_detections_per_img": 10, "box_score_thresh": 0.0}


def test_mask_rcnn_block_sits_before_the_last_res4_block():
    r50 = mask_rcnn(50, num_classes=3, **SMALL)
    assert list(nonlocal_blocks_of(r50)) == ["backbone.body.layer3.4"]
    assert len(r50.backbone.body.layer3) == 6  # so layer3.4 is right before the last block
    block = r50.backbone.body.layer3[4].nonlocal_block
    assert isinstance(block, NonLocalBlock) and block.norm is None and block.in_channels == 1024
    assert not torch.count_nonzero(block.out.weight)  # W_z starts at zero: the identity
    r101 = mask_rcnn(101, num_classes=3, **SMALL)
    assert list(nonlocal_blocks_of(r101)) == ["backbone.body.layer3.21"] and len(r101.backbone.body.layer3) == 23
    assert nonlocal_blocks_of(mask_rcnn(50, nonlocal_backbone=False, num_classes=3)) == {}


def test_keypoint_rcnn_blocks_follow_every_second_head_conv():
    model = keypoint_rcnn(50, num_keypoints=5, **SMALL)
    names = list(nonlocal_blocks_of(model))
    assert names == ["backbone.body.layer3.4"] + [f"roi_heads.keypoint_head.{i}" for i in (3, 7, 11, 15)]
    head = model.roi_heads.keypoint_head
    for i in (3, 7, 11, 15):
        assert isinstance(head[i - 1], torch.nn.Conv2d) and head[i].nonlocal_block.in_channels == 512
    assert sum(isinstance(m, torch.nn.Conv2d) for m in head) == 8
    assert len(nonlocal_blocks_of(keypoint_rcnn(50, nonlocal_backbone=False, num_keypoints=5))) == 4


@pytest.mark.parametrize("build", [
    lambda nl: mask_rcnn(50, nonlocal_backbone=nl, num_classes=3, **SMALL),
    lambda nl: keypoint_rcnn(50, nonlocal_backbone=nl, nonlocal_head=nl, num_keypoints=5, **SMALL),
], ids=["mask", "keypoint"])
def test_nonlocal_model_equals_its_baseline_at_initialisation(build):
    torch.manual_seed(0)
    base = build(False).eval()
    model = build(True).eval()
    missing = model.load_state_dict(base.state_dict(), strict=False).missing_keys
    assert missing and all("nonlocal_block" in k for k in missing)
    for block in nonlocal_blocks_of(model).values():  # random theta/phi/g: only W_z = 0 keeps the identity
        for conv in (block.theta, block.phi, block.g):
            torch.nn.init.normal_(conv.weight, std=0.5)
    image = torch.rand(3, 120, 150)
    with torch.no_grad():
        a, b = base([image])[0], model([image])[0]
    assert a.keys() == b.keys() and len(a["boxes"]) > 0
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_backbone_weights_from_a_torchvision_file(tmp_path):
    resnet = torchvision.models.resnet50(weights=None)
    torch.nn.init.normal_(resnet.conv1.weight)
    path = tmp_path / "resnet50.pth"
    torch.save(resnet.state_dict(), path)
    model = mask_rcnn(50, backbone_weights=path, num_classes=3)
    assert torch.equal(model.backbone.body.conv1.weight, resnet.conv1.weight)
    assert torch.equal(model.backbone.body.layer3[4].bn2.running_var, resnet.layer3[4].bn2.running_var)
    with pytest.raises(ValueError, match=r"backbone_weights: .* is not a torchvision ResNet-101 state dict"):
        mask_rcnn(101, backbone_weights=path, num_classes=3)
    with pytest.raises(ValueError, match="depth: expected 50 or 101, got 152"):
        mask_rcnn(152)
