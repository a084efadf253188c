"""Faults injected on the command line: bad configs and arguments (malformed YAML in a file and in a
``--set`` value, a YAML list at the top level, unusable optimiser values, a misspelt data set, sizes
and counts below one, ``--out`` naming a file where a run folder belongs), ``--set`` on a mapping
(it must replace the file's value, not merge into it), a model name that contradicts the
checkpoint's, errors of unexpected types, a full disk (``/dev/full``) and a refused write; and a
detector that finds nothing, which must score AP 0 (as COCOeval scores misses), not -1.

Each must end as exactly one line on stderr naming the input (``nonlocalnet <command>: error:
...``), exit code 2 and no traceback; ``--debug`` brings the traceback back.
"""

import argparse
import json
import os

import pytest
import torch

from .faultkit import tiny_overrides
from nonlocalnet import cli
from nonlocalnet.cli import main
from nonlocalnet.config import load_config


def one_line_error(capsys, argv, *names) -> str:
    """Run ``nonlocalnet argv`` in process; it must fail with one stderr line naming ``names``."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    line = err.strip()
    command = argv[0] if argv[0] != "detect" else f"detect {argv[1]}"
    assert line.startswith(f"nonlocalnet {command}: error: "), line
    for name in names:
        assert name in line, line
    return line


@pytest.fixture()
def no_training(monkeypatch):
    """A check that lets a bad value through fails the test at once instead of training the default job."""
    from nonlocalnet import detect, engine

    def started(*args, **kwargs):
        raise AssertionError("training started: the bad input was not caught")

    monkeypatch.setattr(engine, "train_job", started)
    monkeypatch.setattr(detect, "train_job", started)


@pytest.fixture(scope="module")
def tiny_run(tiny_set, tmp_path_factory):
    """A training run whose config file gives a res3 block and whose ``--set`` gives res4 only."""
    root = tmp_path_factory.mktemp("cli-run")
    (root / "res3.yaml").write_text("model:\n  nonlocal_blocks: {res3: [0]}\n")
    overrides = tiny_overrides(tiny_set, **{"model.nonlocal_blocks": "{res4: [0]}", "optim.iterations": 2,
                                            "optim.steps": "[1]"})
    assert main(["train", str(root / "res3.yaml"), "--out", str(root / "run"), "--set", *overrides]) == 0
    return root / "run"


# ------------------------------------------------------------------------- --set replaces mappings


def test_set_on_a_mapping_replaces_the_files_value(tiny_run):
    keys = torch.load(tiny_run / "checkpoint.pt", weights_only=True)["model"]
    stages = {k.split(".")[0] for k in keys if "nonlocal" in k}
    assert stages == {"res4"}, stages  # merging kept the file's res3 block as well


def test_set_empty_mapping_removes_every_block_and_option(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  nonlocal_blocks: {res3: [0, 1]}\n  options: {stem: mmaction2}\n")
    cfg = load_config(path, ["model.nonlocal_blocks={}", "model.options={}"])
    assert cfg.model.nonlocal_blocks == {} and cfg.model.options == {}
    cfg = load_config(path, ["model.options={dropout: 0.1}", "model.nonlocal_blocks.res4=[2]"])
    assert cfg.model.options == {"dropout": 0.1}  # replaced
    assert cfg.model.nonlocal_blocks == {"res3": [0, 1], "res4": [2]}  # a key inside the mapping: added
    assert load_config(path, ["model={depth: 101}"]).model.nonlocal_blocks == {"res3": [0, 1]}  # a section merges


def test_a_files_mapping_replaces_the_default_because_the_defaults_are_empty():
    # load_config merges a file over the defaults, which equals replacing only while no mapping
    # field has a default entry: one that gets one must be replaced explicitly in load_config
    import dataclasses
    import typing

    from nonlocalnet.config import Config, DetectConfig

    checked = []
    for schema in (Config, DetectConfig):
        for section in dataclasses.fields(schema):
            values = getattr(schema(), section.name)
            hints = typing.get_type_hints(type(values))
            mappings = [f.name for f in dataclasses.fields(values) if "dict" in str(hints[f.name]).lower()]
            checked += mappings
            for name in mappings:
                assert not getattr(values, name), f"{schema.__name__}.{section.name}.{name}"
    assert {"nonlocal_blocks", "options", "detector"} <= set(checked)


# --------------------------------------------------------------------------- bad configs, one line


def test_malformed_yaml_in_a_file(no_training, tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  nonlocal_blocks: {res3: [0\n")
    one_line_error(capsys, ["train", path], str(path), "malformed YAML")


def test_malformed_yaml_in_a_set_value(no_training, capsys):
    one_line_error(capsys, ["train", "--set", "model.nonlocal_blocks={res3: [0"], "model.nonlocal_blocks",
                   "malformed YAML")


@pytest.mark.parametrize("text, names", [
    ("- model\n- data\n", ["at the top level", "got a list"]),
    ("just words\n", ["at the top level", "got a str"]),
    ("model: 3\n", ["model: expected a mapping", "got 3"]),
])
def test_yaml_that_is_not_sections(no_training, tmp_path, capsys, text, names):
    path = tmp_path / "odd.yaml"
    path.write_text(text)
    one_line_error(capsys, ["train", path], str(path), *names)


def test_detect_train_names_the_file_too(no_training, tmp_path, capsys):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n")
    one_line_error(capsys, ["detect", "train", path], str(path), "at the top level")


@pytest.mark.parametrize("override, names", [
    ("optim.lr=-1", ["optim.lr", "> 0", "-1"]),
    ("optim.lr=nan", ["optim.lr", "nan"]),
    ("optim.momentum=1", ["optim.momentum", "[0, 1)"]),
    ("optim.weight_decay=-0.1", ["optim.weight_decay", ">= 0"]),
    ("optim.gamma=0", ["optim.gamma", "> 0"]),
    ("optim.steps=[300,150]", ["optim.steps", "increasing", "[300, 150]"]),
    ("optim.iterations=50", ["optim.steps", "optim.iterations (50)", "[100]"]),  # the LR would never drop
    ("train.timeout=0", ["train.timeout", "positive"]),
    ("data.dataset=kinetic", ["data.dataset", "got 'kinetic'", "did you mean 'kinetics'?"]),
])
def test_unusable_values_are_named_before_any_work(no_training, capsys, override, names):
    # the default recipe's schedule is cosine, which has no steps
    one_line_error(capsys, ["train", "--set", "optim.schedule=steps", "optim.steps=[100]", override], *names)


def test_detect_dataset_did_you_mean(no_training, capsys):
    one_line_error(capsys, ["detect", "train", "--set", "data.dataset=coc"], "data.dataset", "did you mean 'coco'?")


def test_a_cosine_schedule_ignores_steps():
    assert load_config(None, ["optim.schedule=cosine", "optim.iterations=100"]).optim.iterations == 100


@pytest.mark.parametrize("argv, names", [
    (["info", "c2d_r50", "--size", "-5"], ["--size", "'-5'"]),
    (["info", "c2d_r50", "--frames", "0"], ["--frames", "'0'"]),
    (["info", "c2d_r50", "--num-classes", "0"], ["--num-classes"]),
    (["export", "c2d_r50", "--num-classes", "0"], ["--num-classes"]),
    (["visualize", "v.mp4", "--block", "res3.0", "--num-classes", "-1"], ["--num-classes"]),
    (["convert", "a.pkl", "b.pt", "--model", "c2d_r50", "--num-classes", "0"], ["--num-classes"]),
    (["evaluate", "--weights", "w.pt", "--batch-size", "0"], ["--batch-size"]),
    (["bench", "--repeats", "0"], ["--repeats"]),
    (["evaluate"], ["--weights"]),  # a missing argument: argparse's usage block was several lines
])
def test_counts_and_sizes_below_one_and_usage_errors(capsys, argv, names):
    one_line_error(capsys, argv, "expected a positive int" if argv[-1] in ("0", "-5", "-1") else "required", *names)


def test_out_naming_an_existing_file(no_training, tiny_set, tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("mine\n")
    one_line_error(capsys, ["train", "--out", out, "--set", *tiny_overrides(tiny_set)], "out:", str(out))
    assert out.read_text() == "mine\n"


def test_json_naming_a_folder_fails_before_the_work(tmp_path, capsys):
    one_line_error(capsys, ["evaluate", "--weights", tmp_path / "none.pt", "--json", tmp_path], "json:", str(tmp_path))


# ------------------------------------------------------------- model names against the checkpoint's


@pytest.fixture()
def named_weights(tmp_path):
    """A weights file (the format of ``nonlocalnet convert``) that names its model, i3d_r50."""
    from nonlocalnet.weights import FORMAT

    path = tmp_path / "i3d.pt"
    torch.save({"format": FORMAT, "model": "i3d_r50", "state_dict": {}, "meta": {}, "options": {}, "classes": None},
               path)
    return path


def test_export_name_against_the_weights_files_model(named_weights, tmp_path, capsys):
    one_line_error(capsys, ["export", "c2d_r50", "--checkpoint", named_weights, "--out", tmp_path / "m.onnx"],
                   "NAME is 'c2d_r50'", "'i3d_r50'", str(named_weights))


def test_visualize_model_against_the_weights_files_model(named_weights, tmp_path, capsys):
    one_line_error(capsys, ["visualize", tmp_path / "v.mp4", "--model", "c2d_r50", "--checkpoint", named_weights,
                            "--block", "res3.0", "--out", tmp_path / "a.png"],
                   "--model is 'c2d_r50'", "'i3d_r50'")


def test_export_name_against_a_training_checkpoint(tiny_run, tmp_path, capsys):
    one_line_error(capsys, ["export", "c2d_r50", "--checkpoint", tiny_run / "checkpoint.pt",
                            "--out", tmp_path / "m.onnx"], "NAME is 'c2d_r50'", "built from its config")


def test_the_checkpoints_own_name_is_fine():
    args = argparse.Namespace(model="i3d_r50", command="export", checkpoint="w.pt")
    cli._same_model(args, "i3d_r50")
    cli._same_model(argparse.Namespace(model=None, command="visualize", checkpoint="w.pt"), "")


# ------------------------------------------------------------------ errors of any type, one line


def test_an_unexpected_error_is_one_line_with_its_type(monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("the kernel said no\n  at layer 3")

    monkeypatch.setattr(cli, "_models", broken)
    line = one_line_error(capsys, ["models"], "RuntimeError: the kernel said no at layer 3", "--debug")
    assert "\n" not in line
    with pytest.raises(RuntimeError, match="the kernel said no"):
        main(["--debug", "models"])
    with pytest.raises(RuntimeError):
        main(["models", "--debug"])


def test_a_refused_write_names_the_path(monkeypatch, capsys):
    def refused(args):
        raise PermissionError(13, "Permission denied", "/srv/runs/x/checkpoint.pt")

    monkeypatch.setattr(cli, "_models", refused)
    one_line_error(capsys, ["models"], "/srv/runs/x/checkpoint.pt: Permission denied")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_full_disk_names_the_file(monkeypatch, capsys):
    from nonlocalnet import bench

    monkeypatch.setattr(bench, "matmul_rates", lambda device, dtype: {"torch": None})  # seconds of 2048^2 products
    one_line_error(capsys, ["bench", "--shape", "1,4,1,2,2", "--modes", "dot_product", "--impls", "naive",
                            "--repeats", "1", "--forward-only", "--json", "/dev/full"],
                   "/dev/full: No space left on device")


def test_a_missing_extra_keeps_its_message(monkeypatch, capsys):
    def missing(args):
        raise ImportError("detection needs pycocotools: pip install nonlocalnet[detection]")

    monkeypatch.setattr(cli, "_models", missing)
    line = one_line_error(capsys, ["models"], "pip install nonlocalnet[detection]")
    assert "ImportError" not in line and "--debug" not in line


def test_under_torchrun_a_rank_names_itself(no_training, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    one_line_error(capsys, ["train", "--set", "optim.lr=-1"], "error: rank 1: optim.lr")


# ------------------------------------------------------------------- a detector that finds nothing


def _two_squares(tmp_path):
    """Ground truth: a 20 x 20 square (small) in each of two images, category 3; no medium or large objects."""
    data = {"images": [{"id": i, "file_name": f"{i}.png", "width": 96, "height": 64} for i in (1, 2)],
            "categories": [{"id": 3, "name": "square"}],
            "annotations": [{"id": i, "image_id": i, "category_id": 3, "bbox": [10, 10, 20, 20], "area": 400,
                             "iscrowd": 0, "segmentation": [[10, 10, 30, 10, 30, 30, 10, 30]]} for i in (1, 2)]}
    path = tmp_path / "truth.json"
    path.write_text(json.dumps(data))
    return argparse.Namespace(annotation_file=str(path), category_ids=[3])


def test_no_detections_score_zero_not_minus_one(tmp_path):
    pytest.importorskip("pycocotools")
    from nonlocalnet.detect import STAT_NAMES, _pycocotools, _score

    COCO, COCOeval, _ = _pycocotools()
    dataset = _two_squares(tmp_path)
    nothing = _score(COCO, COCOeval, dataset, {"bbox": [], "segm": []}, [1, 2], ("bbox", "segm"))
    expected = {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "APs": 0.0, "APm": -1.0, "APl": -1.0}  # -1: no such objects
    assert nothing == {"bbox": expected, "segm": expected}
    miss = [{"image_id": 1, "category_id": 3, "bbox": [60, 40, 20, 20], "score": 0.9}]  # no overlap
    missed = _score(COCO, COCOeval, dataset, {"bbox": miss}, [1, 2], ("bbox",))
    assert missed["bbox"] == nothing["bbox"] and set(missed["bbox"]) == set(STAT_NAMES["bbox"])


def test_a_non_utf8_path_in_set_is_named(capsys):
    bad = os.fsdecode(b"/tmp/vid\xff.txt")
    assert main(["train", "--set", f"data.train={bad}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the value of data.train is not UTF-8 text" in err[0]
