"""COCO-format detection data: targets in torchvision's format from a set made here, skipped
entries counted, malformed entries named; a Mask R-CNN step trains on it."""

import json

import pytest
import torch

pytest.importorskip("pycocotools")
torchvision = pytest.importorskip("torchvision")
Image = pytest.importorskip("PIL.Image")
ImageDraw = pytest.importorskip("PIL.ImageDraw")

from nonlocalnet.data.coco import CocoDetection  # noqa: E402
from nonlocalnet.data.datasets import AnnotationError  # noqa: E402

KEYPOINTS = ["top", "left", "right"]


def make_coco(root, images=3):
    """Images with a red square (category 3) and a blue triangle (category 7, 3 keypoints)."""
    (root / "images").mkdir(parents=True)
    data = {"images": [], "annotations": [],
            "categories": [{"id": 3, "name": "square"}, {"id": 7, "name": "triangle", "keypoints": KEYPOINTS}]}
    for i in range(images):
        image = Image.new("RGB", (96, 64), (40, 40, 40))
        draw = ImageDraw.Draw(image)
        x = 8 + 10 * i
        draw.rectangle([x, 10, x + 19, 29], fill=(220, 30, 30))
        tri = [(60, 50), (80, 50), (70, 34)]
        draw.polygon(tri, fill=(30, 30, 220))
        image.save(root / "images" / f"{i}.png")
        data["images"].append({"id": 100 + i, "file_name": f"{i}.png", "width": 96, "height": 64})
        data["annotations"].append({"id": 2 * i + 1, "image_id": 100 + i, "category_id": 3, "bbox": [x, 10, 20, 20],
                                    "area": 400, "iscrowd": 0,
                                    "segmentation": [[x, 10, x + 20, 10, x + 20, 30, x, 30]]})
        data["annotations"].append({"id": 2 * i + 2, "image_id": 100 + i, "category_id": 7, "bbox": [60, 34, 20, 16],
                                    "area": 160, "iscrowd": 0, "segmentation": [[c for p in tri for c in p]],
                                    "keypoints": [70, 34, 2, 60, 50, 2, 80, 50, 1]})
    (root / "instances.json").write_text(json.dumps(data))
    return root / "images", root / "instances.json", data


def test_targets_in_torchvision_format(tmp_path):
    images, annotations, _ = make_coco(tmp_path)
    ds = CocoDetection(images, annotations)
    assert len(ds) == 3 and ds.category_ids == [3, 7] and ds.skipped == {}
    image, target = ds[1]
    assert image.shape == (3, 64, 96) and 0 <= image.min() and image.max() <= 1
    assert target["boxes"].tolist() == [[18, 10, 38, 30], [60, 34, 80, 50]]
    assert target["labels"].tolist() == [1, 2] and target["image_id"] == 101
    masks = target["masks"]
    assert masks.shape == (2, 64, 96) and masks.dtype == torch.uint8
    assert 380 <= int(masks[0].sum()) <= 441 and masks[0, 20, 28] == 1 and masks[0, 40, 28] == 0
    assert masks[1, 45, 70] == 1 and masks[1, 36, 62] == 0  # inside / outside the triangle
    assert "keypoints" not in target


def test_keypoint_sets_keep_the_categories_with_keypoints(tmp_path):
    images, annotations, data = make_coco(tmp_path)
    data["annotations"][3].pop("keypoints")  # a triangle without keypoints: invisible ones
    annotations.write_text(json.dumps(data))
    ds = CocoDetection(images, annotations, keypoints=True)
    assert ds.category_ids == [7] and ds.num_keypoints == 3
    assert ds.skipped == {"annotation of a category without keypoints": 3}  # the squares
    _, target = ds[0]
    assert target["labels"].tolist() == [1] and target["boxes"].tolist() == [[60, 34, 80, 50]]
    assert target["keypoints"].tolist() == [[[70, 34, 2], [60, 50, 2], [80, 50, 1]]]
    assert ds[1][1]["keypoints"][0, :, 2].tolist() == [0, 0, 0]


def test_rle_and_box_only_masks(tmp_path):
    from pycocotools import mask as mask_api
    import numpy as np

    images, annotations, data = make_coco(tmp_path)
    square = np.zeros((64, 96), np.uint8, order="F")
    square[10:30, 8:28] = 1
    rle = mask_api.encode(square)
    data["annotations"][0]["segmentation"] = {"size": [64, 96], "counts": rle["counts"].decode("ascii")}
    data["annotations"][2]["segmentation"] = [[1, 2, 3, 4]]  # only a degenerate polygon: the box is the mask
    annotations.write_text(json.dumps(data))
    ds = CocoDetection(images, annotations)
    assert ds.skipped == {"degenerate polygon (fewer than 3 points)": 1}
    assert torch.equal(ds[0][1]["masks"][0], torch.from_numpy(np.ascontiguousarray(square)))
    box_mask = ds[1][1]["masks"][0]
    assert int(box_mask.sum()) == 400 and box_mask[10:30, 18:38].all()


def test_unusable_entries_are_skipped_and_counted(tmp_path):
    images, annotations, data = make_coco(tmp_path)
    data["images"].append({"id": 999, "file_name": "gone.png", "width": 96, "height": 64})
    data["annotations"].append({"id": 50, "image_id": 999, "category_id": 3, "bbox": [1, 1, 5, 5]})
    data["annotations"].append({"id": 51, "image_id": 100, "category_id": 3, "bbox": [1, 1, -5, 5]})
    data["annotations"].append({"id": 52, "image_id": 100, "category_id": 3, "bbox": [1, 1, 5, 5], "iscrowd": 1})
    annotations.write_text(json.dumps(data))
    ds = CocoDetection(images, annotations)
    assert len(ds) == 3
    assert ds.skipped == {"image file missing": 1, "annotation of a skipped or unknown image": 1,
                          "box with zero or negative size": 1, "crowd region": 1}
    assert len(ds[0][1]["boxes"]) == 2


@pytest.mark.parametrize("edit, match", [
    (lambda d: d["annotations"][1].pop("bbox"), r"annotations\[1\] \(id 2\): missing key 'bbox'"),
    (lambda d: d["annotations"][2].update(bbox=[1, 2]), r"annotations\[2\] \(id 3\): bbox: expected \[x, y, width"),
    (lambda d: d["annotations"][0].update(category_id=5), r"annotations\[0\] \(id 1\): category_id 5 is not among"),
    (lambda d: d["images"][1].pop("file_name"), r"images\[1\] \(id 101\): missing key 'file_name'"),
    (lambda d: d["annotations"][1].update(keypoints=[1, 2, 2]), r"annotations\[1\] \(id 2\): keypoints: expected 9"),
    (lambda d: d.pop("categories"), r"expected a top-level list 'categories'"),
    (lambda d: d["annotations"][0].update(segmentation=[[1, 2, "x", 4, 5, 6]]),
     r"annotations\[0\] \(id 1\): segmentation\[0\]: expected a polygon, a list of x, y numbers"),
    (lambda d: d["annotations"][0].update(segmentation={"size": [10, 10], "counts": "abc"}),
     r"annotations\[0\] \(id 1\): segmentation: RLE size \[10, 10\] is not the image's"),
    (lambda d: d["images"][0].update(width=0), r"images\[0\] \(id 100\): width: expected a positive int, got 0"),
])
def test_malformed_entries_are_named(tmp_path, edit, match):
    images, annotations, data = make_coco(tmp_path)
    edit(data)
    annotations.write_text(json.dumps(data))
    with pytest.raises(AnnotationError, match=r"instances\.json: " + match):
        CocoDetection(images, annotations, keypoints=True)


def test_a_mask_rcnn_step_trains_on_it(tmp_path):
    from nonlocalnet.models.detection import mask_rcnn

    images, annotations, _ = make_coco(tmp_path, images=2)
    ds = CocoDetection(images, annotations)
    torch.manual_seed(0)
    model = mask_rcnn(50, num_classes=3, min_size=64, max_size=96, rpn_pre_nms_top_n_train=100,
                      rpn_post_nms_top_n_train=50, box_batch_size_per_image=32).train()
    batch = [ds[0], ds[1]]
    losses = model([b[0] for b in batch], [b[1] for b in batch])
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    block = model.backbone.body.layer3[4].nonlocal_block
    assert block.out.weight.grad is not None and block.out.weight.grad.abs().sum() > 0


def test_a_keypoint_rcnn_step_reaches_every_head_block(tmp_path):
    from nonlocalnet.models.detection import keypoint_rcnn, nonlocal_blocks_of

    images, annotations, _ = make_coco(tmp_path, images=2)
    ds = CocoDetection(images, annotations, keypoints=True)
    torch.manual_seed(0)
    model = keypoint_rcnn(50, num_classes=len(ds.category_ids) + 1, num_keypoints=ds.num_keypoints, min_size=64,
                          max_size=96, rpn_post_nms_top_n_train=50, box_batch_size_per_image=32).train()
    losses = model([ds[0][0], ds[1][0]], [ds[0][1], ds[1][1]])
    sum(losses.values()).backward()
    assert "loss_keypoint" in losses
    blocks = nonlocal_blocks_of(model)
    assert len(blocks) == 5
    for name, block in blocks.items():  # W_z starts at 0, so its gradient shows the block is in the path
        assert block.out.weight.grad is not None and block.out.weight.grad.abs().sum() > 0, name


def _oracle(dataset, shift=0.0):
    """Predictions equal to the ground truth (boxes moved right by ``shift`` of their width)."""
    truth = {int(t["image_id"]): t for _, t in (dataset[i] for i in range(len(dataset)))}

    def predict(images):
        outputs = []
        for image in images:
            target = next(t for t in truth.values() if t["masks"].shape[-2:] == image.shape[-2:] and
                          t["image_id"] not in seen)
            seen.add(target["image_id"])
            boxes = target["boxes"].clone()
            boxes[:, [0, 2]] += shift * (boxes[:, 2] - boxes[:, 0]).unsqueeze(1)
            n = len(boxes)
            outputs.append({"boxes": boxes, "labels": target["labels"], "scores": torch.linspace(1, 0.5, n),
                            "masks": target["masks"][:, None].float(), "keypoints": target["keypoints"],
                            "keypoints_scores": torch.ones(n, target["keypoints"].shape[1])})
        return outputs

    seen = set()
    return predict


def test_coco_evaluation_of_the_ground_truth_is_perfect(tmp_path):
    from nonlocalnet.detect import coco_evaluate

    images, annotations, _ = make_coco(tmp_path)
    ds = CocoDetection(images, annotations, keypoints=True)
    report = coco_evaluate(None, ds, ("bbox", "segm", "keypoints"), predict=_oracle(ds))
    assert report["bbox"]["AP"] == pytest.approx(1.0) and report["segm"]["AP"] == pytest.approx(1.0)
    assert report["keypoints"]["AP"] == pytest.approx(1.0)
    assert set(report["bbox"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    shifted = coco_evaluate(None, ds, ("bbox",), predict=_oracle(ds, shift=0.3))  # IoU 0.54: AP50 only
    assert shifted["bbox"]["AP50"] == pytest.approx(1.0) and shifted["bbox"]["AP75"] == pytest.approx(0.0)
    assert 0 < shifted["bbox"]["AP"] < 0.5
    with pytest.raises(ValueError, match=r"iou_types: expected some of \('bbox', 'segm', 'keypoints'\), got \['box'\]"):
        coco_evaluate(None, ds, ("box",), predict=_oracle(ds))


def test_coco_evaluation_of_a_real_model_runs(tmp_path):
    from nonlocalnet.detect import coco_evaluate
    from nonlocalnet.models.detection import mask_rcnn

    images, annotations, _ = make_coco(tmp_path, images=2)
    ds = CocoDetection(images, annotations)
    torch.manual_seed(0)
    model = mask_rcnn(50, num_classes=3, min_size=64, max_size=96, box_score_thresh=0.0, box_detections_per_img=5)
    report = coco_evaluate(model, ds, ("bbox", "segm"))
    assert all(0.0 <= v <= 1.0 or v == -1.0 for t in ("bbox", "segm") for v in report[t].values())
    assert report["images"] == 2 and report["skipped_images"] == 0
