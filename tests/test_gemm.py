"""oneDNN float32 products (nonlocalnet._gemm) against torch.mm in float64: every operand layout,
the bias, the batched product with autograd, and the fallbacks."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import rel_err
from nonlocalnet import _gemm

N, K, M = 37, 29, 23


def _layout(rows, cols, kind):
    """A (rows, cols) float32 operand laid out row-major, column-major, or as a slice of a wider
    matrix either way (a row / column stride larger than the width)."""
    if kind == "row":
        return torch.randn(rows, cols)
    if kind == "col":
        return torch.randn(cols, rows).t()
    if kind == "row_slice":
        return torch.randn(rows, cols + 5)[:, 2 : 2 + cols]
    if kind == "col_slice":
        return torch.randn(cols + 5, rows)[1 : 1 + cols].t()
    return torch.randn(rows, 2 * cols)[:, ::2]  # no unit stride at all


LAYOUTS = ["row", "col", "row_slice", "col_slice", "strided"]


@pytest.mark.parametrize("a_kind", LAYOUTS)
@pytest.mark.parametrize("b_kind", LAYOUTS)
@pytest.mark.parametrize("bias", [False, True])
def test_onednn_product_of_every_layout(onednn, a_kind, b_kind, bias):
    a, b = _layout(N, K, a_kind), _layout(K, M, b_kind)
    c = torch.randn(M) if bias else None
    expected = a.double() @ b.double() + (c.double() if bias else 0)
    with onednn() as calls:
        out = _gemm.mm(a, b, c)
    assert calls.count == 1  # the oneDNN route was taken, whatever the layout
    assert out.shape == (N, M) and out.is_contiguous() and out.dtype == torch.float32
    assert rel_err(out, expected) < 1e-6
    assert _gemm.uses_onednn(a, b)


def test_fallbacks_are_torch_mm():
    a, b = torch.randn(N, K, dtype=torch.float64), torch.randn(K, M, dtype=torch.float64)
    assert not _gemm.uses_onednn(a, b)  # no float64 in oneDNN
    assert torch.equal(_gemm.mm(a, b), a @ b)
    c = torch.randn(M, dtype=torch.float64)
    assert torch.equal(_gemm.mm(a, b, c), torch.addmm(c, a, b))
    small = torch.randn(4, 4)
    assert not _gemm.uses_onednn(small, small)  # below MIN_MACS the per-call cost dominates
    assert torch.equal(_gemm.mm(small, small), small @ small)
    if _gemm._onednn_linear() is not None:
        big = torch.randn(128, 128)
        assert _gemm.uses_onednn(big, torch.randn(128, 16))


def test_bmm_values_and_gradients(onednn):
    a = torch.randn(3, N, K).transpose(1, 2).requires_grad_()  # (3, K, N), a transposed view
    b = torch.randn(3, N, M, requires_grad=True)
    a64, b64 = (t.detach().double().requires_grad_() for t in (a, b))
    weight = torch.randn(3, K, M)
    with onednn() as calls:
        out = _gemm.bmm(a, b)
        (out * weight).sum().backward()
    assert calls.count == 9  # forward, and both gradients, per batch entry
    expected = a64 @ b64
    (expected * weight.double()).sum().backward()
    assert rel_err(out, expected) < 1e-6
    assert rel_err(a.grad, a64.grad) < 1e-6 and rel_err(b.grad, b64.grad) < 1e-6
    with pytest.raises(ValueError, match=r"a, b: expected \(B, n, k\) and \(B, k, m\)"):
        _gemm.bmm(a, b[:2])
    small = torch.randn(2, 3, 4, dtype=torch.float64)
    assert torch.equal(_gemm.bmm(small, small.transpose(1, 2)), torch.bmm(small, small.transpose(1, 2)))


def test_environment_variable_turns_onednn_off():
    code = "from nonlocalnet import _gemm; print(_gemm._onednn_linear() is None)"
    env = dict(os.environ, NONLOCALNET_ONEDNN="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
