"""Exporting video models (``nonlocalnet export``): ONNX (the ``export`` extra: onnx, onnxscript and
onnxruntime), TorchScript and PT2 (``torch.export``), each checked against eager PyTorch.

The batch and time axes stay dynamic: the time axis as a multiple of the model's temporal stride
(the product of its convs' and pools' strides in time: 2 for the 8x8 stem, 8 for the 32x2 one)
from two strides on, the spatial size fixed at the example's. A clip of one stride (8 frames into
a 32x2-stem model) leaves one frame for the last stages, which the traced program cannot share
with longer clips: it exports with its time fixed. After writing, the file is loaded back and run on a fresh
random clip with another batch size and another clip length than the example's; the largest
absolute difference from the eager model must stay within ``atol``, else the export fails.

The non-local blocks export as they run: ``scaled_dot_product_attention`` for the softmax modes,
the associative form for the dot product, and for concatenation the sort-based form (TorchScript,
PT2), or in ONNX, which has no ``searchsorted``, the direct form that forms the N x M affinity
(``impl="naive"`` while exporting). Their cost-based choice between exact forms adds no shape
guard for symbolic sizes (:meth:`NonLocalBlock._folds`).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from .block import NonLocalBlock

__all__ = ["FORMATS", "temporal_stride", "export_model"]

FORMATS = ("onnx", "torchscript", "pt2")


def temporal_stride(model: nn.Module) -> int:
    """The product of the time strides of the model's 3-D convs and pools."""
    stride = 1
    for module in model.modules():
        if isinstance(module, (nn.Conv3d, nn.MaxPool3d, nn.AvgPool3d)):
            value = module.stride if isinstance(module.stride, tuple) else (module.stride,) * 3
            stride *= int(value[0])
    return stride


def _onnx():
    try:
        import onnxruntime
        import onnxscript  # noqa: F401  (torch.onnx's exporter)
    except ImportError:  # pragma: no cover - the message is the test
        raise ImportError("ONNX export needs onnx, onnxscript and onnxruntime: pip install 'nonlocalnet[export]'") \
            from None
    return onnxruntime


@contextmanager
def _without_searchsorted(model: nn.Module):
    """Concatenation blocks on their direct form (ONNX has no searchsorted), restored afterwards."""
    changed = [(b, b.impl) for b in model.modules() if isinstance(b, NonLocalBlock) and b.mode == "concatenation"]
    for block, _ in changed:
        block.impl = "naive"
    try:
        yield
    finally:
        for block, impl in changed:
            block.impl = impl


def _dynamic(stride: int, frames: int):
    """Dynamic batch, and time in multiples of the stride from 2 strides on: a clip of one stride
    reaches the last stages with one frame, which the traced program cannot share (a guard), so
    ``frames == stride`` exports with a fixed time."""
    axes = {0: torch.export.Dim("batch", min=1, max=1024)}
    if frames >= 2 * stride:
        axes[2] = stride * torch.export.Dim("time", min=2, max=max(64, 4 * frames // stride))
    return {"x": axes}


def export_model(model: nn.Module, path: str | os.PathLike, fmt: str, *, frames: int, size: int, batch: int = 2,
                 atol: float = 1e-4, seed: int = 0) -> dict:
    """Write ``model`` (eval mode) to ``path`` as ``fmt`` for inputs (B, 3, T, size, size) and check
    the file against eager PyTorch on a fresh clip (B + 1, 3, T + stride, size, size), or
    (B + 1, 3, T, size, size) when T is one stride and stays fixed. Returns the report: format,
    path, checked shape, max_abs_error, dynamic axes."""
    if fmt not in FORMATS:
        raise ValueError(f"format: expected one of {FORMATS}, got {fmt!r}")
    stride = temporal_stride(model)
    if frames < 1 or frames % stride:
        raise ValueError(f"frames: expected a positive multiple of the model's temporal stride {stride}, got {frames}")
    model = model.eval()
    generator = torch.Generator().manual_seed(seed)
    example = torch.randn(batch, 3, frames, size, size, generator=generator)
    dynamic_time = frames >= 2 * stride
    check = torch.randn(batch + 1, 3, frames + stride if dynamic_time else frames, size, size, generator=generator)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        expected = model(check)
        if fmt == "onnx":
            onnxruntime = _onnx()
            with _without_searchsorted(model):
                torch.onnx.export(model, (example,), os.fspath(path), dynamo=True,
                                  dynamic_shapes=_dynamic(stride, frames), input_names=["x"], output_names=["logits"],
                                  verbose=False)
            session = onnxruntime.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
            got = torch.from_numpy(session.run(None, {"x": check.numpy()})[0])
        elif fmt == "torchscript":
            traced = torch.jit.trace(model, example, check_trace=False)
            traced.save(os.fspath(path))
            got = torch.jit.load(os.fspath(path))(check)
        else:
            program = torch.export.export(model, (example,), dynamic_shapes=_dynamic(stride, frames))
            torch.export.save(program, os.fspath(path))
            got = torch.export.load(os.fspath(path)).module()(check)
    error = float((got.float() - expected.float()).abs().max())
    report = {"format": fmt, "path": os.fspath(path), "example": list(example.shape), "checked": list(check.shape),
              "max_abs_error": error,
              "dynamic": f"batch, time (multiples of {stride})" if dynamic_time else f"batch (time fixed at {frames})"}
    if not error <= atol:
        raise ValueError(f"export: the {fmt} file differs from the eager model by {error:.3g} (> atol {atol}) on a "
                         f"clip of shape {tuple(check.shape)}")
    return report
