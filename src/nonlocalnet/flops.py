"""FLOP counting that includes the attention kernels PyTorch's own counter misses.

``torch.utils.flop_counter.FlopCounterMode`` counts convolutions and matmuls, and the CUDA
flash / memory-efficient attention ops, but neither oneDNN's ``mkldnn._linear_pointwise``, which
our CPU kernels multiply with (:mod:`nonlocalnet._gemm`), nor the CPU flash kernel
(``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward), which is what
:func:`nonlocalnet.attention.fused_sdpa` runs on CPU, nor the in-place ``addmm_`` / ``baddbmm_``
our backward kernels accumulate with. We register those with PyTorch's own formulas: for
attention 2 * B * H * N * M * (Cq + Cv) forward and 2.5 times that backward (five matmuls:
recomputed logits, dV, dP, dQ, dK).

FLOPs are multiply-adds x 2 throughout, as PyTorch's counter; the paper's "FLOPs" (Table 2e: 34.2B
for R101 C2D) and the official counter's are multiply-adds, half of these.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_backward_flop_count, sdpa_flop_count

__all__ = ["flop_counter", "count_flops", "model_report", "StageCost"]


def _cpu_flash_forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_flash_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def _onednn_linear(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """``mkldnn._linear_pointwise`` (x @ w^T), which :func:`nonlocalnet._gemm.mm` calls."""
    return 2 * math.prod(x_shape[:-1]) * x_shape[-1] * w_shape[0]


def _as_registered(op) -> Callable:
    """PyTorch's formula for ``op``, marked as already taking raw arguments (not shapes)."""
    registered = flop_registry[op]

    def formula(*args, **kwargs):
        return registered(*args, **kwargs)

    formula._get_raw = True
    return formula


def _extra_formulas() -> dict:
    aten = torch.ops.aten
    # In-place accumulating matmuls (used by our backward kernels) cost what their out-of-place
    # twins do; PyTorch registers only the latter.
    formulas = {aten.addmm_: _as_registered(aten.addmm), aten.baddbmm_: _as_registered(aten.baddbmm)}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        formulas[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_flash_forward
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        formulas[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_flash_backward
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        formulas[torch.ops.mkldnn._linear_pointwise] = _onednn_linear
    return formulas


def flop_counter(*, depth: int = 2, display: bool = False) -> FlopCounterMode:
    """A ``FlopCounterMode`` that also counts the CPU flash-attention kernels.

    Use it as a context manager; ``get_total_flops()`` gives the total and ``get_flop_counts()``
    the per-module breakdown (module names as in ``named_modules``, prefixed ``Global``).
    """
    return FlopCounterMode(depth=depth, display=display, custom_mapping=_extra_formulas())


def count_flops(fn: Callable, *args, backward: bool = False, **kwargs) -> int:
    """FLOPs executed by ``fn(*args, **kwargs)``, and by its backward when ``backward`` is True.

    The backward seeds every floating output element with a random gradient (as a training step
    does); the result of ``fn`` may be a tensor or a tuple/list of tensors.
    """
    with flop_counter() as counter:
        result = fn(*args, **kwargs)
        if backward:
            outs = [result] if isinstance(result, torch.Tensor) else [t for t in result if torch.is_tensor(t)]
            outs = [t for t in outs if t.requires_grad]
            if not outs:
                raise ValueError("backward: expected fn to return a tensor that requires grad, got none")
            torch.autograd.backward(outs, [torch.randn_like(t) for t in outs])
    return int(counter.get_total_flops())


@dataclass
class StageCost:
    """One top-level part of a model: its parameters and the FLOPs of one forward."""

    name: str
    params: int  # every parameter
    weights: int  # conv and linear weights only, the official counter's convention
    flops: int


def model_report(model: torch.nn.Module, input_shape: Sequence[int]) -> list[StageCost]:
    """Parameters and forward FLOPs of each top-level child of ``model`` for one input of the shape.

    FLOPs are those of the model's definition, whatever kernels run it: the count is taken on a
    meta-device copy (no memory, no compute) whose non-local blocks use the naive form, the
    paper's definition, so neither the folded projections nor the recomputation of a fast path
    change the numbers. The last entry, ``total``, sums them.
    """
    from .block import NonLocalBlock

    shadow = copy.deepcopy(model).to("meta").eval()
    for module in shadow.modules():
        if isinstance(module, NonLocalBlock):
            module.impl = "naive"
    with flop_counter(depth=1) as counter, torch.no_grad():
        shadow(torch.empty(tuple(input_shape), device="meta"))
    counts = counter.get_flop_counts()
    prefix = type(shadow).__name__
    rows = []
    for name, child in model.named_children():
        params = list(child.parameters())
        rows.append(StageCost(
            name, sum(p.numel() for p in params), sum(p.numel() for p in params if p.dim() > 1),
            int(sum(counts.get(f"{prefix}.{name}", {}).values())),
        ))
    rows.append(StageCost(
        "total", sum(r.params for r in rows), sum(r.weights for r in rows), int(counter.get_total_flops())
    ))
    return rows
