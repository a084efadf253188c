"""Layout, pooling and grouping kernels of the non-local block (used by :mod:`nonlocalnet.block`).

The block keeps features channel-first (B, C, positions) and attends over tokens (B, positions,
C'); these autograd Functions move between the two with one batched GEMM each and return their
gradients in the layout of their inputs. ``WindowMax`` is the key-side max-pool, ``Groups`` splits
tokens into the independent groups of a space- or time-only affinity.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ._gemm import batched_mm, mm
from .attention import attention_weights

class _WindowMax(torch.autograd.Function):
    """Max over non-overlapping windows (kernel == stride, floor mode), like max_pool{1,2,3}d.

    Several times faster than PyTorch's CPU max_pool3d for the (1, 2, 2) windows of video blocks:
    the forward is a chain of elementwise maxima over strided views. The backward routes each
    gradient to the first maximal element of its window (window order), as max_pool does.
    """

    @staticmethod
    def forward(ctx, x, kernel: tuple[int, ...]):
        views = _window_views(x, kernel)
        best = views[0]
        for view in views[1:]:
            best = torch.maximum(best, view)
        best = best.contiguous() if len(views) > 1 else best.clone()
        ctx.save_for_backward(x, best)
        ctx.kernel = kernel
        return best

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, best = ctx.saved_tensors
        lead = x.dim() - len(ctx.kernel)
        tiled = all(s % k == 0 for s, k in zip(x.shape[lead:], ctx.kernel))
        # the window views cover every element when the windows tile x: nothing left to zero
        dx = grad.new_empty(x.shape) if tiled else grad.new_zeros(x.shape)
        free = None  # windows whose maximum has not been claimed by an earlier element
        for view, d_view in zip(_window_views(x, ctx.kernel), _window_views(dx, ctx.kernel)):
            hit = view == best
            if free is not None:
                hit &= free
            torch.mul(grad, hit, out=d_view)
            free = ~hit if free is None else free & ~hit
        return dx, None


def _window_views(x, kernel):
    """One strided view of x per offset inside a window: the window's elements, in window order."""
    lead = x.dim() - len(kernel)
    sizes = [s // k for s, k in zip(x.shape[lead:], kernel)]
    return [x[(Ellipsis, *_window_slices(offset, kernel, sizes))] for offset in _offsets(kernel)]


def _offsets(kernel):
    offsets = [()]
    for k in kernel:
        offsets = [o + (i,) for o in offsets for i in range(k)]
    return offsets


def _window_slices(offset, kernel, sizes):
    return [slice(o, o + k * n, k) for o, k, n in zip(offset, kernel, sizes)]


def _sum_of_products(lhs: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """sum_b lhs[b] @ rhs[b] accumulated in place, without a (B, M, K) intermediate."""
    total = lhs.new_zeros(lhs.shape[1], rhs.shape[2])
    for b in range(lhs.shape[0]):
        total += mm(lhs[b], rhs[b])
    return total


def _apply_1x1(weight: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """weight (C', C) applied to (B, C, P) features. One product per clip where the clips are
    long: on a 2-core AMD EPYC (Zen 5) those ran at 360-410 GFLOP/s through oneDNN's product
    where its 1x1 convolution ran at 110-370; short clips (res5: 72 key positions) stay one
    batched convolution."""
    if feats.shape[2] >= _PER_CLIP_MIN_POSITIONS:
        return batched_mm(weight.expand(feats.shape[0], -1, -1), feats)
    return F.conv1d(feats, weight[:, :, None])


# Positions per clip from which a 1x1 conv is done as one product per clip (see _apply_1x1).
_PER_CLIP_MIN_POSITIONS = 256


class _Conv1x1(torch.autograd.Function):
    """1x1 conv of channel-first features (B, C, P) -> (B, C', P), forward and feature gradient by
    :func:`_apply_1x1`, weight gradient sum_b dY_b X_b^T one oneDNN product per clip."""

    @staticmethod
    def forward(ctx, feats, weight, bias):
        ctx.save_for_backward(feats, weight)
        ctx.has_bias = bias is not None
        out = _apply_1x1(weight, feats)
        return out.add_(bias[:, None]) if bias is not None else out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        feats, weight = ctx.saved_tensors
        grad = grad.contiguous()
        d_feats = d_weight = d_bias = None
        if ctx.needs_input_grad[0]:
            d_feats = _apply_1x1(weight.t().contiguous(), grad)
        if ctx.needs_input_grad[1]:
            d_weight = _sum_of_products(grad, feats.transpose(1, 2))  # (C', C)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            d_bias = grad.sum((0, 2))
        return d_feats, d_weight, d_bias


def _conv1x1(feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 1x1 conv (``weight`` (C', C)) of channel-first (B, C, P) features, as (B, C', P)."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling():  # plain ops, PyTorch's own autograd
        return F.conv1d(feats, weight[:, :, None], bias)
    return _Conv1x1.apply(feats.contiguous(), weight, bias)


class _ToTokens(torch.autograd.Function):
    """1x1 conv from channel-first features (B, C, P) to tokens (B, P, C'): one batched GEMM.

    The backward returns the feature gradient channel-first and contiguous, like the features, so
    autograd never adds a transposed gradient into the block input.
    """

    @staticmethod
    def forward(ctx, feats, weight, bias):
        ctx.save_for_backward(feats, weight)
        ctx.has_bias = bias is not None
        batch, channels, _ = feats.shape
        tokens = batched_mm(feats.transpose(1, 2), weight.t().expand(batch, channels, -1))  # (B, P, C')
        return tokens.add_(bias) if bias is not None else tokens

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        feats, weight = ctx.saved_tensors
        batch = feats.shape[0]
        d_feats = d_weight = d_bias = None
        if ctx.needs_input_grad[0]:
            d_feats = batched_mm(weight.t().expand(batch, -1, -1), grad.transpose(1, 2))  # (B, C, P)
        if ctx.needs_input_grad[1]:
            d_weight = _sum_of_products(grad.transpose(1, 2), feats.transpose(1, 2))  # (C', C)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            d_bias = grad.sum((0, 1))
        return d_feats, d_weight, d_bias


class _FromTokens(torch.autograd.Function):
    """1x1 conv from tokens (B, P, C') back to channel-first features (B, C, P); the inverse layout
    of :class:`_ToTokens`, with the token gradient returned contiguous."""

    @staticmethod
    def forward(ctx, tokens, weight, bias):
        ctx.save_for_backward(tokens, weight)
        ctx.has_bias = bias is not None
        feats = batched_mm(weight.expand(tokens.shape[0], -1, -1), tokens.transpose(1, 2))  # (B, C, P)
        return feats.add_(bias[:, None]) if bias is not None else feats

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        tokens, weight = ctx.saved_tensors
        batch = tokens.shape[0]
        d_tokens = d_weight = d_bias = None
        if ctx.needs_input_grad[0]:
            d_tokens = batched_mm(grad.transpose(1, 2), weight.expand(batch, -1, -1))  # (B, P, C')
        if ctx.needs_input_grad[1]:
            d_weight = _sum_of_products(grad, tokens)  # (C, C')
        if ctx.has_bias and ctx.needs_input_grad[2]:
            d_bias = grad.sum((0, 2))
        return d_tokens, d_weight, d_bias


def _tokens(conv: nn.Module, feats: torch.Tensor) -> torch.Tensor:
    """``conv`` (1x1) applied to (B, C, P) features, as (B, P, C') tokens."""
    if torch.jit.is_tracing():  # TorchScript cannot hold a Python autograd.Function: plain ops
        tokens = torch.matmul(feats.transpose(1, 2), conv.weight.flatten(1).t())
        return tokens if conv.bias is None else tokens + conv.bias
    return _ToTokens.apply(feats, conv.weight.flatten(1), conv.bias)


def _from_tokens(tokens: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 1x1 conv (``weight`` (C, C')) from (B, P, C') tokens to (B, C, P) features."""
    if torch.jit.is_tracing():
        feats = torch.matmul(weight, tokens.transpose(1, 2))
        return feats if bias is None else feats + bias[:, None]
    return _FromTokens.apply(tokens, weight, bias)


def _plain_batch_norm(bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """nn.BatchNorm{1,2,3}d semantics on a flattened (B, C, P) view of its input.

    PyTorch's CPU kernel is up to 4x faster on the flat view than on (B, C, T, H, W) with many
    channels and few positions (res4). Any other norm module (SyncBatchNorm, ...) is called as is.
    """
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            momentum = 1.0 / float(bn.num_batches_tracked)
    use_batch_stats = bn.training or bn.running_mean is None
    track = not bn.training or bn.track_running_stats
    return F.batch_norm(
        x,
        bn.running_mean if track else None,
        bn.running_var if track else None,
        bn.weight,
        bn.bias,
        use_batch_stats,
        momentum,
        bn.eps,
    )


def _groups_kind(affinity: str, dims: int) -> str:
    """How an affinity splits the positions: ``space`` / ``time`` need a frame axis (dims=3)."""
    return affinity if dims == 3 else "spacetime"


class _Groups:
    """Splits (B, N, C) tokens into the independent groups of an affinity and back.

    ``spacetime``: one group per clip. ``space``: one group per frame (a free view, tokens are
    frame-major). ``time``: one group per key location, holding the T * kh * kw queries of its window.
    """

    def __init__(self, affinity, dims, shape, key_shape, kernel):
        self.kind = _groups_kind(affinity, dims)
        self.shape, self.key_shape = shape, key_shape
        self.kernel = tuple(kernel) if kernel is not None else (1,) * len(shape)

    def group(self, q):
        if self.kind == "spacetime":
            return q
        b, _, c = q.shape
        t, h, w = self.shape
        if self.kind == "space":
            return q.reshape(b * t, h * w, c)
        _, kh, kw = self.kernel
        hk, wk = self.key_shape[1:]
        q = q.view(b, t, h, w, c)
        q = F.pad(q, (0, 0, 0, wk * kw - w, 0, hk * kh - h))  # (B, T, hk*kh, wk*kw, C)
        q = q.view(b, t, hk, kh, wk, kw, c).permute(0, 2, 4, 1, 3, 5, 6)  # (B, hk, wk, T, kh, kw, C)
        return q.reshape(b * hk * wk, t * kh * kw, c)

    def group_keys(self, k):
        if self.kind == "spacetime":
            return k
        b, _, c = k.shape
        tk, hk, wk = self.key_shape
        if self.kind == "space":
            return k.reshape(b * tk, hk * wk, c)
        return k.view(b, tk, hk * wk, c).transpose(1, 2).reshape(b * hk * wk, tk, c)

    def ungroup(self, y):
        if self.kind == "spacetime":
            return y
        t, h, w = self.shape
        c = y.shape[-1]
        if self.kind == "space":
            return y.reshape(-1, t * h * w, c)
        _, kh, kw = self.kernel
        hk, wk = self.key_shape[1:]
        y = y.view(-1, hk, wk, t, kh, kw, c).permute(0, 3, 1, 4, 2, 5, 6).reshape(-1, t, hk * kh, wk * kw, c)
        return y[:, :, :h, :w].reshape(-1, t * h * w, c)

    def query_weights(self, q, k, queries, **kw):
        """(B, Q, M) weights of flat query positions, zero outside each query's group."""
        if self.kind == "spacetime":
            return attention_weights(q, k, queries, **kw)
        b = queries.shape[0]
        t, h, w = self.shape
        tk, hk, wk = self.key_shape
        ti, rest = queries // (h * w), queries % (h * w)
        hi, wi = rest // w, rest % w
        _, kh, kw_ = self.kernel
        if self.kind == "space":
            group = torch.arange(b, device=q.device)[:, None] * t + ti  # (B, Q)
            within = rest
        else:
            group = (torch.arange(b, device=q.device)[:, None] * hk + hi // kh) * wk + wi // kw_
            within = (ti * kh + hi % kh) * kw_ + wi % kw_
        rows = []
        for g_row, w_row in zip(group.reshape(-1), within.reshape(-1)):
            rows.append(attention_weights(q[g_row : g_row + 1], k[g_row : g_row + 1], w_row.view(1), **kw)[0, 0])
        weights = torch.stack(rows).view(b, queries.shape[1], -1)  # (B, Q, keys per group)
        full = weights.new_zeros(b, queries.shape[1], tk * hk * wk)
        if self.kind == "space":
            cols = ti[:, :, None] * (hk * wk) + torch.arange(hk * wk, device=q.device)
        else:
            loc = (hi // kh) * wk + wi // kw_
            cols = torch.arange(tk, device=q.device) * (hk * wk) + loc[:, :, None]
        return full.scatter(2, cols, weights)
