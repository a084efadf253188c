"""Configuration: defaults are the paper's, files and overrides merge strictly."""

import pytest

from nonlocalnet.cli import _recipe
from nonlocalnet.config import Config, load_config, to_yaml


def test_defaults_are_the_paper_recipe():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert (cfg.optim.batch_size, cfg.optim.lr, cfg.optim.iterations, cfg.optim.steps) == (64, 0.01, 400_000,
                                                                                             [150_000, 300_000])
    assert cfg.optim.nesterov and cfg.optim.weight_decay == 1e-4 and cfg.model.dropout == 0.5
    assert (cfg.data.scales, cfg.data.crop, cfg.data.test_clips, cfg.data.test_crops) == ([256, 320], 224, 10, 3)
    assert cfg.train.precise_bn == 200


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name: i3d_nl5_r50_8x8\noptim:\n  lr: 0.005\n")
    cfg = load_config(path, ["optim.lr=0.02", "data.frames=8", "model.nonlocal_blocks={res3: [1]}"])
    assert cfg.model.name == "i3d_nl5_r50_8x8" and cfg.optim.lr == 0.02 and cfg.data.frames == 8
    assert cfg.model.nonlocal_blocks == {"res3": [1]}
    assert load_config(path, []).optim.lr == 0.005
    assert "lr: 0.005" in to_yaml(load_config(path))


@pytest.mark.parametrize("text, overrides, match", [
    ("optim:\n  lrr: 0.1\n", [], r"config in .*c\.yaml: .*lrr.*\(key: optim\.lrr\)"),
    ("", ["optim.lr=fast"], r"overrides: .*fast.*\(key: optim\.lr\)"),
    ("", ["optim.lr"], r"overrides: expected key=value, got \['optim\.lr'\]"),
])
def test_unknown_keys_and_wrong_types_are_errors(tmp_path, text, overrides, match):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_config(path, overrides)


def test_recipes_ship_with_the_package():
    cfg = load_config(_recipe(None))
    assert cfg.train.compare_baseline and cfg.data.dataset == "synthetic"
    assert cfg.model.nonlocal_blocks == {"res3": [0], "res4": [0]}
    with pytest.raises(FileNotFoundError, match=r"shipped recipe \(.*default.*\), got 'nope'"):
        _recipe("nope")
    with pytest.raises(FileNotFoundError, match="config: no such file"):
        load_config("/nonexistent/c.yaml")


def test_paper_recipes_name_zoo_models_with_their_inputs():
    from importlib import resources

    from nonlocalnet.models import model_card

    recipes = sorted(p for p in (resources.files("nonlocalnet") / "configs").iterdir() if p.name.endswith(".yaml"))
    names = {p.name for p in recipes}
    for arch in ("c2d", "c2d_nl5", "i3d", "i3d_nl5"):
        for variant in ("r50_32x2", "r101_32x2", "r50_8x8"):
            assert f"{arch}_{variant}_kinetics400.yaml" in names
    assert "i3d_nl5_r101_128x1_charades.yaml" in names
    for path in recipes:
        if path.name == "default.yaml" or path.name.startswith(("detect_", "mask_rcnn", "keypoint_rcnn")):
            continue  # the detection recipes: tests/test_detect_train.py
        cfg = load_config(str(path))
        card = model_card(cfg.model.name)
        assert (cfg.data.frames, cfg.data.rate) == (card.frames, card.rate), path.name
        assert (cfg.optim.lr, cfg.optim.batch_size) in {(0.01, 64), (0.0025, 16), (0.00125, 8)}, path.name
        assert (cfg.train.precise_bn == 0) == card.frozen_bn, path.name
        assert cfg.data.dataset == ("charades" if "charades" in path.name else "kinetics")


@pytest.mark.parametrize("override, match", [
    ("train.log_every=0", "train.log_every: expected a positive int, got 0"),
    ("train.precise_bn=-1", "train.precise_bn: expected an int >= 0, got -1"),
    ("data.test_crops=2", "data.test_crops: expected 1 or 3, got 2"),
    ("data.scales=[200,320]", r"data.scales: expected \[low, high\] with data.crop \(224\) <= low <= high"),
    ("model.dropout=1.0", r"model.dropout: expected a probability in \[0, 1\), got 1.0"),
    ("train.amp=fp8", "train.amp: expected none, bf16 or fp16, got 'fp8'"),
])
def test_unusable_values_are_named(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, [override])


def test_overrides_on_a_saved_config():
    from nonlocalnet.config import merge_overrides

    cfg = merge_overrides(load_config(), ["data.val=other.csv", "data.test_clips=2"])
    assert cfg.data.val == "other.csv" and cfg.data.test_clips == 2
    with pytest.raises(ValueError, match=r"overrides: .*\(key: data.nope\)"):
        merge_overrides(cfg, ["data.nope=1"])
