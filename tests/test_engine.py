"""Training engine: sampler layout, schedule, weight-decay groups, precise BN, multi-view
evaluation, exact resume, unreadable videos during training, and 2-process torchrun (gloo)."""

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

av = pytest.importorskip("av")

from nonlocalnet import engine  # noqa: E402
from nonlocalnet.config import load_config, to_yaml  # noqa: E402
from nonlocalnet.data.datasets import Annotations, VideoDataset, read_list  # noqa: E402
from nonlocalnet.data.synthetic import SyntheticSpec, make_synthetic  # noqa: E402
from nonlocalnet.models import ResNet3d  # noqa: E402

SPEC = SyntheticSpec(train=16, val=6, height=32, width=40, frames=8)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("data") / "syn", SPEC, log=lambda *a: None)


def tiny_overrides(root, **extra):
    values = {
        "model.width": 4, "model.stage_blocks": "[1,1,1,1]", "model.stem": "8x8", "model.nonlocal_blocks": "{res3: [0]}",
        "data.dataset": "list", "data.train": root / "train.txt", "data.val": root / "val.txt",
        "data.classes": root / "classes.txt", "data.frames": 4, "data.rate": 2, "data.scales": "[32,36]",
        "data.crop": 32, "data.test_scale": 32, "data.test_crop": 32, "data.test_clips": 2, "data.test_crops": 3,
        "data.workers": 0, "optim.batch_size": 4, "optim.iterations": 6, "optim.lr": 0.05, "optim.steps": "[4]",
        "train.precise_bn": 2, "train.checkpoint_every": 2, "train.log_every": 2, "train.progress": False,
        "train.tensorboard": False, "train.compare_baseline": False, "optim.schedule": "steps", "optim.warmup": 0,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def tiny_config(root, **extra):
    return load_config(None, tiny_overrides(root, **extra))


# ------------------------------------------------------------------------------------------- sampler


def test_sampler_epochs_are_permutations_cut_into_global_batches():
    sampler = engine.ClipSampler(10, 4, seed=3)
    sampler.set_epoch(0)
    first = [i for i, _ in sampler]
    assert len(first) == len(sampler) == 8 and len(set(first)) == 8  # 2 steps of 4; the last 2 videos dropped
    sampler.set_epoch(1)
    assert [i for i, _ in sampler] != first
    sampler.set_epoch(0, start_step=1)
    assert [i for i, _ in sampler] == first[4:] and len(sampler) == 4
    seeds = [s for _, s in engine.ClipSampler(10, 4, seed=3)]
    assert len(set(seeds)) == len(seeds)


def test_one_process_with_accumulation_cuts_batches_as_two_processes():
    single = list(engine.ClipSampler(24, 8, accumulate=2, seed=1))
    ranks = [list(engine.ClipSampler(24, 8, world=2, rank=r, seed=1)) for r in (0, 1)]
    micro = 4
    for step in range(3):
        chunk = single[step * 8 : (step + 1) * 8]
        assert chunk[:micro] == ranks[0][step * micro : (step + 1) * micro]
        assert chunk[micro:] == ranks[1][step * micro : (step + 1) * micro]


def test_sampler_errors():
    with pytest.raises(ValueError, match=r"optim.batch_size: expected a multiple of processes x optim.accumulate = 2 x 2, got 6"):
        engine.ClipSampler(100, 6, accumulate=2, world=2)
    with pytest.raises(ValueError, match="optim.batch_size: expected at most the 3 training videos, got 4"):
        engine.ClipSampler(3, 4)


# ------------------------------------------------------------------------------------ optimisation


def test_step_schedule_is_the_papers():
    cfg = load_config().optim  # LR 0.01, /10 at 150k and 300k, 400k iterations
    assert [engine.learning_rate(cfg, i) for i in (0, 149_999, 150_000, 299_999, 300_000, 399_999)] == pytest.approx(
        [0.01, 0.01, 0.001, 0.001, 0.0001, 0.0001])
    cfg.warmup = 10
    assert engine.learning_rate(cfg, 0) == pytest.approx(0.001) and engine.learning_rate(cfg, 9) == pytest.approx(0.01)
    cfg.schedule, cfg.iterations, cfg.warmup = "cosine", 100, 0
    assert engine.learning_rate(cfg, 50) == pytest.approx(0.005) and engine.learning_rate(cfg, 100) == pytest.approx(0)
    cfg.schedule = "poly"
    with pytest.raises(ValueError, match="optim.schedule: expected 'steps' or 'cosine', got 'poly'"):
        engine.learning_rate(cfg, 0)


def test_no_weight_decay_on_bn_and_biases():
    model = ResNet3d(50, width=4, stage_blocks=(1, 1, 1, 1), nonlocal_blocks={"res3": (0,)}, num_classes=3)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = engine.param_groups(model, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    decayed = {names[id(p)] for p in decay["params"]}
    assert "res3.0.nonlocal_block.theta.weight" in decayed and "pred.weight" in decayed and "conv1.weight" in decayed
    assert not any("bn" in n or n.endswith("bias") or "norm" in n for n in decayed)
    assert {names[id(p)] for p in no_decay["params"]} >= {"res3.0.nonlocal_block.norm.weight", "res2.0.branch2a_bn.bias",
                                                         "pred.bias", "res3.0.nonlocal_block.theta.bias"}
    decay, _ = engine.param_groups(model, 1e-4, decay_biases=True)  # the official code's choice
    assert "pred.bias" in {names[id(p)] for p in decay["params"]}
    assert len(decay["params"]) + len(_["params"]) == len(list(model.parameters()))


def test_mixed_precision_needs_cuda():
    with pytest.raises(ValueError, match="train.amp: bf16 mixed precision needs a CUDA device, got cpu"):
        engine._autocast("bf16", torch.device("cpu"))
    with pytest.raises(ValueError, match="train.amp: expected 'none', 'bf16' or 'fp16', got 'fp8'"):
        engine._autocast("fp8", torch.device("cpu"))


def _bn_and_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(3, 5, 1), nn.BatchNorm3d(5), nn.Dropout(0.5))
    batches = [{"clip": torch.randn(2, 3, 2, 4, 4) * (i + 1) + 3 * i} for i in range(3)]  # shifted batches
    return model, batches, [model[0](b["clip"]).detach().transpose(0, 1).flatten(1) for b in batches]


def test_precise_bn_is_the_population_statistics_of_all_batches():
    """The official recompute: mean and E[x^2] averaged over the batches, var = E[x^2] - mean^2,
    which is the biased variance of all the batches taken together (equal-sized batches)."""
    model, batches, features = _bn_and_batches()
    together = torch.cat(features, 1)  # (C, all positions of all batches)
    state = torch.get_rng_state()
    assert engine.precise_bn(model, batches, torch.device("cpu")) == 3
    assert torch.equal(torch.get_rng_state(), state)  # training randomness untouched
    torch.testing.assert_close(model[1].running_mean, together.mean(1))
    torch.testing.assert_close(model[1].running_var, together.var(1, unbiased=False))
    means = torch.stack([f.mean(1) for f in features])  # the spread of the batch means counts:
    within = torch.stack([f.var(1, unbiased=False) for f in features]).mean(0)
    torch.testing.assert_close(model[1].running_var, within + means.var(0, unbiased=False))
    assert (means.var(0) > 0.1 * within).any()  # and is not negligible in this test
    assert model[1].momentum == 0.1 and model[1].training


def test_precise_bn_reaches_the_norms_of_non_local_blocks():
    """The block applies its BatchNorm through a flat fast path: precise BN's statistics must still
    see it (they once read zeros there, and the default job's evaluation collapsed to one class)."""
    from nonlocalnet import NonLocalBlock

    torch.manual_seed(0)
    block = NonLocalBlock(8, inner_channels=4)
    torch.nn.init.normal_(block.out.weight)
    batches = [{"clip": torch.randn(2, 8, 2, 4, 4) + i} for i in range(3)]
    with torch.no_grad():
        features = [block.transform(b["clip"]).transpose(0, 1).flatten(1) for b in batches]
    assert engine.precise_bn(block, batches, torch.device("cpu")) == 3
    together = torch.cat(features, 1)
    torch.testing.assert_close(block.norm.running_mean, together.mean(1))
    torch.testing.assert_close(block.norm.running_var, together.var(1, unbiased=False))
    assert not block.norm._forward_pre_hooks  # the hooks are removed again: the fast path is back


def test_precise_bn_average_of_batch_variances_as_pyslowfast():
    model, batches, features = _bn_and_batches()
    assert engine.precise_bn(model, batches, torch.device("cpu"), variance="average") == 3
    torch.testing.assert_close(model[1].running_mean, torch.stack([f.mean(1) for f in features]).mean(0))
    torch.testing.assert_close(model[1].running_var, torch.stack([f.var(1, unbiased=True) for f in features]).mean(0))
    with pytest.raises(ValueError, match="precise_bn_variance: expected 'population' or 'average'"):
        engine.precise_bn(model, batches, torch.device("cpu"), variance="pooled")


def test_precise_bn_without_a_readable_batch_keeps_the_statistics():
    model, _, _ = _bn_and_batches()
    model[1].running_mean.fill_(0.25)
    assert engine.precise_bn(model, [{"skipped": []}], torch.device("cpu")) == 0
    assert torch.equal(model[1].running_mean, torch.full((5,), 0.25))


# --------------------------------------------------------------------------------------- evaluation


def test_evaluation_averages_every_view_of_a_video(synthetic):
    ann = read_list(synthetic / "val.txt", classes=synthetic / "classes.txt")
    ds = VideoDataset(ann, "test", frames=4, rate=2, test_scale=32, test_crop=32, clips=2, crops=3)
    torch.manual_seed(0)
    model = ResNet3d(50, stem="8x8", width=4, stage_blocks=(1, 1, 1, 1), num_classes=2).eval()
    with torch.no_grad():
        for m in model.modules():  # non-trivial statistics so that the views differ in score
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.uniform_(-1, 1)
                m.weight.uniform_(0.5, 2)
        model.pred.weight.normal_(0, 0.02)
    result = engine.evaluate(model, ds, batch_size=3, window=1)
    with torch.no_grad():
        expected = torch.stack([
            torch.stack([model.view_scores(ds[v * 2 + c]["clip"], window=1).double() for c in range(2)]).mean((0, 1))
            for v in range(len(ann))])
    torch.testing.assert_close(result["scores"], expected, rtol=1e-5, atol=1e-7)
    assert result["views"].tolist() == [2.0] * len(ann) and result["targets"].tolist() == [0, 1] * 3
    assert not torch.allclose(result["scores"][0], result["scores"][1])


# ----------------------------------------------------------------------------------------- training


def _state(path):
    return torch.load(path, weights_only=True)


def test_fit_trains_logs_and_writes_everything(synthetic, tmp_path):
    cfg = tiny_config(synthetic, **{"train.tensorboard": "null", "optim.accumulate": 2})
    result = engine.fit(cfg, tmp_path / "run")
    assert 0 <= result["top1"] <= 1 and result["videos"] == SPEC.val and result["classes"] == ["different", "same"]
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"checkpoint.pt", "metrics.jsonl", "config.yaml", "result.json", "confusion.png"} <= files
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if "kind" not in r] == [2, 4, 6]
    assert [r["kind"] for r in records if "kind" in r] == ["val"]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    state = _state(tmp_path / "run" / "checkpoint.pt")
    assert state["iteration"] == 6 and state["classes"] == ["different", "same"]
    assert state["config"] == to_yaml(cfg)
    if importlib.util.find_spec("tensorboard"):  # the dev extra installs it
        events = list((tmp_path / "run" / "tensorboard").iterdir())
        assert events and events[0].stat().st_size > 0
    with pytest.raises(ValueError, match="already holds a run .*--resume"):
        engine.fit(cfg, tmp_path / "run")


def test_resume_after_an_interruption_continues_exactly(synthetic, tmp_path, monkeypatch):
    cfg = tiny_config(synthetic, **{"model.dropout": 0.5})
    whole = engine.fit(cfg, tmp_path / "whole")
    real = engine.learning_rate

    def interrupt(optim, iteration):
        if iteration == 3:  # after the checkpoint of iteration 2, during the next one
            raise KeyboardInterrupt
        return real(optim, iteration)

    monkeypatch.setattr(engine, "learning_rate", interrupt)
    with pytest.raises(KeyboardInterrupt):
        engine.fit(cfg, tmp_path / "cut")
    assert _state(tmp_path / "cut" / "checkpoint.pt")["iteration"] == 2
    monkeypatch.setattr(engine, "learning_rate", real)
    resumed = engine.fit(cfg, tmp_path / "cut", resume=True)
    a, b = _state(tmp_path / "whole" / "checkpoint.pt"), _state(tmp_path / "cut" / "checkpoint.pt")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert resumed["top1"] == whole["top1"] and resumed["confusion"] == whole["confusion"]
    lines = lambda run: [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]  # noqa
    strip = lambda r: {k: v for k, v in r.items() if k not in ("clips_per_s", "data_s_per_iter")}  # noqa
    assert [strip(r) for r in lines("cut")] == [strip(r) for r in lines("whole")]


def test_unreadable_videos_are_skipped_counted_and_logged(synthetic, tmp_path, caplog):
    lines = (synthetic / "train.txt").read_text().splitlines()
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "junk.mp4").write_bytes(os.urandom(3000))
    lines[1] = f"{tmp_path / 'empty.mp4'} 1"
    lines[4] = f"{tmp_path / 'missing.mp4'} 0"
    lines[7] = f"{tmp_path / 'junk.mp4'} 1"
    (tmp_path / "train.txt").write_text("".join(f"{synthetic / x.split()[0]} {x.split()[1]}\n" for x in lines))
    cfg = tiny_config(synthetic, **{"data.train": tmp_path / "train.txt", "optim.iterations": 8})
    with caplog.at_level("WARNING", logger="nonlocalnet"):
        result = engine.fit(cfg, tmp_path / "run")
    assert result["skipped_train_clips"] >= 2  # each bad video once per epoch; 2 epochs of 4 steps
    named = " ".join(r.getMessage() for r in caplog.records)
    for name in ("empty.mp4: empty file", "junk.mp4", "train: 1 annotated videos not found", "missing.mp4"):
        assert name in named
    assert _state(tmp_path / "run" / "checkpoint.pt")["iteration"] == 8


# ----------------------------------------------------------------------------------- command line


def _cli(args, cwd, env_extra=None, **kw):
    env = {**os.environ, "PYTHONPATH": str(Path(engine.__file__).parents[1]), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "nonlocalnet", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, **kw)


def test_cli_train_evaluate_predict(synthetic, tmp_path):
    args = ["train", "--out", str(tmp_path / "run"), "--set", *tiny_overrides(synthetic, **{"train.compare_baseline": True})]
    done = _cli(args, tmp_path)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary) == {"baseline", "nonlocal"} and all(0 <= s["top1"] <= 1 for s in summary.values())
    assert "baseline" in done.stdout and "nonlocal" in done.stdout
    baseline = _state(tmp_path / "run" / "baseline" / "checkpoint.pt")
    assert not any("nonlocal_block" in k for k in baseline["model"])
    weights = str(tmp_path / "run" / "nonlocal" / "checkpoint.pt")
    done = _cli(["evaluate", "--weights", weights, "--clips", "1", "--crops", "1"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["videos"] == SPEC.val
    video = str(synthetic / "videos" / "val" / "00000.mp4")
    done = _cli(["predict", video, str(tmp_path / "nothing.mp4"), "--weights", weights], tmp_path)
    assert done.returncode == 1  # one of the two could not be read
    first, second = done.stdout.splitlines()
    assert first.startswith(video + ": ") and {"same", "different"} <= set(first.replace(",", " ").split())
    assert "nothing.mp4: error: no view could be decoded" in second
    # the run's checkpoint, without a zoo name, for the pictures and the export (frames from its config)
    done = _cli(["visualize", video, "--checkpoint", weights, "--block", "res3.0", "--size", "32", "--top", "3",
                 "--out", str(tmp_path / "att.png")], tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "att.png").exists() and done.stdout.count("query ") == 3
    done = _cli(["export", "--checkpoint", weights, "--format", "torchscript", "--size", "32",
                 "--out", str(tmp_path / "m.ts")], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "checked on a clip of shape (3, 3, 6, 32, 32)" in done.stdout


def test_cli_kill_and_resume_matches_an_uninterrupted_run(synthetic, tmp_path):
    extra = {"optim.iterations": 120, "train.checkpoint_every": 4, "train.log_every": 4, "optim.steps": "[60]"}
    base = ["train", "--set", *tiny_overrides(synthetic, **extra)]
    done = _cli(base + ["--out", str(tmp_path / "whole")], tmp_path)
    assert done.returncode == 0, done.stderr
    env = {**os.environ, "PYTHONPATH": str(Path(engine.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "nonlocalnet", *base, "--out", str(tmp_path / "cut")], cwd=tmp_path,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "cut" / "checkpoint.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.kill()
    assert process.wait() == -9, "the run ended before it could be killed"
    assert _state(checkpoint)["iteration"] < 120
    done = _cli(base + ["--out", str(tmp_path / "cut"), "--resume"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "cut" / "summary.json").read_text() == (tmp_path / "whole" / "summary.json").read_text()
    a, b = _state(tmp_path / "whole" / "checkpoint.pt"), _state(checkpoint)
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())


def test_torchrun_two_processes_match_one_process_with_accumulation(synthetic, tmp_path):
    extra = {"model.dropout": 0.0, "optim.batch_size": 4}  # dropout masks are per process
    one = _cli(["train", "--out", str(tmp_path / "one"), "--set", *tiny_overrides(synthetic, **extra),
                "optim.accumulate=2"], tmp_path)
    assert one.returncode == 0, one.stderr
    env = {**os.environ, "PYTHONPATH": str(Path(engine.__file__).parents[1])}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                          "nonlocalnet", "train", "--out", str(tmp_path / "two"), "--set",
                          *tiny_overrides(synthetic, **extra)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr
    assert "terminate called" not in two.stderr
    a, b = _state(tmp_path / "one" / "checkpoint.pt"), _state(tmp_path / "two" / "checkpoint.pt")
    assert len(b["rng"]) == 2
    for key, value in a["model"].items():
        if not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(b["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    ra = json.loads((tmp_path / "one" / "summary.json").read_text())["model"]
    rb = json.loads((tmp_path / "two" / "summary.json").read_text())["model"]
    assert ra["top1"] == rb["top1"] and ra["videos"] == rb["videos"] == SPEC.val


def test_annotations_object_with_no_records_is_an_error():
    with pytest.raises(ValueError, match="optim.batch_size: expected at most the 0 training videos"):
        engine.ClipSampler(len(Annotations([], ["a"])), 4)


def test_annotation_problems_are_named(synthetic, tmp_path):
    cfg = tiny_config(synthetic, **{"data.root": tmp_path / "elsewhere", "data.dataset": "kinetics",
                                    "data.train": tmp_path / "k.csv", "data.val": tmp_path / "k.csv"})
    cfg.data.classes = ""
    (tmp_path / "k.csv").write_text("label,youtube_id,time_start,time_end\na,x,0,10\nb,y,0,10\n")
    with pytest.raises(ValueError, match=r"data.train: no usable entries; none of its 2 videos was found"):
        engine.build_annotations(cfg.data)
    (tmp_path / "k.csv").write_text("youtube_id,time_start,time_end\nx,0,10\n")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x_000000_000010.mp4").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"data.train: 1 entries have no label"):
        engine.build_annotations(cfg.data)


def test_compare_job_resumes_in_the_run_it_was_killed_in(synthetic, tmp_path, monkeypatch):
    cfg = tiny_config(synthetic, **{"train.compare_baseline": True})
    whole = engine.train_job(cfg, tmp_path / "whole")
    real, calls = engine.fit, []

    def fit_then_die(run_cfg, out, **kw):
        calls.append(Path(out).name)
        if Path(out).name == "nonlocal" and not kw.get("resume"):
            monkeypatch.setattr(engine, "learning_rate", interrupt)
        return real(run_cfg, out, **kw)

    def interrupt(optim, iteration):
        if iteration == 5:
            raise KeyboardInterrupt
        return engine_learning_rate(optim, iteration)

    engine_learning_rate = engine.learning_rate
    monkeypatch.setattr(engine, "fit", fit_then_die)
    with pytest.raises(KeyboardInterrupt):
        engine.train_job(cfg, tmp_path / "cut")
    monkeypatch.setattr(engine, "learning_rate", engine_learning_rate)
    resumed = engine.train_job(cfg, tmp_path / "cut", resume=True)
    assert calls == ["baseline", "nonlocal", "nonlocal"]  # the finished baseline is read back, not re-run
    assert resumed == whole
    assert json.loads((tmp_path / "cut" / "summary.json").read_text()) == whole


def test_initial_weights_fine_tune_the_classifier_and_name_what_does_not_fit(tmp_path):
    from nonlocalnet.config import ModelConfig
    from nonlocalnet.weights import save_weights

    fields = {"width": 8, "stage_blocks": [1, 1, 1, 1], "stem": "8x8", "nonlocal_blocks": {"res3": [0]}}
    source = engine.build_model(ModelConfig(**fields), 5)
    torch.nn.init.normal_(source.res3[0].nonlocal_block.theta.weight)
    save_weights(source.state_dict(), tmp_path / "w.pt")
    model = engine.build_model(ModelConfig(**fields, weights=str(tmp_path / "w.pt")), 3)  # another class count
    assert model.pred.weight.shape[0] == 3
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items() if not k.startswith("pred."))
    with pytest.raises(ValueError, match=r"model.weights: .* does not fit the model: missing \[.*nonlocal_block"):
        engine.build_model(ModelConfig(**{**fields, "nonlocal_blocks": {"res3": [0], "res4": [0]}},
                                       weights=str(tmp_path / "w.pt")), 3)
