"""The non-local block (paper §3.3, Fig. 2) for 1-D, 2-D and 3-D inputs, and ``add_nonlocal``.

z = BN(W_z y) + x with y_i = 1/C(x) sum_j f(x_i, x_j) g(x_j), where theta, phi, g and W_z are
1x1(x1) convolutions. Conventions follow the official Caffe2 release (docs/paper.md §1, §2):
the key/value max-pool is applied to the block input before the phi and g convolutions, the
softmax logits are scaled by inner_channels^-0.5, every conv has a bias and is initialised from
N(0, 0.01^2), and the BN scale after W_z starts at 0 so the block starts as the identity.
"""

from __future__ import annotations

import difflib
import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch.fx.experimental.symbolic_shapes import statically_known_true

from ._gemm import bmm
from ._ops import _conv1x1, _Groups, _WindowMax, _from_tokens, _groups_kind, _plain_batch_norm, _tokens
from .attention import IMPLS, MODES, channel_first_softmax_attention, concatenation_attention, nonlocal_attention

AFFINITIES = ("spacetime", "space", "time")
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
# Subsampling of the key/value side (paper §3.3): space only for video, time for sequences.
_POOL = {1: (2,), 2: (2, 2), 3: (1, 2, 2)}
_LAYOUT = {1: "(B, C, T)", 2: "(B, C, H, W)", 3: "(B, C, T, H, W)"}



class NonLocalBlock(nn.Module):
    """Non-local block z = norm(W_z y) + x, paper §3, for inputs (B, C, T), (B, C, H, W) or (B, C, T, H, W).

    Args:
        in_channels: C, channels of the input and the output.
        inner_channels: channels of theta, phi and g (default C // 2, the paper's bottleneck).
        mode: pairwise function f: ``gaussian`` exp(x_i . x_j), ``embedded_gaussian``
            exp(theta_i . phi_j) (both normalised by a softmax over j), ``dot_product``
            theta_i . phi_j / M or ``concatenation`` ReLU(w_f . [theta_i, phi_j]) / M, where M is
            the number of key positions (after subsampling).
        dims: 1, 2 or 3 spatial-temporal dimensions.
        subsample: max-pool the key/value side (phi and g; x itself for ``gaussian``) before the
            convs: kernel = stride (1, 2, 2) in 3-D, (2, 2) in 2-D, 2 along time in 1-D.
        scale: multiplier of the softmax logits: True gives 1/sqrt(d), d being the length of the
            dotted vectors (inner_channels; in_channels for ``gaussian``, whose f dots x itself),
            as the official release; False gives 1 (the paper's equations); a float is used as
            given. None (the default): True for ``embedded_gaussian`` (the official code), 1 for
            ``gaussian`` (Eq. 2; the official code has no Gaussian). The dot product and
            concatenation have no logits to scale: there only None, True, False or 1.0 are
            accepted and change nothing.
        norm: the norm after W_z, its scale initialised to 0 so that the block starts as the
            identity: True or ``"batch"`` (BatchNorm: the official release, PySlowFast,
            pytorchvideo, mmcv's and timm's defaults), ``"group"`` (GroupNorm of ``norm_groups``
            groups: mmcv ``norm_cfg=dict(type="GN")``), ``"layer"`` (GroupNorm with one group:
            the statistics of all of C x T x H x W per clip, a per-channel affine), or False /
            ``"none"``: no norm, and W_z itself is zero-initialised (mmcv without ``norm_cfg``).
        affinity: which positions j each i sees (Table 2d): ``spacetime`` all, ``space`` those in
            the same frame, ``time`` those at the same location in every frame. With subsampling,
            a time-only query sees the pooled window that contains it (windows at an odd edge are
            partial). ``space`` needs a frame axis besides space (dims=3; dims=2 is all space),
            ``time`` a time axis (dims=1 or 3).
        impl: attention implementation, see :func:`nonlocalnet.attention.nonlocal_attention`;
            ``"naive"`` materialises the affinity (the reference), ``"auto"`` never does.
        fold: outside ``impl="naive"``, compute W_z y with the projections folded into the
            attention (exact rewrites, see :meth:`transform`): for the softmax modes W_theta into
            the keys and W_z into the values; for the dot product (spacetime affinity) one C x C
            map per clip. ``None`` (default) folds where the counted work drops enough (softmax:
            res4 and res5 sizes; dot product: res2/res3 sizes); ``True`` / ``False`` force it. Ignored by the
            concatenation and by a space/time dot product.
        pool: where the key/value max-pool sits: ``"before"`` the phi and g convs, on x (the
            official release, PySlowFast, pytorchvideo; the cheaper form), or ``"after"`` them,
            on phi(x) and g(x) (mmcv / mmaction2). A max-pool does not commute with a 1x1 conv,
            so the two give different functions. ``gaussian``'s keys are x itself, pooled either
            way; its values g are pooled after their conv with ``"after"``.
        pool_kernel: the pool's kernel (= stride, floor mode), one size per dim, e.g. (2, 2, 2)
            or (1, 3, 3); default the paper's (see ``subsample``). Other kernels than the default
            need ``affinity="spacetime"``.
        norm_groups: groups of ``norm="group"`` (default 32, mmcv's usual GN).
        group_size: 3-D only: split time into consecutive groups of this many frames and let
            attention stay inside each group (the official ``add_nonlocal_group``, which the
            frozen-BN 128-frame and 32x4 models use in res3 with groups of 4 to save memory). An
            input with at most ``group_size`` frames is one group; otherwise T must be a multiple.

    Submodules (state-dict keys): ``theta``, ``phi`` (not for ``gaussian``), ``g``, ``out``
    (1x1 convs with bias), ``norm`` (when norm=True) and, for ``concatenation``, ``concat`` holding
    w_f as a bias-free 1x1 conv from 2 * inner_channels to 1 (first half for theta, second for phi).
    """

    def __init__(
        self,
        in_channels: int,
        inner_channels: int | None = None,
        mode: str = "embedded_gaussian",
        dims: int = 3,
        subsample: bool = True,
        scale: bool | float | None = None,
        norm: bool = True,
        affinity: str = "spacetime",
        *,
        impl: str = "auto",
        fold: bool | None = None,
        group_size: int | None = None,
        pool: str = "before",
        pool_kernel: Sequence[int] | None = None,
        norm_groups: int = 32,
        distance: str = "dot",
    ):
        super().__init__()
        _check_args(in_channels, inner_channels, mode, dims, scale, affinity, impl, fold)
        if distance not in ("dot", "euclidean") or (distance == "euclidean" and mode != "gaussian"):
            raise ValueError(f"distance: expected 'dot', or 'euclidean' with mode='gaussian', got {distance!r} "
                             f"with mode={mode!r}")
        self.distance = distance
        if pool not in ("before", "after"):
            raise ValueError(f"pool: expected 'before' or 'after' (the phi / g convs), got {pool!r}")
        if pool_kernel is not None:
            kernel = tuple(pool_kernel)
            if len(kernel) != dims or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1
                                               for k in kernel):
                raise ValueError(f"pool_kernel: expected {dims} positive ints (one per dim), got {pool_kernel!r}")
            if kernel != _POOL[dims] and affinity != "spacetime":
                raise ValueError(f"pool_kernel: a kernel other than {_POOL[dims]} needs affinity='spacetime', got "
                                 f"{kernel} with affinity={affinity!r}")
        norm_kind = "batch" if norm is True else "none" if norm is False or norm is None else norm
        if norm_kind not in ("batch", "group", "layer", "none"):
            raise ValueError(f"norm: expected True, False, 'batch', 'group', 'layer' or 'none', got {norm!r}")
        if norm_kind == "group" and (not isinstance(norm_groups, int) or norm_groups < 1
                                     or in_channels % norm_groups):
            raise ValueError(f"norm_groups: expected a positive divisor of in_channels={in_channels}, got "
                             f"{norm_groups!r}")
        self.pool, self.norm_kind = pool, norm_kind
        if group_size is not None and (dims != 3 or isinstance(group_size, bool) or not isinstance(group_size, int)
                                       or group_size < 1):
            raise ValueError(f"group_size: expected None or a positive int of frames with dims=3, got {group_size!r} "
                             f"with dims={dims}")
        self.fold, self.group_size = fold, group_size
        inner = in_channels // 2 if inner_channels is None else int(inner_channels)
        if inner < 1:
            where = " (the default in_channels // 2)" if inner_channels is None else ""
            raise ValueError(f"inner_channels: expected >= 1, got {inner}{where}")
        self.in_channels, self.inner_channels = int(in_channels), inner
        self.mode, self.dims, self.affinity, self.impl = mode, dims, affinity, impl
        self.subsample = bool(subsample)
        self.pool_kernel = (tuple(pool_kernel) if pool_kernel is not None else _POOL[dims]) if subsample else None
        self.scale = _resolve_scale(scale, mode, in_channels if mode == "gaussian" else inner)
        conv = _CONV[dims]
        if mode != "gaussian":
            self.theta = conv(in_channels, inner, 1)
            self.phi = conv(in_channels, inner, 1)
        self.g = conv(in_channels, inner, 1)
        self.out = conv(inner, in_channels, 1)
        if mode == "concatenation":
            self.concat = conv(2 * inner, 1, 1, bias=False)
        self.norm = {"batch": lambda: _BN[dims](in_channels), "none": lambda: None,
                     "group": lambda: nn.GroupNorm(norm_groups, in_channels),
                     "layer": lambda: nn.GroupNorm(1, in_channels)}[norm_kind]()
        self.reset_parameters()

    @classmethod
    def from_peer(cls, module: nn.Module) -> "NonLocalBlock":
        """The block computing what another library's non-local block computes (weights and norm
        statistics copied): pytorchvideo ``NonLocal``, mmcv ``NonLocal1d/2d/3d``, timm
        ``NonLocalAttn``; see :mod:`nonlocalnet.peers`."""
        from .peers import from_peer

        return from_peer(module)

    def reset_parameters(self) -> None:
        """Official initialisation: convs N(0, 0.01^2), biases 0; the block starts as the identity."""
        for name in ("theta", "phi", "g", "out", "concat"):
            module = getattr(self, name, None)
            if module is not None:
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if self.norm is not None:
            self.norm.reset_parameters()
            nn.init.zeros_(self.norm.weight)
        else:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.inner_channels}, mode={self.mode!r}, dims={self.dims}, "
            f"subsample={self.subsample}, scale={self.scale:.4g}, affinity={self.affinity!r}, impl={self.impl!r}"
            + ("" if self.distance == "dot" else f", distance={self.distance!r}")
            + ("" if self.fold is None else f", fold={self.fold}")
            + ("" if self.group_size is None else f", group_size={self.group_size}")
            + ("" if self.pool == "before" else f", pool={self.pool!r}")
            + ("" if self.pool_kernel in (None, _POOL[self.dims]) else f", pool_kernel={self.pool_kernel}")
            + ("" if self.norm_kind in ("batch", "none") else f", norm={self.norm_kind!r}")
        )

    # ----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.transform(x)
        if type(self.norm) in _BN.values() and not (self.norm._forward_pre_hooks or self.norm._forward_hooks):
            # (hooks on the norm, such as precise BN's statistics, need the module to be called)
            # the norm's output is a fresh tensor no backward needs: add in place, no new (B, C, N),
            # and on the tensor itself: an in-place op on a view costs autograd a zero-filled copy
            # of the base and two more copies in the backward (CopySlices)
            return _plain_batch_norm(self.norm, y.flatten(2)).add_(x.flatten(2)).view(x.shape)
        # not in place: another norm's output might alias its input, and the folded attention's
        # backward reads its output y
        return x + (y if self.norm is None else self.norm(y))

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """W_z y, the block's residual branch before the norm: same shape as x.

        For the softmax modes two exact rewrites can replace the 1x1 convs over all N query
        positions by work on the M key positions (``fold``):
        theta_i . phi_j = [x_i, 1] . [W_theta^T phi_j, b_theta . phi_j] (queries are x itself), and
        W_z sum_j a_ij g_j + b_z = sum_j a_ij (W_z g_j + b_z), as the weights a_ij sum to 1.
        For the dot product the whole branch is linear in x_i for a given clip, see
        :meth:`_dot_product_transform`.
        """
        self._check_input(x)
        groups = self._time_groups(x)
        if groups > 1:  # each group of frames is a clip of its own
            b, c, t, h, w = x.shape
            clips = x.view(b, c, groups, t // groups, h, w).transpose(1, 2).reshape(b * groups, c, t // groups, h, w)
            y = self.transform(clips)  # (B * groups, C, group_size, H, W)
            return y.view(b, groups, c, t // groups, h, w).transpose(1, 2).reshape(x.shape)
        folds = self._folds(x)
        if self._channel_first(x, folds):
            if self.mode == "dot_product":
                return self._dot_product_transform(x, folds)
            return self._channel_first_transform(x, folds)
        if folds:
            return self._folded_transform(x)
        if self.mode == "concatenation" and self.impl != "naive":
            return self._concatenation_transform(x)
        q, k, v, groups = self._qkv(x)
        concat_weight = self.concat.weight if self.mode == "concatenation" else None
        y = nonlocal_attention(
            q, k, v, mode=self.mode, scale=self.scale, concat_weight=concat_weight, impl=self.impl
        )
        y = groups.ungroup(y)  # (B, N, C')
        out = _from_tokens(y, self.out.weight.flatten(1), self.out.bias)  # (B, C, N)
        return out.view(x.shape)

    def _folds(self, x: torch.Tensor) -> bool:
        """Whether to use the folded form: a cost comparison on concrete sizes. For symbolic sizes
        (torch.export, dynamic torch.compile) the plain form unless the comparison holds for all of
        them, so that the choice adds no shape guard; both forms are exact."""
        decision = self._fold_costs(x)
        return statically_known_true(decision) if isinstance(decision, torch.SymBool) else bool(decision)

    def _fold_costs(self, x: torch.Tensor):
        if self.impl == "naive" or self.fold is False or self.mode == "concatenation":
            return False
        if self._pools_after:
            return False  # the folds rewrite convs of the pooled x (g's too); here the convs come first
        if self.mode == "dot_product" and _groups_kind(self.affinity, self.dims) != "spacetime":
            return False  # one C x C map per frame / location would cost more than it saves
        if self.fold:
            return True
        # Multiply-adds per clip of the parts that differ, from the query/key counts.
        c, inner = self.in_channels, self.inner_channels
        n, m = math.prod(x.shape[2:]), math.prod(self.key_shape(x.shape))
        pairs = n * self._keys_per_query(x.shape)
        if self.mode == "dot_product":
            # theta conv, theta A and W_z over N queries against forming W_z A^T W_theta once and
            # applying it; the folded form also skips two (B, N, C') intermediates.
            return c * inner * (inner + c) + n * c * c < 0.9 * n * inner * (2 * c + inner)
        if self.mode == "gaussian":  # queries and keys are x itself either way
            plain = pairs * (c + inner) + n * inner * c
            folded = m * inner * c + 2 * pairs * c
        else:
            plain = n * c * inner + 2 * pairs * inner + n * inner * c
            folded = 2 * m * inner * c + 2 * pairs * c
        if _groups_kind(self.affinity, self.dims) == "spacetime":
            # The channel-first kernel folds at no extra cost: on a 2-core CPU the folded form was
            # 1.15x faster at res4 (ratio 0.73), even at ratio 0.89, 0.9x as fast at ratio 1.0.
            return folded < 0.85 * plain
        # Grouped affinities fold in token layouts, with a column of ones and copies of (B, N, C):
        # there the fold broke even at ratio 0.73 and was 1.7x faster at ratio 0.25.
        return folded < 0.6 * plain

    def _dot_product_transform(self, x: torch.Tensor, folds: bool) -> torch.Tensor:
        """:meth:`transform` of the dot product (spacetime affinity), channel-first.

        y_i = A^T theta_i with A = sum_j phi_j g_j^T / M, one C' x C' map per clip. Folded, the
        branch is W_z y_i + b_z = (W_z A^T W_theta) x_i + (W_z A^T b_theta + b_z): the theta conv
        and W_z over all N positions become one C x C product per clip.
        """
        x_flat = x.flatten(2)  # (B, C, N)
        phi, g = self._key_maps(x, self.phi, self.g)  # (B, C', M)
        a = bmm(phi, g.transpose(1, 2)) / phi.shape[2]  # (B, C', C')
        if not folds:
            theta = _conv1x1(x_flat, self.theta.weight.flatten(1), self.theta.bias)  # (B, C', N)
            return _conv1x1(bmm(a.transpose(1, 2), theta), self.out.weight.flatten(1), self.out.bias).view(x.shape)
        z_a = torch.matmul(self.out.weight.flatten(1), a.transpose(1, 2))  # (B, C, C') = W_z A^T
        weight = torch.matmul(z_a, self.theta.weight.flatten(1))  # (B, C, C)
        bias = torch.matmul(z_a, self.theta.bias) + self.out.bias  # (B, C)
        return bmm(weight, x_flat).add_(bias[:, :, None]).view(x.shape)  # (B, C, N)

    def _keys_per_query(self, shape: Sequence[int]) -> int:
        keys = self.key_shape(shape)
        kind = _groups_kind(self.affinity, self.dims)
        if kind == "space":
            return math.prod(keys[1:])
        return keys[0] if kind == "time" else math.prod(keys)

    @property
    def _pools_after(self) -> bool:
        """Whether the key/value max-pool comes after the phi and g convs (``pool="after"``)."""
        return self.pool == "after" and self.pool_kernel is not None

    def _channel_first(self, x: torch.Tensor, folds: bool) -> bool:
        """Whether the channel-first forms serve (every tensor (B, C, positions), 1x1 convs and
        products through oneDNN on CPU): the dot product over all positions (one group per clip),
        and the softmax modes over all positions when folded, or unfolded on CPU for clips of
        ``_CHANNEL_FIRST_MIN_PAIRS`` query-key pairs and more (smaller clips, and the plain form on
        accelerators, where PyTorch's fused SDPA serves, take the batched token kernels)."""
        if _groups_kind(self.affinity, self.dims) != "spacetime" or self.impl == "naive":
            return False
        if self.mode == "dot_product":
            return True
        if self.mode not in ("gaussian", "embedded_gaussian") or self.impl not in ("auto", "chunked"):
            return False
        if folds:
            return True
        if x.device.type != "cpu":
            return False
        # Clips this small (a 14x14 frame as a clip: 196 x 196 pairs) ran faster as one batched
        # token product than clip by clip (res4 2-D: 178 against 236 ms fwd+bwd on 2 cores).
        decision = math.prod(x.shape[2:]) * math.prod(self.key_shape(x.shape)) >= _CHANNEL_FIRST_MIN_PAIRS
        return statically_known_true(decision) if isinstance(decision, torch.SymBool) else bool(decision)

    def _key_maps(self, x: torch.Tensor, *convs: nn.Module, key_flat: torch.Tensor | None = None) -> list[torch.Tensor]:
        """(B, C', M) of each 1x1 conv on the key side: the conv of the pooled x (``key_flat``, the
        pooled x as (B, C, M), when the caller has it already), or the pooled conv of x when the
        pool comes after the convs."""
        if self._pools_after:
            maps = [_conv1x1(x.flatten(2), conv.weight.flatten(1), conv.bias).view(x.shape[0], -1, *x.shape[2:])
                    for conv in convs]
            return [self._keys_source(m).flatten(2) for m in maps]
        if key_flat is None:
            key_flat = self._keys_source(x).flatten(2)  # (B, C, M)
        return [_conv1x1(key_flat, conv.weight.flatten(1), conv.bias) for conv in convs]

    def _concatenation_transform(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`transform` of the concatenation without the theta conv over the N positions:
        ReLU(w^T [theta_i, phi_j]) needs only a_i = w_theta . theta_i = (W_theta^T w_theta) . x_i
        + w_theta . b_theta, one C-vector per block. Likewise b_j = w_phi . phi_j from the pooled
        x when the pool comes before the convs (after them, max-pooling phi does not commute with
        the projection)."""
        x_flat, width = x.flatten(2), self.inner_channels
        w_theta, w_phi = self.concat.weight.reshape(-1).split(width)
        a = torch.matmul(w_theta @ self.theta.weight.flatten(1), x_flat) + w_theta @ self.theta.bias  # (B, N)
        key_flat = None if self._pools_after else self._keys_source(x).flatten(2)  # (B, C, M)
        (g,) = self._key_maps(x, self.g, key_flat=key_flat)  # (B, C', M)
        if key_flat is None:
            b = torch.matmul(w_phi, *self._key_maps(x, self.phi))  # (B, M)
        else:
            b = torch.matmul(w_phi @ self.phi.weight.flatten(1), key_flat) + w_phi @ self.phi.bias
        groups = self._groups(x)
        y = concatenation_attention(groups.group(a[..., None])[..., 0], groups.group_keys(b[..., None])[..., 0],
                                    groups.group_keys(g.transpose(1, 2)))
        return _from_tokens(groups.ungroup(y), self.out.weight.flatten(1), self.out.bias).view(x.shape)  # (B, C, N)

    def _channel_first_transform(self, x: torch.Tensor, folds: bool) -> torch.Tensor:
        """:meth:`transform` of the softmax modes, channel-first: 1x1 convs and
        :func:`~nonlocalnet.attention.channel_first_softmax_attention`, no token copies.
        Folded (``folds``), the queries are x itself, the keys W_theta^T phi with the per-key logit
        term b_theta . phi_j, and the values W_z g + b_z."""
        x_flat = x.flatten(2)  # (B, C, N)
        key_bias, w_out = None, self.out.weight.flatten(1)  # (C, C')
        if self.mode == "gaussian":
            q, k = x_flat, self._keys_source(x).flatten(2)  # x and the pooled x
            (g,) = self._key_maps(x, self.g, key_flat=k)
            if self.distance == "euclidean":  # -|x_i - x_j|^2 = 2 x_i.x_j - |x_j|^2 - |x_i|^2 (constant in j)
                k, key_bias = 2 * k, -(k * k).sum(1)  # (B, C, M), (B, M)
        else:
            phi, g = self._key_maps(x, self.phi, self.g)  # (B, C', M)
            if folds:
                q, k = x_flat, _conv1x1(phi, self.theta.weight.flatten(1).t(), None)  # (B, C, M)
                key_bias = torch.matmul(self.theta.bias, phi)  # (B, M)
            else:
                q, k = _conv1x1(x_flat, self.theta.weight.flatten(1), self.theta.bias), phi
        if folds:
            v = _conv1x1(g, w_out, self.out.bias)  # (B, C, M)
            return channel_first_softmax_attention(q, k, v, key_bias=key_bias, scale=self.scale, impl=self.impl).view(x.shape)
        y = channel_first_softmax_attention(q, k, g, scale=self.scale, impl=self.impl)  # (B, C', N)
        return _conv1x1(y, w_out, self.out.bias).view(x.shape)

    def _folded_transform(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`transform` with W_theta folded into the keys and W_z, b_z into the values, for the
        grouped affinities (and ``impl="sdpa"``); :meth:`_channel_first_transform` serves the others."""
        key_flat = self._keys_source(x).flatten(2)  # (B, C, M)
        w_out = self.out.weight.flatten(1)  # (C, C')
        groups = self._groups(x)
        # token layouts, with the theta bias as a column of ones
        v = torch.baddbmm(self.out.bias, _tokens(self.g, key_flat), w_out.t().expand(x.shape[0], -1, -1))  # (B, M, C)
        x_tokens = x.flatten(2).transpose(1, 2)  # (B, N, C), a view
        if self.mode == "gaussian":
            q, k = x_tokens.contiguous(), key_flat.transpose(1, 2).contiguous()  # (B, N, C), (B, M, C)
            if self.distance == "euclidean":
                q, k = _euclidean_tokens(q, k)  # (B, N, C + 1), (B, M, C + 1)
                v = F.pad(v, (0, 1))  # (B, M, C + 1): equal widths
        else:
            q = F.pad(x_tokens, (0, 1), value=1.0)  # (B, N, C + 1)
            w_key = torch.cat([self.theta.weight.flatten(1), self.theta.bias[:, None]], 1)  # (C', C + 1)
            k = _tokens(self.phi, key_flat) @ w_key  # (B, M, C + 1)
            v = F.pad(v, (0, 1))  # (B, M, C + 1): equal widths let the fused kernels serve
        y = nonlocal_attention(
            groups.group(q), groups.group_keys(k), groups.group_keys(v), mode=self.mode, scale=self.scale, impl=self.impl
        )
        y = groups.ungroup(y)[..., : self.in_channels]  # (B, N, C)
        return y.transpose(1, 2).contiguous().view(x.shape)  # (B, C, N) as the norm and residual want

    def attention_map(self, x: torch.Tensor, queries) -> torch.Tensor:
        """Attention weights f(x_i, x_j)/C(x) of chosen query positions, without the full matrix.

        Args:
            x: block input.
            queries: flat indices into the N = prod(x.shape[2:]) positions, shape (Q,) or (B, Q).

        Returns:
            (B, Q, M) weights over the key positions of the (subsampled) key map of shape
            ``self.key_shape(x.shape)``; for ``space``/``time`` affinity the weights outside the
            query's frame / location are 0.
        """
        self._check_input(x)
        if self._time_groups(x) > 1:
            raise ValueError(f"x: attention_map needs at most group_size={self.group_size} frames (one group), "
                             f"got shape {tuple(x.shape)}; pass one group of frames")
        q, k, v, groups = self._qkv(x)
        queries = torch.as_tensor(queries, dtype=torch.long, device=x.device)
        if queries.dim() == 1:
            queries = queries.expand(x.shape[0], -1)
        positions = math.prod(x.shape[2:])
        if queries.dim() != 2 or queries.shape[0] != x.shape[0]:
            raise ValueError(f"queries: expected shape (Q,) or ({x.shape[0]}, Q), got {tuple(queries.shape)}")
        if queries.numel() and (int(queries.min()) < 0 or int(queries.max()) >= positions):
            raise ValueError(f"queries: expected flat positions in [0, {positions}), got {queries.tolist()}")
        concat_weight = self.concat.weight if self.mode == "concatenation" else None
        return groups.query_weights(
            q, k, queries, mode=self.mode, scale=self.scale, concat_weight=concat_weight
        )

    def key_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Spatial-temporal shape of the key/value map for an input of the given shape."""
        spatial = tuple(shape[2:])
        if self.pool_kernel is None:
            return spatial
        if self.affinity == "time":  # windows at an odd edge are kept: ceil (in integers, so that
            return tuple(-(-s // k) for s, k in zip(spatial, self.pool_kernel))  # symbolic sizes stay exact)
        return tuple(s // k for s, k in zip(spatial, self.pool_kernel))

    # ----------------------------------------------------------------------------------------
    def _time_groups(self, x: torch.Tensor) -> int:
        """How many groups of ``group_size`` frames ``x`` splits into (1: no split)."""
        if self.group_size is None or x.dim() != 5 or x.shape[2] <= self.group_size:
            return 1
        if x.shape[2] % self.group_size:
            raise ValueError(f"x: expected a number of frames (dim 2) divisible by group_size={self.group_size}, "
                             f"got shape {tuple(x.shape)}")
        return x.shape[2] // self.group_size

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != self.dims + 2:
            raise ValueError(
                f"x: expected a {self.dims + 2}-D input {_LAYOUT[self.dims]} for dims={self.dims}, "
                f"got {x.dim()}-D shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected {self.in_channels} channels (dim 1), got {x.shape[1]} (shape {tuple(x.shape)})")
        if self.pool_kernel is not None:
            spatial = tuple(x.shape[2:])
            if any(s < k for s, k in zip(spatial, self.pool_kernel)):
                raise ValueError(
                    f"x: size {spatial} after (B, C) is too small to subsample by {self.pool_kernel}; "
                    "pass subsample=False for inputs this small"
                )

    def _keys_source(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.pool_kernel
        if kernel is None:
            return x
        pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[self.dims]
        if self.affinity == "time":
            return pool(x, kernel, kernel, ceil_mode=True)
        if torch.jit.is_tracing():  # TorchScript cannot hold a Python autograd.Function
            return pool(x, kernel, kernel)
        return _WindowMax.apply(x, kernel)

    def _groups(self, x: torch.Tensor) -> _Groups:
        """The affinity's groups for input ``x`` and its key map (of shape :meth:`key_shape`)."""
        return _Groups(self.affinity, self.dims, tuple(x.shape[2:]), self.key_shape(x.shape), self.pool_kernel)

    def _qkv(self, x: torch.Tensor):
        """Grouped queries, keys and values of an input already checked by the caller."""
        x_flat = x.flatten(2)  # (B, C, N)
        after = self._pools_after
        # the pooled x: gaussian's keys, and what the convs of the keys see when they come second
        key_flat = None if after and self.mode != "gaussian" else self._keys_source(x).flatten(2)  # (B, C, M)

        def keys(conv: nn.Module) -> torch.Tensor:  # (B, M, C'): conv of the pooled x, or pooled conv of x
            return self._keys_source(conv(x)).flatten(2).transpose(1, 2) if after else _tokens(conv, key_flat)

        v = keys(self.g)
        if self.mode == "gaussian":
            q, k = x_flat.transpose(1, 2), key_flat.transpose(1, 2)  # (B, N, C), (B, M, C)
            if self.distance == "euclidean":
                q, k = _euclidean_tokens(q, k)
            elif self.impl != "naive":
                q, k = q.contiguous(), k.contiguous()
        else:
            q, k = _tokens(self.theta, x_flat), keys(self.phi)  # (B, N, C'), (B, M, C')
        groups = self._groups(x)
        return groups.group(q), groups.group_keys(k), groups.group_keys(v), groups



# Query-key pairs per clip from which the unfolded softmax modes take the channel-first kernel.
_CHANNEL_FIRST_MIN_PAIRS = 1 << 17


def _check_args(in_channels, inner_channels, mode, dims, scale, affinity, impl, fold) -> None:
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels: expected a positive int, got {in_channels!r}")
    if inner_channels is not None and (not isinstance(inner_channels, int) or isinstance(inner_channels, bool)):
        raise ValueError(f"inner_channels: expected an int >= 1 or None, got {inner_channels!r}")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if dims not in (1, 2, 3):
        raise ValueError(f"dims: expected 1, 2 or 3, got {dims!r}")
    if affinity not in AFFINITIES:
        raise ValueError(f"affinity: expected one of {AFFINITIES}, got {affinity!r}")
    if affinity == "space" and dims == 1:
        raise ValueError("affinity: expected 'spacetime' or 'time' for dims=1 (a time axis only), got 'space'")
    if affinity == "time" and dims == 2:
        raise ValueError("affinity: expected 'spacetime' or 'space' for dims=2 (no time axis), got 'time'")
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    if scale is not None and (not isinstance(scale, (bool, int, float)) or (not isinstance(scale, bool) and not scale > 0)):
        raise ValueError(f"scale: expected None, True, False or a positive number, got {scale!r}")
    if fold not in (None, True, False):
        raise ValueError(f"fold: expected None, True or False, got {fold!r}")


def _euclidean_tokens(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries (B, N, C) and keys (B, M, C) whose dot products are 2 q_i.k_j - |k_j|^2, that is
    -|q_i - k_j|^2 up to a term constant over j, which the softmax over j drops: [q, 1] and
    [2 k, -|k|^2], (B, N, C + 1) and (B, M, C + 1)."""
    return F.pad(q, (0, 1), value=1.0), torch.cat([2 * k, -(k * k).sum(-1, keepdim=True)], -1)


def _resolve_scale(scale, mode: str, width: int) -> float:
    if scale is None:  # the official code scales its softmax; Eq. 2 (the Gaussian) does not
        scale = mode == "embedded_gaussian"
    if mode in ("gaussian", "embedded_gaussian"):
        if scale is True:
            return width**-0.5
        return 1.0 if scale is False else float(scale)
    if not isinstance(scale, bool) and float(scale) != 1.0:
        raise ValueError(
            f"scale: expected True, False or 1.0 for mode {mode!r}, which has no softmax logits to scale, got {scale!r}"
        )
    return 1.0


# --------------------------------------------------------------------------------------------
# Adding blocks to existing networks
# --------------------------------------------------------------------------------------------

_DIMS_OF = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3, nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}


def _apply_nonlocal_block(module: nn.Module, args, output):
    """Forward hook: the module's output passes through its ``nonlocal_block`` child."""
    return module.nonlocal_block(output)


def _infer_channels_and_dims(module: nn.Module, name: str) -> tuple[int, int]:
    """Output channels and dims of a module from its last conv or norm layer (registration order)."""
    found = None
    for sub in module.modules():
        dims = next((d for cls, d in _DIMS_OF.items() if isinstance(sub, cls)), None)
        if dims is None:
            continue
        channels = getattr(sub, "out_channels", None) or getattr(sub, "num_features", None)
        found = (int(channels), dims)
    if found is None:
        raise ValueError(
            f"after: cannot infer the output channels of {name!r} ({type(module).__name__}, no conv or "
            "batch-norm layer inside); pass in_channels= and dims= explicitly"
        )
    return found


def add_nonlocal(model: nn.Module, after: Sequence[str], *, in_channels: int | None = None, dims: int | None = None, **block_kwargs):
    """Insert a :class:`NonLocalBlock` after each named submodule of an existing network, in place.

    The block becomes a child ``nonlocal_block`` of the named module and is applied to its output
    by a forward hook, so every existing state-dict key is unchanged (pretrained weights still
    load) and the new ones read ``<name>.nonlocal_block.theta.weight`` and so on. Each block starts
    as the identity, so the model's output is unchanged at initialisation.

    Args:
        model: any ``nn.Module``, e.g. a torchvision or timm ResNet.
        after: names as in ``model.named_modules()``, e.g. ``["layer3.4"]``.
        in_channels, dims: override the values inferred from the module's last conv / norm layer.
        **block_kwargs: further :class:`NonLocalBlock` arguments (mode, subsample, affinity, ...).

    Returns:
        The list of inserted blocks, in the order of ``after``.
    """
    if isinstance(after, str):
        after = [after]
    modules = dict(model.named_modules())
    blocks = []
    for name in after:
        if name not in modules:
            close = difflib.get_close_matches(name, list(modules), n=5)
            raise ValueError(f"after: no submodule named {name!r} in {type(model).__name__}; close matches: {close}")
        target = modules[name]
        if hasattr(target, "nonlocal_block"):
            raise ValueError(f"after: {name!r} already has a non-local block")
        channels, inferred_dims = (in_channels, dims) if in_channels and dims else _infer_channels_and_dims(target, name)
        block = NonLocalBlock(in_channels or channels, dims=dims or inferred_dims, **block_kwargs)
        target.add_module("nonlocal_block", block)
        target.register_forward_hook(_apply_nonlocal_block)
        blocks.append(block)
    return blocks
