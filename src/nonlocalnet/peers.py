"""Other libraries' non-local blocks as :class:`NonLocalBlock`\\ s: :func:`from_peer` reads the
configuration of a pytorchvideo ``NonLocal``, an mmcv ``NonLocal1d/2d/3d`` or a timm
``NonLocalAttn``, builds the block that computes the same function and copies its weights and
norm statistics. The peers are recognised by their class, without importing them.

What each peer's choices become (see the ``NonLocalBlock`` arguments):

- pytorchvideo: ``softmax`` -> embedded Gaussian with logits x 1/sqrt(C'), ``dot_product``; the
  optional max-pool on x before phi / g -> ``pool="before"`` with its kernel; its norm (BN, or
  none) after W_z. 3-D.
- mmcv (and mmaction2, which uses it): all four modes; ``use_scale`` -> 1/sqrt(C') for the
  embedded Gaussian (its Gaussian is never scaled); ``sub_sample`` -> ``pool="after"`` the phi / g
  convs with the paper's kernel; ``norm_cfg`` BN or GN (``conv_out.bn`` / ``conv_out.gn``, the conv
  then has no bias), or none. 1-D, 2-D and 3-D. mmcv's LN normalises the last spatial axis of a
  feature map (and fails on most shapes), which no block here expresses.
- timm ``NonLocalAttn``: 2-D embedded Gaussian without pooling, logits x ``module.scale``
  (1/sqrt(C) of the input channels, or 1), BN after W_z. timm's ``BatNonLocalAttn`` is a
  bilinear attentional transform, not a non-local block.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .block import NonLocalBlock

__all__ = ["from_peer", "peer_of"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def peer_of(module: nn.Module) -> str | None:
    """``pytorchvideo``, ``mmcv`` or ``timm`` for a block this module can convert, else None."""
    cls, path = type(module).__name__, type(module).__module__
    if path.startswith("pytorchvideo.") and cls == "NonLocal":
        return "pytorchvideo"
    if path.startswith("mmcv.") and any(base.__name__ == "_NonLocalNd" for base in type(module).__mro__):
        return "mmcv"
    if path.startswith("timm.") and cls == "NonLocalAttn":
        return "timm"
    return None


def from_peer(module: nn.Module) -> NonLocalBlock:
    """A :class:`NonLocalBlock` computing what ``module`` computes (its weights, norm statistics and
    train / eval mode copied). A configuration no block expresses is a ``ValueError`` saying what."""
    peer = peer_of(module)
    if peer is None:
        raise ValueError(f"module: expected a pytorchvideo NonLocal, an mmcv NonLocal1d/2d/3d or a timm NonLocalAttn, "
                         f"got {type(module).__module__}.{type(module).__name__}")
    block, weights = {"pytorchvideo": _pytorchvideo, "mmcv": _mmcv, "timm": _timm}[peer](module)
    dtype = next(module.parameters()).dtype
    device = next(module.parameters()).device
    block.to(device=device, dtype=dtype)
    with torch.no_grad():
        for name, conv in weights.items():
            own = getattr(block, name)
            own.weight.copy_(conv.weight.reshape(own.weight.shape))
            if own.bias is not None:
                own.bias.copy_(conv.bias if conv.bias is not None else torch.zeros_like(own.bias))
    return block.train(module.training)


def _conv(module: nn.Module, where: str) -> nn.Module:
    if not isinstance(module, _CONVS) or any(k != 1 for k in module.kernel_size) or module.groups != 1 or \
            any(s != 1 for s in module.stride):
        raise ValueError(f"module: {where} must be a plain 1x1 conv (stride 1, no groups), got {module}")
    return module


def _norm(norm: nn.Module | None, where: str) -> tuple[str, dict]:
    """Our ``norm`` argument for a peer's norm module, and the keyword arguments it needs."""
    if norm is None:
        return "none", {}
    if isinstance(norm, _BNS):
        if not norm.affine:
            raise ValueError(f"module: {where} is a BatchNorm without affine parameters, which no block expresses")
        return "batch", {}
    if isinstance(norm, nn.GroupNorm) and norm.affine:
        return ("layer", {}) if norm.num_groups == 1 else ("group", {"norm_groups": norm.num_groups})
    raise ValueError(f"module: {where} is {type(norm).__name__}; a block's norm is BatchNorm, GroupNorm or none")


def _copy_norm(block: NonLocalBlock, norm: nn.Module | None) -> None:
    if norm is None:
        return
    block.norm.load_state_dict(norm.state_dict())
    for attribute in ("eps", "momentum", "track_running_stats"):
        if hasattr(norm, attribute):
            setattr(block.norm, attribute, getattr(norm, attribute))


def _pytorchvideo(module):
    theta, phi, g, out = (_conv(getattr(module, f"conv_{n}"), f"conv_{n}") for n in ("theta", "phi", "g", "out"))
    if module.instantiation not in ("softmax", "dot_product"):
        raise ValueError(f"module: instantiation {module.instantiation!r} is not pytorchvideo's softmax or dot_product")
    kernel = None
    if module.pool is not None:
        pool = module.pool
        if not isinstance(pool, nn.MaxPool3d):
            raise ValueError(f"module: pool must be a MaxPool3d, got {pool}")
        kernel, stride, padding, dilation = (_triple(v) for v in (pool.kernel_size, pool.stride, pool.padding,
                                                                  pool.dilation))
        if stride != kernel or any(padding) or any(d != 1 for d in dilation) or pool.ceil_mode:
            raise ValueError(f"module: pool {pool} must have stride = kernel, no padding or dilation, floor mode")
    norm, extra = _norm(module.norm, "norm")
    block = NonLocalBlock(theta.in_channels, theta.out_channels,
                          mode="embedded_gaussian" if module.instantiation == "softmax" else "dot_product", dims=3,
                          subsample=kernel is not None and kernel != (1, 1, 1), pool_kernel=kernel, scale=True,
                          norm=norm, **extra)
    _copy_norm(block, module.norm)
    return block, {"theta": theta, "phi": phi, "g": g, "out": out}


def _triple(value) -> tuple[int, ...]:
    return tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else (int(value),) * 3


def _mmcv_conv(part: nn.Module, where: str) -> nn.Module:
    inner = part[0] if isinstance(part, nn.Sequential) else part  # sub_sample: Sequential(ConvModule, pool)
    return _conv(inner.conv, f"{where}.conv")


def _mmcv(module):
    conv_out = module.conv_out
    dims = next((d for d, kind in ((1, nn.Conv1d), (2, nn.Conv2d), (3, nn.Conv3d))
                 if isinstance(conv_out.conv, kind)), None)  # mmcv's wrappers subclass them
    if dims is None:
        raise ValueError(f"module: conv_out must be a Conv1d/2d/3d, got {conv_out.conv}")
    norm_module = conv_out.norm if getattr(conv_out, "with_norm", False) else None
    norm, extra = _norm(norm_module, "conv_out's norm")
    mode = module.mode
    weights = {"g": _mmcv_conv(module.g, "g"), "out": _conv(conv_out.conv, "conv_out.conv")}
    if mode != "gaussian":
        weights.update(theta=_mmcv_conv(module.theta, "theta"), phi=_mmcv_conv(module.phi, "phi"))
    if mode == "concatenation":
        weights["concat"] = module.concat_project.conv
    block = NonLocalBlock(module.in_channels, module.inter_channels, mode=mode, dims=dims,
                          subsample=bool(module.sub_sample), pool="after",
                          scale=bool(module.use_scale) if mode == "embedded_gaussian" else False, norm=norm, **extra)
    _copy_norm(block, norm_module)
    return block, weights


def _timm(module):
    theta, phi, g, out = (_conv(getattr(module, n), n) for n in ("t", "p", "g", "z"))
    norm, extra = _norm(module.norm, "norm")
    block = NonLocalBlock(theta.in_channels, theta.out_channels, mode="embedded_gaussian", dims=2, subsample=False,
                          scale=float(module.scale), norm=norm, **extra)
    _copy_norm(block, module.norm)
    return block, {"theta": theta, "phi": phi, "g": g, "out": out}
