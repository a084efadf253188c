"""Detection training (``nonlocalnet detect``): flips with keypoint sides, orientation batches, the
shapes set, overfitting a self-made COCO set with and without the non-local block, exact resume,
unreadable images, torchrun against accumulation, and the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("pycocotools")
torchvision = pytest.importorskip("torchvision")

from test_coco import make_coco  # noqa: E402

from nonlocalnet import detect, engine  # noqa: E402
from nonlocalnet.config import DetectConfig, load_config  # noqa: E402
from nonlocalnet.data.coco import CocoDetection  # noqa: E402
from nonlocalnet.data.shapes import ShapesSpec, make_shapes, shape_paths  # noqa: E402
from nonlocalnet.engine import ClipSampler, learning_rate  # noqa: E402
from nonlocalnet.models.detection import nonlocal_blocks_of  # noqa: E402

COCO_NAMES = ["nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
              "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
              "right_knee", "left_ankle", "right_ankle"]
SMALL = ["model.min_size=[64]", "model.max_size=96", "model.trainable_layers=5",
         "model.detector.rpn_pre_nms_top_n_train=200", "model.detector.rpn_post_nms_top_n_train=50",
         "model.detector.rpn_pre_nms_top_n_test=100", "model.detector.rpn_post_nms_top_n_test=50",
         "model.detector.box_batch_size_per_image=64", "model.detector.box_detections_per_img=10",
         "optim.lr=0.02", "optim.steps=[]", "optim.clip_grad_norm=10", "optim.warmup=10", "optim.warmup_factor=0.1",
         "data.workers=0", "train.progress=false", "train.tensorboard=false"]


def coco_config(images, annotations, *overrides):
    files = ["data.dataset=coco", f"data.train_images={images}", f"data.train_annotations={annotations}",
             f"data.val_images={images}", f"data.val_annotations={annotations}"]
    return load_config(None, [*files, *SMALL, *overrides], schema=DetectConfig)


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_flip_map_swaps_left_and_right_by_name():
    mapping = detect.keypoint_flip_map(COCO_NAMES)
    assert mapping == [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]
    assert detect.keypoint_flip_map(["top", "left", "right"]) == [0, 2, 1]
    assert detect.keypoint_flip_map(["Left hand", "Right hand", "head"]) == [1, 0, 2]


def test_hflip_mirrors_boxes_masks_and_keypoints():
    generator = torch.Generator().manual_seed(3)
    image = torch.rand(3, 20, 31, generator=generator)
    masks = torch.zeros(2, 20, 31, dtype=torch.uint8)
    masks[0, 2:9, 3:12] = 1
    masks[1, 10:18, 20:29] = 1
    boxes = torch.tensor([[3.0, 2, 12, 9], [20, 10, 29, 18]])
    points = torch.tensor([[[3.5, 2.5, 2], [11.5, 8.5, 1], [0, 0, 0]], [[20.5, 10.5, 2], [28.5, 17.5, 2], [22, 12, 2]]])
    target = {"boxes": boxes, "masks": masks, "keypoints": points, "labels": torch.tensor([1, 2])}
    flipped_image, flipped = detect.hflip(image, target, [0, 2, 1])
    assert torch.equal(flipped_image, image.flip(-1))
    for k in range(2):  # each box is still the bounds of its (mirrored) mask, in continuous coordinates
        rows, cols = torch.nonzero(flipped["masks"][k], as_tuple=True)
        assert flipped["boxes"][k].tolist() == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
    # keypoints: x -> 31 - x, sides swapped (index 1 <-> 2), an invisible point left as it was
    assert flipped["keypoints"][0].tolist() == [[27.5, 2.5, 2], [0, 0, 0], [19.5, 8.5, 1]]
    assert flipped["keypoints"][1].tolist() == [[10.5, 10.5, 2], [9, 12, 2], [2.5, 17.5, 2]]
    twice_image, twice = detect.hflip(flipped_image, flipped, [0, 2, 1])
    assert torch.equal(twice_image, image) and all(torch.equal(twice[k], target[k]) for k in target)


def test_batches_hold_one_orientation_and_cover_each_group():
    groups = [0] * 7 + [1] * 10
    sampler = ClipSampler(17, 4, groups=groups, seed=5, items="training images")
    assert sampler.steps == 1 + 2  # 7 // 4 + 10 // 4
    for epoch in range(3):
        sampler.set_epoch(epoch)
        keys = list(sampler)
        indices = [i for i, _ in keys]
        assert len(indices) == 12 and len(set(indices)) == 12
        batches = [indices[k:k + 4] for k in range(0, 12, 4)]
        assert all(len({groups[i] for i in batch}) == 1 for batch in batches)
        assert sorted(groups[b[0]] for b in batches) == [0, 1, 1]
    sampler.set_epoch(2, start_step=1)
    assert [i for i, _ in sampler] == indices[4:]  # a resumed epoch goes on where it stopped
    with pytest.raises(ValueError, match="optim.batch_size: expected at most the largest group's 10 items, got 11"):
        ClipSampler(17, 11, groups=groups)


def test_warmup_starts_from_its_factor():
    optim = DetectConfig().optim
    assert optim.lr == 0.02 and optim.steps == [60_000, 80_000] and optim.warmup == 500
    assert learning_rate(optim, 0) == pytest.approx(0.02 * (1 / 3 + (2 / 3) / 500))
    assert learning_rate(optim, 249) == pytest.approx(0.02 * (1 / 3 + (2 / 3) * 250 / 500))
    assert learning_rate(optim, 499) == pytest.approx(0.02) and learning_rate(optim, 60_000) == pytest.approx(0.002)


def test_the_shapes_set_is_consistent_and_written_once(tmp_path):
    spec = ShapesSpec(train=6, val=2, height=64, width=80, seed=1)
    root = make_shapes(tmp_path / "shapes", spec, log=lambda _: None)
    stamp = (root / "manifest.json").stat().st_mtime_ns
    assert make_shapes(root, spec, log=lambda _: None) == root and (root / "manifest.json").stat().st_mtime_ns == stamp
    boxes = CocoDetection(*shape_paths(root, "train"))
    points = CocoDetection(*shape_paths(root, "train"), keypoints=True)
    assert len(boxes) == 6 and boxes.category_ids == [1, 2, 3] and points.keypoint_names == ["top", "left", "right"]
    found = 0
    for i in range(len(boxes)):
        image, target = boxes[i]
        background = image[:, :, 0].median(1).values
        for box, mask in zip(target["boxes"], target["masks"]):
            rows, cols = torch.nonzero(mask, as_tuple=True)
            assert (box - torch.stack([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])).abs().max() <= 1
            inside = image[:, rows, cols].mean(1)  # the object's colour differs from the background
            assert (inside - background).abs().max() > 0.1
        for polygon, keypoints in zip(points[i][1]["masks"], points[i][1]["keypoints"]):
            rows, cols = torch.nonzero(polygon, as_tuple=True)
            for x, y, v in keypoints.tolist():  # the vertices are corners of the triangle's mask
                distance = ((cols + 0.5 - x) ** 2 + (rows + 0.5 - y) ** 2).sqrt()
                assert v == 2 and distance.min() < 1.5 and (distance < 4).sum() < 0.1 * len(rows)
                found += 1
    assert found > 0


@pytest.mark.parametrize("nonlocal_backbone", [True, False], ids=["nonlocal", "baseline"])
def test_a_short_cpu_run_overfits_the_training_images(tmp_path, nonlocal_backbone):
    images, annotations, _ = make_coco(tmp_path, images=4)
    cfg = coco_config(images, annotations, f"model.nonlocal_backbone={nonlocal_backbone}", "optim.batch_size=2",
                      "optim.iterations=80", "optim.steps=[70]", "train.log_every=10", "train.checkpoint_every=80")
    result = detect.fit(cfg, tmp_path / "run")
    records = [r for r in _records(tmp_path / "run") if "kind" not in r]
    assert records[-1]["loss"] < 0.5 * records[0]["loss"]
    assert result["bbox"]["AP"] > 0.3 and result["segm"]["AP"] > 0.3 and result["images"] == 4
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert any("nonlocal_block" in k for k in state["model"]) == nonlocal_backbone
    if nonlocal_backbone:  # the block learned: W_z left zero
        assert state["model"]["backbone.body.layer3.4.nonlocal_block.out.weight"].abs().sum() > 0


def test_keypoint_training_moves_all_five_blocks_and_is_scored(tmp_path):
    # from scratch on four images the keypoint loss jumps about (one instance per image), so this
    # test asserts that every block learned and that COCOeval scores keypoints; the overfitting
    # tests above show the loss falling
    images, annotations, _ = make_coco(tmp_path, images=4)
    cfg = coco_config(images, annotations, "model.task=keypoint", "model.nonlocal_head=true", "optim.batch_size=2",
                      "optim.iterations=8", "optim.lr=0.01", "train.log_every=4", "train.checkpoint_every=8",
                      "model.detector.box_batch_size_per_image=16")
    result = detect.fit(cfg, tmp_path / "run")
    records = [r for r in _records(tmp_path / "run") if "kind" not in r]
    assert all(np.isfinite(r["loss_keypoint"]) and r["loss_keypoint"] > 0 for r in records)
    assert set(result) >= {"bbox", "keypoints"} and set(result["keypoints"]) == {"AP", "AP50", "AP75", "APm", "APl"}
    model, _, labels = detect.load_detector(tmp_path / "run" / "checkpoint.pt")
    assert labels == {"category_ids": [7], "keypoint_names": ["top", "left", "right"]}
    blocks = nonlocal_blocks_of(model)
    assert len(blocks) == 5 and all(block.out.weight.abs().sum() > 0 for block in blocks.values())


def test_resume_after_an_interruption_continues_exactly(tmp_path, monkeypatch):
    images, annotations, _ = make_coco(tmp_path, images=4)
    cfg = coco_config(images, annotations, "optim.batch_size=2", "optim.iterations=5", "train.log_every=1",
                      "train.checkpoint_every=2")
    whole = detect.fit(cfg, tmp_path / "whole")
    real = engine.learning_rate

    def interrupt(optim, iteration):
        if iteration == 3:  # after the checkpoint of iteration 2
            raise KeyboardInterrupt
        return real(optim, iteration)

    monkeypatch.setattr(engine, "learning_rate", interrupt)
    with pytest.raises(KeyboardInterrupt):
        detect.fit(cfg, tmp_path / "cut")
    monkeypatch.setattr(engine, "learning_rate", real)
    with pytest.raises(ValueError, match="already holds a run"):
        detect.fit(cfg, tmp_path / "cut")
    resumed = detect.fit(cfg, tmp_path / "cut", resume=True)
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(value, b["model"][key]) for key, value in a["model"].items())
    strip = lambda r: {k: v for k, v in r.items() if k not in ("images_per_s", "data_s_per_iter")}  # noqa: E731
    assert [strip(r) for r in _records(tmp_path / "cut")] == [strip(r) for r in _records(tmp_path / "whole")]
    assert resumed["bbox"] == whole["bbox"]


def test_unreadable_images_are_skipped_counted_and_named(tmp_path, caplog):
    images, annotations, _ = make_coco(tmp_path, images=4)
    (images / "1.png").write_bytes(b"\x89PNG not really")
    cfg = coco_config(images, annotations, "optim.batch_size=2", "optim.iterations=4", "train.log_every=2")
    with caplog.at_level("WARNING", logger="nonlocalnet"):
        result = detect.fit(cfg, tmp_path / "run")
    assert result["skipped_train_images"] >= 1 and result["skipped_images"] == 1 and result["images"] == 3
    assert any("1.png" in r.getMessage() for r in caplog.records)


def test_recipes_for_tables_5_and_6():
    from importlib import resources

    rows = {"mask_rcnn_r50_fpn_coco": ("mask", 50, False, False),
            "mask_rcnn_nl_r50_fpn_coco": ("mask", 50, True, False),
            "mask_rcnn_r101_fpn_coco": ("mask", 101, False, False),
            "mask_rcnn_nl_r101_fpn_coco": ("mask", 101, True, False),
            "keypoint_rcnn_r101_fpn_coco": ("keypoint", 101, False, False),
            "keypoint_rcnn_nl4head_r101_fpn_coco": ("keypoint", 101, False, True),
            "keypoint_rcnn_nl4head_nl1_r101_fpn_coco": ("keypoint", 101, True, True)}
    folder = resources.files("nonlocalnet") / "configs"
    for name, (task, depth, backbone, head) in rows.items():
        cfg = load_config(str(folder / f"{name}.yaml"), schema=DetectConfig)
        m = cfg.model
        assert (m.task, m.depth, m.nonlocal_backbone, m.nonlocal_head) == (task, depth, backbone, head), name
        assert cfg.data.dataset == "coco" and (cfg.optim.lr, cfg.optim.batch_size) == (0.02, 16), name
        assert m.trainable_layers == 3 and m.max_size == 1333, name
        with torch.device("meta"):
            model = detect.build_detector(m, 81 if task == "mask" else 2, 17)
        blocks = list(nonlocal_blocks_of(model))
        assert len(blocks) == backbone + 4 * head, name
    default = load_config(str(folder / "detect_shapes.yaml"), schema=DetectConfig)
    assert default.data.dataset == "shapes" and default.train.compare_baseline


def test_configuration_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="model.nonlocal_head: the head blocks belong to the keypoint head"):
        load_config(None, ["model.nonlocal_head=true"], schema=DetectConfig)
    with pytest.raises(ValueError, match="model.task: expected 'mask' or 'keypoint', got 'boxes'"):
        load_config(None, ["model.task=boxes"], schema=DetectConfig)
    with pytest.raises(ValueError, match=r"model.min_size: expected positive sizes up to model.max_size \(100\)"):
        load_config(None, ["model.min_size=[200]", "model.max_size=100"], schema=DetectConfig)
    with pytest.raises(ValueError, match="data.train_images: dataset 'coco' needs it"):
        detect.build_datasets(load_config(None, ["data.dataset=coco"], schema=DetectConfig).data)
    cfg = load_config(None, ["model.detector.no_such_option=1"], schema=DetectConfig)
    with pytest.raises(ValueError, match="model.detector: .*no_such_option"):
        detect.build_detector(cfg.model, 3)


def test_a_baseline_checkpoint_initialises_the_nonlocal_detector(tmp_path):
    images, annotations, _ = make_coco(tmp_path, images=2)
    cfg = coco_config(images, annotations, "model.nonlocal_backbone=false", "optim.batch_size=2",
                      "optim.iterations=1")
    detect.fit(cfg, tmp_path / "base")
    cfg.model.nonlocal_backbone = True
    cfg.model.weights = str(tmp_path / "base" / "checkpoint.pt")
    model = detect.build_detector(cfg.model, 3)
    base = torch.load(cfg.model.weights, weights_only=True)["model"]
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items() if "nonlocal_block" not in k)
    assert list(nonlocal_blocks_of(model)) == ["backbone.body.layer3.4"]
    cfg.model.depth = 101
    with pytest.raises(ValueError, match="model.weights: .* does not fit the detector"):
        detect.build_detector(cfg.model, 3)


def _cli(args, cwd, **kw):
    env = {**os.environ, "PYTHONPATH": str(Path(detect.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "nonlocalnet", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600, **kw)


def _overrides(images, annotations, *extra):
    return ["data.dataset=coco", f"data.train_images={images}", f"data.train_annotations={annotations}",
            f"data.val_images={images}", f"data.val_annotations={annotations}", *SMALL, *extra]


def test_cli_detect_train_and_evaluate(tmp_path):
    images, annotations, _ = make_coco(tmp_path, images=2)
    run = tmp_path / "run"
    done = _cli(["detect", "train", "--out", str(run), "--set",
                 *_overrides(images, annotations, "optim.batch_size=2", "optim.iterations=2",
                             "train.compare_baseline=true")], tmp_path)
    assert done.returncode == 0, done.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary) == {"baseline", "nonlocal"} and set(summary["nonlocal"]) >= {"bbox", "segm", "images"}
    assert "box AP" in done.stdout and "nonlocal" in done.stdout
    report = tmp_path / "report.json"
    done = _cli(["detect", "evaluate", "--weights", str(run / "nonlocal" / "checkpoint.pt"), "--json", str(report)],
                tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads((run / "nonlocal" / "result.json").read_text())
    assert json.loads(report.read_text())["segm"] == result["segm"]
    bad = _cli(["detect", "train", "--out", str(tmp_path / "x"), "--set", "model.depth=152"], tmp_path)
    assert bad.returncode == 2 and "nonlocalnet detect train: error: model.depth: expected 50 or 101" in bad.stderr


def test_torchrun_two_processes_match_one_process_with_accumulation(tmp_path):
    images, annotations, _ = make_coco(tmp_path, images=4)
    common = _overrides(images, annotations, "optim.batch_size=4", "optim.iterations=3", "train.eval_batch_size=1",
                        "train.compare_baseline=false")
    one = _cli(["detect", "train", "--out", str(tmp_path / "one"), "--set", *common, "optim.accumulate=2"], tmp_path)
    assert one.returncode == 0, one.stderr
    env = {**os.environ, "PYTHONPATH": str(Path(detect.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                          "nonlocalnet", "detect", "train", "--out", str(tmp_path / "two"), "--set", *common],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr
    a = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)
    assert len(b["rng"]) == 2 and len(a["rng"]) == 1
    for key, value in a["model"].items():
        assert torch.allclose(value.float(), b["model"][key].float(), rtol=1e-4, atol=1e-5), key
    ra = json.loads((tmp_path / "one" / "result.json").read_text())
    rb = json.loads((tmp_path / "two" / "result.json").read_text())
    assert ra["images"] == rb["images"] == 4  # every rank's share of the images was scored


def test_video_and_detection_checkpoints_are_told_apart(tmp_path):
    from nonlocalnet.config import Config, to_yaml

    video = {"model": {}, "config": to_yaml(Config()), "classes": ["a", "b"]}
    torch.save(video, tmp_path / "video.pt")
    with pytest.raises(ValueError, match=r"video.pt is not a nonlocalnet detection checkpoint \(no 'category_ids'\)"):
        detect.load_detector(tmp_path / "video.pt")
    torch.save({**video, "category_ids": [1]}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match=r"odd.pt is not a nonlocalnet detection checkpoint \(.*"):
        detect.load_detector(tmp_path / "odd.pt")
    torch.save({"model": {}, "config": to_yaml(DetectConfig()), "classes": ["a"]}, tmp_path / "boxes.pt")
    with pytest.raises(ValueError, match=r"boxes.pt is not a nonlocalnet training checkpoint \(.*"):
        engine.load_trained(tmp_path / "boxes.pt")
