"""Faults of a training run (issue 16): divergence (a learning rate of 1e6, NaN weights saved by hand),
a run whose videos cannot be read, a second process on the same ``--out``, ``--resume`` into an
empty folder or with another model width, a full disk while a checkpoint is written, a kill during
a checkpoint write, stale temporaries, a validation set without a readable video, NaN in a JSON
report and a legacy (non-zip) torch file. Each ends in a named error (one line and exit code 2 on
the command line) that leaves the last good checkpoint in place, or in a run that goes on as it
should."""

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from .faultkit import tiny_config, tiny_overrides

from nonlocalnet import checkpoint as ckpt
from nonlocalnet import engine, lock
from nonlocalnet.cli import main


def strict_json(text: str):
    """``json.loads`` that refuses the bare NaN / Infinity Python's json writes by default."""
    def refuse(name):
        raise AssertionError(f"invalid JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def finite(path) -> bool:
    state = torch.load(path, weights_only=True)
    return not ckpt.non_finite(state["model"]) and not ckpt.non_finite(state["optimizer"])


def train(capsys, root, out, *args, **extra) -> tuple[int, str]:
    """``nonlocalnet train`` in-process; its exit code and stderr."""
    capsys.readouterr()
    rc = main(["train", "--out", str(out), *args, "--set", *tiny_overrides(root, **extra)])
    return rc, capsys.readouterr().err


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("nonlocalnet ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def trained(tiny_set, tmp_path_factory):
    """A finished 4-iteration run (checkpoints at iterations 2 and 4)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    engine.fit(tiny_config(tiny_set), out)
    return out


def copy_run(trained, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


def bad_list(tmp_path, root, count: int, name: str = "train.txt") -> Path:
    """A list of ``root``'s training videos whose first ``count`` entries are files that do not decode."""
    lines = [f"{root / x.split()[0]} {x.split()[1]}" for x in (root / "train.txt").read_text().splitlines()]
    for i in range(count):
        junk = tmp_path / f"junk{i}.mp4"
        junk.write_bytes(os.urandom(2000))
        lines[i] = f"{junk} {lines[i].split()[-1]}"
    path = tmp_path / name
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


# ------------------------------------------------------------------------------------------- divergence


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_set, tmp_path, capsys):
    rc, err = train(capsys, tiny_set, tmp_path / "run", **{"optim.lr": 1e6})
    line = one_line_error(err)
    assert rc == 2
    assert "diverged" in line and "not finite at iteration 3" in line and str(tmp_path / "run" / "checkpoint.pt") in line
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["iteration"] == 2
    assert finite(tmp_path / "run" / "checkpoint.pt")
    assert not (tmp_path / "run" / "summary.json").exists() and not (tmp_path / "run" / "result.json").exists()


def test_weights_that_are_not_finite_are_never_saved(trained, tmp_path, tiny_set):
    out = copy_run(trained, tmp_path)
    before = (out / "checkpoint.pt").read_bytes()
    cfg = tiny_config(tiny_set)
    model = engine.build_model(cfg.model, 2)
    with torch.no_grad():
        model.conv1.weight[0, 0, 0, 0, 0] = float("nan")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    with pytest.raises(engine.DivergedError, match=r"1 model or optimizer tensors are not finite at iteration 6 "
                                                    r"\(e\.g\. \['conv1\.weight'\]\).*keeps the last good state"):
        engine.save_run(out / "checkpoint.pt", model, optimizer, scaler, 6, cfg, {"skipped": 0}, classes=["a", "b"])
    assert (out / "checkpoint.pt").read_bytes() == before


def test_a_new_checkpoint_keeps_the_one_before_it(trained):
    previous = torch.load(trained / "checkpoint.prev.pt", weights_only=True)
    assert previous["iteration"] == 2 and torch.load(trained / "checkpoint.pt", weights_only=True)["iteration"] == 4
    assert not [p.name for p in trained.iterdir() if p.name.endswith(".tmp")]


def test_resume_from_a_checkpoint_with_nan_is_refused(trained, tmp_path, tiny_set, capsys):
    out = copy_run(trained, tmp_path)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    state["model"]["pred.weight"][0, 0] = float("nan")
    torch.save(state, out / "checkpoint.pt")
    rc, err = train(capsys, tiny_set, out, "--resume", **{"optim.iterations": 6})
    line = one_line_error(err)
    assert rc == 2
    assert f"resume: {out / 'checkpoint.pt'} holds non-finite values (1 tensors, e.g. ['pred.weight'])" in line
    assert f"move {out / 'checkpoint.prev.pt'} to {out / 'checkpoint.pt'}" in line


# ------------------------------------------------------------------------------------------ unreadable data


def test_a_run_whose_videos_cannot_be_read_stops_and_logs_no_loss(tiny_set, tmp_path, capsys):
    out = tmp_path / "run"
    rc, err = train(capsys, tiny_set, out, **{"data.train": bad_list(tmp_path, tiny_set, 8)})
    line = one_line_error(err)
    assert rc == 2
    # 12 of the 12 clips drawn by iteration 3: over 0.2 of 50 (the floor)
    assert "data.max_unreadable: 12 of 12 training items drawn so far could not be read" in line
    records = [strict_json(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2]
    assert not any("loss" in r or "top1" in r for r in records)  # not "loss 0.0"
    assert not (out / "summary.json").exists()


def test_a_few_unreadable_videos_are_skipped_and_counted(tiny_set, tmp_path):
    # 2 of 8 videos (25%, over max_unreadable 0.2) but 4 skips of 16 draws stay under 0.2 of the floor of 50
    cfg = tiny_config(tiny_set, **{"data.train": bad_list(tmp_path, tiny_set, 2)})
    result = engine.fit(cfg, tmp_path / "run")
    assert result["skipped_train_clips"] == 4
    cfg.data.max_unreadable = 0.0  # any unreadable item stops
    with pytest.raises(engine.UnreadableDataError, match="1 of 4 training items"):
        engine.fit(cfg, tmp_path / "strict")


@pytest.mark.parametrize("schema", ["video", "detection"])
def test_max_unreadable_is_a_share(schema):
    from nonlocalnet.config import Config, DetectConfig, load_config

    with pytest.raises(ValueError, match=r"data.max_unreadable: expected a share in \[0, 1\] \(1: off\), got 1.5"):
        load_config(None, ["data.max_unreadable=1.5"], schema=DetectConfig if schema == "detection" else Config)


def test_missing_videos_are_counted_when_the_annotations_are_read(tiny_set, tmp_path):
    (tmp_path / "videos").mkdir()
    rows = ["label,youtube_id,time_start,time_end"]
    for i, line in enumerate((tiny_set / "train.txt").read_text().splitlines()[:4]):
        video = tiny_set / line.split()[0]
        os.symlink(video, tmp_path / "videos" / f"v{i}_000000_000010.mp4")
    rows += [f"{'ab'[i % 2]},v{i},0,10" for i in range(15)]  # 4 found, 11 not: 11 > 0.2 x 50
    (tmp_path / "k.csv").write_text("\n".join(rows) + "\n")
    cfg = tiny_config(tiny_set, **{"data.dataset": "kinetics", "data.root": tmp_path / "videos",
                                   "data.train": tmp_path / "k.csv", "data.val": tmp_path / "k.csv"})
    cfg.data.classes = ""  # the CSV's labels
    with pytest.raises(engine.UnreadableDataError, match=r"11 of 15 videos listed in data.train could not be read"):
        engine.build_annotations(cfg.data)
    cfg.data.max_unreadable = 1.0
    train, _ = engine.build_annotations(cfg.data)
    assert len(train) == 4 and len(train.missing) == 11


def test_evaluating_a_set_without_a_readable_video_is_an_error(trained, tmp_path, tiny_set, capsys):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(os.urandom(2000))
    (tmp_path / "val.txt").write_text(f"{junk} 0\n{junk} 1\n")
    rc = main(["evaluate", "--weights", str(trained / "checkpoint.pt"), "--set", f"data.val={tmp_path / 'val.txt'}"])
    line = one_line_error(capsys.readouterr().err)
    assert rc == 2 and "data.val: none of the 2 validation videos could be read (2 views skipped)" in line


# ----------------------------------------------------------------------------------------- JSON reports


def test_reports_are_strict_json_with_null_for_nan(trained, tiny_set, tmp_path):
    engine.run_job(tiny_config(tiny_set), None, tmp_path / "job", False,
                   lambda *a, **k: {"top1": float("nan"), "top5": float("inf"), "videos": 4}, lambda r: r)
    summary = strict_json((tmp_path / "job" / "summary.json").read_text())
    assert summary == {"model": {"top1": None, "top5": None, "videos": 4}}
    assert "nan" in engine.summary_table(summary)  # a table of what was read back
    strict_json((trained / "result.json").read_text())
    for line in (trained / "metrics.jsonl").read_text().splitlines():
        strict_json(line)


def test_evaluate_prints_and_writes_strict_json(trained, tmp_path, monkeypatch, capsys):
    report = {"mAP": float("nan"), "videos": 4, "per_class_ap": [0.5, float("nan")]}  # e.g. no positive at all
    monkeypatch.setattr(engine, "evaluate_checkpoint", lambda *a, **k: report)
    rc = main(["evaluate", "--weights", str(trained / "checkpoint.pt"), "--json", str(tmp_path / "report.json")])
    assert rc == 0
    assert strict_json(capsys.readouterr().out) == {"mAP": None, "videos": 4}
    assert strict_json((tmp_path / "report.json").read_text())["per_class_ap"] == [0.5, None]


def test_evaluate_reads_only_the_validation_list(trained, tiny_set):
    report = engine.evaluate_checkpoint(trained / "checkpoint.pt", overrides=["data.train=/nowhere/train.txt"])
    assert report["videos"] == 4


# ------------------------------------------------------------------------------------------ run folders


def test_a_second_run_into_the_same_out_is_refused(tiny_set, tmp_path, capsys):
    out = tmp_path / "run"
    # the package's lock module alone (importing the package, torch included, takes seconds)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import importlib.util, sys, time\n"
         f"spec = importlib.util.spec_from_file_location('lock', {str(Path(lock.__file__))!r})\n"
         "lock = importlib.util.module_from_spec(spec); spec.loader.exec_module(lock)\n"
         f"with lock.exclusive({str(out / '.lock')!r}, what='x'):\n    print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        rc, err = train(capsys, tiny_set, out)
    finally:
        holder.kill()
        holder.wait()
    line = one_line_error(err)
    assert rc == 2 and f"out: {out} is in use by another process (pid {holder.pid} on " in line
    assert not (out / "checkpoint.pt").exists() and not (out / "metrics.jsonl").exists()


def test_resume_into_a_folder_without_a_run_is_an_error(tiny_set, tmp_path, capsys):
    rc, err = train(capsys, tiny_set, tmp_path / "typo", "--resume")
    assert rc == 2
    assert f"out: {tmp_path / 'typo'} holds no run to resume; drop --resume to start one" in one_line_error(err)
    assert not (tmp_path / "typo").exists()


def test_resume_of_a_compare_job_starts_a_sub_run_without_checkpoint_from_zero(tiny_set, tmp_path, caplog):
    cfg = tiny_config(tiny_set)
    (tmp_path / "job" / "baseline").mkdir(parents=True)
    (tmp_path / "job" / "baseline" / "config.yaml").write_text("model: {}\n")
    calls = []

    def fit_run(run_cfg, folder, *, resume, name):
        calls.append((Path(folder).name, resume))
        return {"top1": 0.5}

    with caplog.at_level("INFO", logger="nonlocalnet"):
        summary = engine.run_job(cfg, cfg, tmp_path / "job", True, fit_run, lambda r: r)
    assert calls == [("baseline", False), ("nonlocal", False)] and summary["nonlocal"] == {"top1": 0.5}
    assert "baseline: no checkpoint in" in caplog.text and "it starts from iteration 0" in caplog.text


def test_stale_checkpoint_temporaries_are_removed_at_the_start(tiny_set, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    ours = ["checkpoint.pt.ab_c1234.tmp", "checkpoint.prev.pt.zz9x8y7w.tmp"]
    others = ["checkpoint.pt.notours.tmp", "notes.tmp", "checkpoint.pt.abcd12345.tmp"]
    for name in ours + others:
        (out / name).write_bytes(b"x")
    engine.run_job(tiny_config(tiny_set), None, out, False, lambda *a, **k: {}, lambda r: r)
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp")) == sorted(others)


def test_resume_with_another_model_width_names_the_checkpoint_and_the_shapes(trained, tmp_path, tiny_set, capsys):
    out = copy_run(trained, tmp_path)
    rc, err = train(capsys, tiny_set, out, "--resume", **{"model.width": 8, "optim.iterations": 6})
    line = one_line_error(err)
    assert rc == 2
    assert f"resume: {out / 'checkpoint.pt'} does not fit the configured model (" in line
    assert "conv1.weight: checkpoint (4, 3, 1, 7, 7), model (8, 3, 1, 7, 7)" in line


# ---------------------------------------------------------------------------------- checkpoint writes


def test_a_full_disk_keeps_the_last_checkpoint(tiny_set, tmp_path, monkeypatch):
    real, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) >= 2:  # from the checkpoint of iteration 4 on
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", save)
    out = tmp_path / "run"
    with pytest.raises(ckpt.CheckpointWriteError) as caught:  # an OSError: the CLI prints "PATH: reason"
        engine.train_job(tiny_config(tiny_set), out)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(out / "checkpoint.pt")
    assert caught.value.strerror == "cannot be written (No space left on device); the previous checkpoint is kept"
    assert torch.load(out / "checkpoint.pt", weights_only=True)["iteration"] == 2
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_legacy_torch_file_is_read_where_it_would_be_mapped(trained, tmp_path, capsys):
    legacy = tmp_path / "legacy.pt"
    torch.save(torch.load(trained / "checkpoint.pt", weights_only=True), legacy, _use_new_zipfile_serialization=False)
    assert ckpt.load_checkpoint(legacy, mmap=True)["iteration"] == 4
    rc = main(["evaluate", "--weights", str(legacy), "--clips", "1", "--crops", "1"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert strict_json(captured.out)["videos"] == 4


@pytest.mark.slow
def test_a_kill_during_a_checkpoint_write_resumes_from_the_last_checkpoint(tiny_set, tmp_path, capsys):
    """SIGKILL while ``atomic_save`` writes the second checkpoint (its data written, not yet renamed);
    the resumed run removes the temporary and finishes. Exactness of a resumed run:
    tests/test_engine.py::test_cli_kill_and_resume_matches_an_uninterrupted_run."""
    out, flag = tmp_path / "run", tmp_path / "writing"
    script = (
        "import sys, time, torch\nfrom nonlocalnet import checkpoint\nreal, calls = torch.save, []\n"
        "def save(obj, f, *a, **k):\n    calls.append(1)\n    real(obj, f, *a, **k)\n"
        f"    if len(calls) == 2:\n        f.flush(); open({str(flag)!r}, 'w').close(); time.sleep(120)\n"
        "checkpoint.torch.save = save\nfrom nonlocalnet.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", script, "train", "--out", str(out), "--set",
                                *tiny_overrides(tiny_set)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not flag.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.kill()
    assert process.wait() == -9, process.stderr.read()
    stale = [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert len(stale) == 1 and stale[0].startswith("checkpoint.pt.")
    assert torch.load(out / "checkpoint.pt", weights_only=True)["iteration"] == 2
    rc, err = train(capsys, tiny_set, out, "--resume")
    assert rc == 0, err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["iteration"] == 4
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_detection_stops_on_a_non_finite_loss_too(tmp_path, monkeypatch):
    """The detector's loss (a sum of a dict's values) goes through the same check as the video loss."""
    pytest.importorskip("pycocotools")
    pytest.importorskip("torchvision")
    from nonlocalnet import detect
    from nonlocalnet.config import DetectConfig, load_config

    real, calls = detect.build_detector, []

    def build(*args, **kwargs):
        model = real(*args, **kwargs)
        forward = model.forward

        def nan_at_the_third_step(images, targets=None):
            losses = forward(images, targets)
            if model.training:
                calls.append(1)
                if len(calls) == 3:
                    losses = {**losses, "loss_mask": losses["loss_mask"] * float("nan")}
            return losses

        model.forward = nan_at_the_third_step
        return model

    monkeypatch.setattr(detect, "build_detector", build)
    cfg = load_config(None, [f"data.root={tmp_path / 'shapes'}", "data.shapes_train=4", "data.shapes_val=2",
                             "data.shapes_size=[64,64]", "data.workers=0", "model.min_size=[64]", "model.max_size=64",
                             "optim.batch_size=2", "optim.iterations=4", "optim.steps=[]", "optim.warmup=0",
                             "train.checkpoint_every=2", "train.progress=false", "train.tensorboard=false"],
                      schema=DetectConfig)
    with pytest.raises(engine.DivergedError, match=r"not finite at iteration 3; the last good checkpoint, of "
                                                   r"iteration 2, is .*checkpoint\.pt"):
        detect.fit(cfg, tmp_path / "run")
    assert finite(tmp_path / "run" / "checkpoint.pt")


@pytest.mark.slow
def test_a_loss_that_is_not_finite_on_one_rank_stops_every_rank(tiny_set, tmp_path):
    """Under torchrun (2 processes, gloo) rank 1 alone sees a NaN loss at iteration 3: both ranks stop
    with the same error instead of one waiting for the other at the next collective."""
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(
        "import os, sys\nfrom nonlocalnet import engine\nfrom nonlocalnet.cli import main\nreal, calls = engine._loss, []\n"
        "def loss(*args):\n    value = real(*args)\n    calls.append(1)\n"
        "    return value * float('nan') if os.environ['RANK'] == '1' and len(calls) == 3 else value\n"
        "engine._loss = loss\nsys.exit(main(sys.argv[1:]))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), "train", "--out", str(tmp_path / "run"), "--set",
                           *tiny_overrides(tiny_set, **{"model.dropout": 0.0})],
                          env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode != 0
    assert done.stderr.count("training diverged: the loss is not finite at iteration 3") == 2  # each rank says it
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["iteration"] == 2
