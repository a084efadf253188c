"""Export (ONNX, TorchScript, PT2) with dynamic batch and time, and torch.compile: the results
agree with eager PyTorch on fresh random clips, for every block mode."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import rel_err
from nonlocalnet import NonLocalBlock
from nonlocalnet.bench import randomize_
from nonlocalnet.export import export_model, temporal_stride
from nonlocalnet.models import ResNet3d, create_model

MODES = ["gaussian", "embedded_gaussian", "dot_product", "concatenation"]


def every_mode_model():
    """A small I3D with one block of each mode (res3: two, res4: two), BN scales nonzero."""
    torch.manual_seed(0)
    model = ResNet3d(50, "3x1x1", "8x8", nonlocal_blocks={"res3": [0, 1], "res4": [0, 1]}, width=8,
                     stage_blocks=[1, 2, 2, 1], num_classes=7,
                     nonlocal_stage_options={"res3": {"mode": "gaussian"}, "res4": {"mode": "dot_product"}})
    model.res3[1].nonlocal_block = randomize_(NonLocalBlock(64, mode="embedded_gaussian"))
    model.res4[1].nonlocal_block = randomize_(NonLocalBlock(128, mode="concatenation"))
    for name in ("res3", "res4"):
        randomize_(getattr(model, name)[0].nonlocal_block)
    return model.eval()


def test_temporal_stride_of_the_stems():
    assert temporal_stride(create_model("i3d_r50_8x8", num_classes=3)) == 2
    assert temporal_stride(create_model("i3d_r50", num_classes=3)) == 8
    with pytest.raises(ValueError, match="frames: expected a positive multiple of the model's temporal stride 2, got 7"):
        export_model(every_mode_model(), "x.onnx", "onnx", frames=7, size=32)
    with pytest.raises(ValueError, match="format: expected one of"):
        export_model(every_mode_model(), "x.tflite", "tflite", frames=8, size=32)


def test_onnx_export_agrees_with_pytorch_on_other_batch_and_time(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = every_mode_model()
    report = export_model(model, tmp_path / "m.onnx", "onnx", frames=8, size=48)
    assert report["max_abs_error"] <= 1e-4 and report["checked"] == [3, 3, 10, 48, 48]
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for shape in [(1, 3, 4, 48, 48), (4, 3, 14, 48, 48)]:  # independently of the built-in check
        clip = torch.randn(*shape)
        got = torch.from_numpy(session.run(None, {"x": clip.numpy()})[0])
        with torch.no_grad():
            expected = model(clip)
        assert got.shape == expected.shape and (got - expected).abs().max() < 1e-4, shape


@pytest.mark.parametrize("fmt", ["torchscript", "pt2"])
def test_torchscript_and_pt2_exports_agree_with_pytorch(tmp_path, fmt):
    model = every_mode_model()
    path = tmp_path / f"m.{fmt}"
    report = export_model(model, path, fmt, frames=8, size=48)
    assert report["max_abs_error"] <= 1e-4
    loaded = torch.jit.load(str(path)) if fmt == "torchscript" else torch.export.load(str(path)).module()
    clip = torch.randn(2, 3, 6, 48, 48)
    with torch.no_grad():
        assert (loaded(clip) - model(clip)).abs().max() < 1e-4


def test_a_clip_of_one_stride_exports_with_fixed_time(tmp_path):
    model = every_mode_model()  # temporal stride 2
    report = export_model(model, tmp_path / "m.pt2", "pt2", frames=2, size=48)
    assert report["dynamic"] == "batch (time fixed at 2)" and report["checked"] == [3, 3, 2, 48, 48]
    assert report["max_abs_error"] <= 1e-4


@pytest.mark.parametrize("mode, affinity", [(m, "spacetime") for m in MODES] + [("embedded_gaussian", "space"),
                                                                               ("embedded_gaussian", "time")])
def test_compiled_block_equals_eager_values_and_gradients(mode, affinity):
    block = randomize_(NonLocalBlock(16, mode=mode, affinity=affinity)).double()
    compiled = torch.compile(block, dynamic=False)
    x = torch.randn(2, 16, 4, 6, 5, dtype=torch.float64, requires_grad=True)
    eager_out = block(x)
    (eager_grad,) = torch.autograd.grad(eager_out.square().sum(), x)
    out = compiled(x)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    assert rel_err(out, eager_out) < 1e-10 and rel_err(grad, eager_grad) < 1e-10


def test_compiled_zoo_model_equals_eager():
    model = create_model("i3d_nl5_r50_8x8", num_classes=5).eval()
    for block in (m for m in model.modules() if isinstance(m, NonLocalBlock)):
        randomize_(block)
    clip = torch.randn(1, 3, 4, 64, 64)
    compiled = torch.compile(model, dynamic=False)
    with torch.no_grad():
        assert rel_err(compiled(clip), model(clip)) < 1e-5


def test_cli_export(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(temporal_stride.__code__.co_filename).parents[1]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "nonlocalnet", "export", "c2d_nl5_r50_8x8", "--format", "pt2",
                           "--size", "64", "--frames", "4", "--num-classes", "3", "--out", str(tmp_path / "m.pt2")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "checked on a clip of shape (3, 3, 6, 64, 64): max abs error" in done.stdout and (tmp_path / "m.pt2").exists()
