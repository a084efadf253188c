"""Dense float32 matrix products through oneDNN on CPU.

PyTorch's ``torch.mm`` on CPU calls the BLAS it was built with (MKL in the PyPI wheels), while its
1x1 convolutions and ``mkldnn._linear_pointwise`` call oneDNN. MKL's float32 GEMM does not use
AVX-512 on AMD processors; oneDNN does: on a 2-core AMD EPYC (Zen 5) a (1568 x 1024) @ (1024 x
512) product ran at about 180 GFLOP/s through ``torch.mm`` and 350-400 GFLOP/s through oneDNN.
Both are exact float32 products (oneDNN's default float32 mode is IEEE; only the order of the
sums differs). :func:`mm` takes the oneDNN route for float32 CPU operands big enough to pay for
its per-call cost and falls back to ``torch.mm`` otherwise (other dtypes and devices, tracing,
torch.compile, a PyTorch without oneDNN, or ``NONLOCALNET_ONEDNN=0`` in the environment).

:func:`mm` has no autograd formula of its own: it is called inside the autograd Functions of the
block's kernels (forward and backward), or through :func:`bmm`, which has one.
"""

from __future__ import annotations

import functools
import os

import torch
from torch.autograd.function import once_differentiable

# Multiply-adds below which torch.mm is used: oneDNN costs about 15 us per call against 2-4 us.
MIN_MACS = 1 << 18


@functools.cache
def _onednn_linear():
    """``torch.ops.mkldnn._linear_pointwise`` if this PyTorch has it and it computes x @ w^T
    correctly here, else None."""
    if os.environ.get("NONLOCALNET_ONEDNN", "1") == "0" or not torch.backends.mkldnn.is_available():
        return None
    try:
        op = torch.ops.mkldnn._linear_pointwise
        a = torch.arange(12, dtype=torch.float32).view(3, 4)
        w = torch.arange(20, dtype=torch.float32).view(5, 4).flip(0)
        bias = torch.arange(5, dtype=torch.float32)
        if not torch.equal(op(a, w, bias, "none", [], ""), torch.addmm(bias, a, w.t())):
            return None
    except (AttributeError, RuntimeError):
        return None
    return op


def uses_onednn(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether :func:`mm` takes the oneDNN route for these operands."""
    return (
        not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
        and a.device.type == "cpu"
        and a.dtype == torch.float32
        and b.dtype == torch.float32
        and a.shape[0] * a.shape[1] * b.shape[1] >= max(MIN_MACS, 1)
        and _onednn_linear() is not None
    )


def _dense(t: torch.Tensor) -> bool:
    """Row- or column-major without padding between rows / columns."""
    return t.is_contiguous() or t.t().is_contiguous()


def mm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` (+ ``bias`` added to every row) for 2-D ``a`` (n, k) and ``b`` (k, m).

    Returns a new row-major (n, m) tensor. Either operand may be a transposed or sliced view; views
    that oneDNN reads slowly are copied first: it takes ``a`` row-major with any row stride or dense
    column-major, and ``b`` dense only (a row-major slice of a wider matrix ran 1000x slower).
    """
    if not uses_onednn(a, b):
        return torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)
    if a.stride(1) != 1 and not a.t().is_contiguous():
        a = a.contiguous()
    weight = b.t()  # oneDNN's (m, k) weight
    if not _dense(weight):
        weight = weight.contiguous()
    if bias is not None:
        bias = bias.to(torch.float32).contiguous()
    return _onednn_linear()(a, weight, bias, "none", [], "")


def batched_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.bmm(a, b)`` without autograd, one :func:`mm` per batch entry (either operand may
    be broadcast along the batch with ``expand``)."""
    if a.shape[0] == 0 or not uses_onednn(a[0], b[0]):
        return torch.bmm(a, b)
    out = a.new_empty(a.shape[0], a.shape[1], b.shape[2])
    for i in range(a.shape[0]):
        out[i] = mm(a[i], b[i])
    return out


class _BatchedMatMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return batched_mm(a, b)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        da = batched_mm(grad, b.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        db = batched_mm(a.transpose(1, 2), grad) if ctx.needs_input_grad[1] else None
        return da, db


def bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.bmm(a, b)`` with autograd, one :func:`mm` per batch entry."""
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
        raise ValueError(f"a, b: expected (B, n, k) and (B, k, m), got shapes {tuple(a.shape)}, {tuple(b.shape)}")
    if torch.jit.is_tracing() or torch.compiler.is_compiling() or a.shape[0] == 0 or not uses_onednn(a[0], b[0]):
        return torch.bmm(a, b)  # one op, any batch size (a loop would fix it under tracing)
    return _BatchedMatMul.apply(a, b)
