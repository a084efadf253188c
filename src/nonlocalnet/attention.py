"""The pairwise functions of the non-local operation (paper §3.2), exact fast paths and naive twins.

Every function works on token layouts: queries ``q`` of shape (B, N, Cq), keys ``k`` of shape
(B, M, Cq) and values ``v`` of shape (B, M, Cv), and returns y of shape (B, N, Cv) with

    y_i = 1/C(x) * sum_j f(q_i, k_j) v_j                                  (paper Eq. 1)

B is any batch of independent groups (clips, or clips x frames for space-only attention). The
normalisation C(x) is sum_j f for the softmax modes and M, the number of key positions, for the
dot product and concatenation (the official code divides by the number of phi positions, which is
M after subsampling).

Fast paths, each with a ``*_reference`` twin that materialises the (B, N, M) affinity:

- softmax (Gaussian and embedded Gaussian): scaled_dot_product_attention restricted to fused
  kernels (flash / memory-efficient), or a query-chunked kernel whose backward recomputes the
  affinity chunk by chunk. Memory is O(chunk * M), never O(N * M).
  :func:`channel_first_softmax_attention` is the same in the block's own (B, C, positions)
  layout, with an optional per-key logit term; the block uses it on CPU, its products through
  oneDNN (:mod:`nonlocalnet._gemm`). The chunked kernels normalise as the naive softmax does:
  exp(S - m) with m each row's largest logit, divided by the row's sum at the end; the backward
  recomputes the same exponentials from the saved m and sum. They are as accurate in float32 as
  the naive form at the Gaussian's logits of 1e4-1e5, which a log-sum-exp rounded to float32 is
  not (see :func:`_exp_less_max`).
- dot product: the associative form q (k^T v) / M, O((N + M) Cq Cv).
- concatenation: ReLU(a_i + b_j) with a = q w_q, b = k w_k is summed exactly in
  O((N + M) log M + (N + M) Cv) by sorting b, prefix sums of v and b v, and a binary search for -a_i.

Low-precision inputs (float16 / bfloat16, e.g. under autocast) are computed in float32 inside the
chunked and sorted kernels (autocast off inside) and cast back, so large logits cannot overflow.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ._gemm import mm

MODES = ("gaussian", "embedded_gaussian", "dot_product", "concatenation")
SOFTMAX_MODES = ("gaussian", "embedded_gaussian")
IMPLS = ("auto", "sdpa", "chunked", "naive")

# Elements of one (B, chunk, M) affinity block (2**21 floats = 8 MiB), and the fewest query rows
# per chunk: on 2 CPU cores chunks of 128-1024 rows ran the backward at the same speed, while 16
# rows (a batch of 16 frames of 56x56) ran it 2x slower from small GEMMs and loop overhead.
_CHUNK_ELEMENTS = 1 << 21
_MIN_CHUNK_ROWS = 128


def _check_impl(impl: str, allowed: tuple[str, ...] = IMPLS) -> None:
    if impl not in allowed:
        raise ValueError(f"impl: expected one of {allowed}, got {impl!r}")


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, channel_first: bool = False) -> None:
    layout = "channel-first tensors (B, C, N), (B, C, M), (B, Cv, M)" if channel_first else (
        "token tensors (B, N, C), (B, M, C), (B, M, Cv)")
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k, v: expected 3-D {layout}, got shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    channels, positions = (1, 2) if channel_first else (2, 1)
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        raise ValueError(f"q, k, v: batch sizes differ: {q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
    if k.shape[channels] != q.shape[channels]:
        raise ValueError(f"k: expected {q.shape[channels]} channels (as q, dim {channels}), got {k.shape[channels]}")
    if v.shape[positions] != k.shape[positions]:
        raise ValueError(f"v: expected {k.shape[positions]} positions (as k, dim {positions}), got {v.shape[positions]}")
    if k.shape[positions] == 0:
        raise ValueError("k: expected at least one key position, got 0")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Float32 for half types, so logits and sums cannot overflow; the dtype itself otherwise."""
    return torch.promote_types(dtype, torch.float32)


def _full_precision(t: torch.Tensor):
    """A context in which autocast leaves the products of a kernel on ``t``'s device alone: the
    kernels compute half-precision inputs in float32 themselves, and logits, maxima and sums formed
    in bfloat16 (an ulp of 64 at 1e4) would not be those the backward recomputes in float32."""
    device = t.device.type
    return torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext()


def default_chunk_size(batch: int, queries: int, keys: int) -> int:
    """Query rows per chunk: one (batch, chunk, keys) block of about 2**21 elements, 128 to 1024 rows."""
    chunk = _CHUNK_ELEMENTS // max(1, batch * keys)
    chunk = max(_MIN_CHUNK_ROWS, min(1024, chunk))
    return min(queries, chunk) if queries > 0 else 1


# --------------------------------------------------------------------------------------------
# Softmax: Gaussian f = exp(q_i . k_j) and embedded Gaussian f = exp(theta_i . phi_j)
# --------------------------------------------------------------------------------------------


def softmax_attention_reference(q, k, v, *, scale: float = 1.0) -> torch.Tensor:
    """Naive twin: materialises softmax(scale * q k^T) of shape (B, N, M)."""
    _check_qkv(q, k, v)
    affinity = torch.bmm(q, k.transpose(1, 2)) * scale  # (B, N, M)
    return torch.bmm(torch.softmax(affinity, dim=-1), v)  # (B, N, Cv)


def _fused_backends():
    """The SDPA backends that never materialise the affinity (those this PyTorch has)."""
    from torch.nn.attention import SDPBackend

    names = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")
    return [getattr(SDPBackend, n) for n in names if hasattr(SDPBackend, n)]


def fused_sdpa(q, k, v, *, scale: float) -> torch.Tensor:
    """scaled_dot_product_attention with the math (materialising) backend forbidden.

    The (B, N, C) tokens become one head, (B, 1, N, C), the layout for which PyTorch selects its
    flash kernel on CPU and its flash / memory-efficient kernels on CUDA. Raises RuntimeError when
    no fused kernel accepts the inputs (for example q and v of different widths on CPU).
    """
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(_fused_backends()):
        out = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), scale=scale)
    return out.squeeze(1)


def _cpu_flash_ok(q, k, v) -> bool:
    """Whether PyTorch's CPU flash kernel serves these tokens (equal widths, unit inner stride)."""
    return (
        q.device.type == "cpu"
        and q.shape[-1] == v.shape[-1]
        and q.dtype == k.dtype == v.dtype
        and all(t.stride(-1) == 1 for t in (q, k, v))
    )


def _chunks(n: int, size: int):
    """Query ranges of at most ``size`` rows; one range for a symbolic ``n`` (torch.export, dynamic
    torch.compile), where a loop over chunks would fix the size with a guard."""
    if isinstance(n, torch.SymInt) or isinstance(size, torch.SymInt):
        yield 0, n
        return
    for start in range(0, n, size):
        yield start, min(n, start + size)


def _cpu_flash_forward(q, k, v, scale: float) -> torch.Tensor:
    """PyTorch's fused CPU flash kernel on (B, N, C) tokens, for inference: its output is normalised
    by each row's sum of exponentials, but the row log-sum-exp it returns for a backward is rounded
    to float32, which at logits of 1e4-1e5 rescales every recomputed weight by up to 1e-3-1e-2
    (see :func:`_exp_less_max`); the autograd path recomputes with its own statistics."""
    out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), 0.0, False, attn_mask=None, scale=scale
    )
    return out.squeeze(1)


def _exp_less_max(logits: torch.Tensor, row_max: torch.Tensor | None, dim: int, scale: float = 1.0):
    """exp(scale (S - m)) in place on a block of logits S, m the logit of each query with the largest
    scaled value along ``dim`` (the key axis): taken here when ``row_max`` is None (forward), else
    the one the forward took. Returns the unnormalised weights, all in (0, 1], and m.

    The normalisation stays a separate sum l = sum_j exp(scale (S_ij - m_i)) that divides the output
    (and the gradients) at the end, as the naive softmax divides its weights. Folding it into the
    exponent as exp(S - lse), lse = m + log l, would round lse to float32 and scale all the weights
    of a row by exp(lse_exact - lse), off 1 by up to half an ulp of lse: 1e-3 at logits of 3e4 (the
    Gaussian's raw x.x over 512-1024 channels), enough for a row to no longer sum to 1 and for the
    gradient of the queries to take a share of the keys' common component. S - m is exact wherever
    the weight is not negligible, and a backward that forms S by the same products as its forward
    gets the same weights bit for bit.
    """
    if row_max is None:
        row_max = logits.amax(dim) if scale >= 0 else logits.amin(dim)
    logits.sub_(row_max.unsqueeze(dim))
    if scale != 1.0:
        logits.mul_(scale)
    # Weights under e^-64 (1.6e-28 of the row's largest) become exactly 0, as flush-to-zero would:
    # below e^-87 exp gives subnormal floats, and every product that reads them then runs on the
    # CPU's slow path (an unscaled Gaussian at res3 took 8.6 s instead of 0.3 s). A row sums to at
    # least 1, so the weights dropped change it by under 1e-24 of itself, in float64 too.
    return logits.masked_fill_(logits < _EXP_FLOOR, float("-inf")).exp_(), row_max


_EXP_FLOOR = -64.0


def _rowsum_of_products(dp: torch.Tensor, p: torch.Tensor, dim: int) -> torch.Tensor:
    """rowsum(dP * P) along the key axis ``dim``, kept: the term of the softmax gradient
    dS = P * (dP - rowsum(dP * P)), from the very dP and P it is subtracted from and multiplied by.
    Taken as rowsum(dO * O) instead, its rounding differs from that of dP: where a row's weight
    sits on one key (P = 1 there), dS there is then rounding noise of the size of dO . v instead of
    0, and dq = scale dS k carries it times the keys, which the Gaussian's large logits make large
    (1e3 times the naive softmax's error on a block's input gradient)."""
    return (dp * p).sum(dim, keepdim=True)


def _chunked_softmax_forward(q, k, v, scale: float, chunk: int):
    """Softmax attention a (B, chunk, M) block of logits at a time. Returns the output and, for the
    backward, each query's max m of the unscaled logits and sum l = sum_j exp(scale (S_ij - m_i)),
    (B, N) each."""
    acc = _acc_dtype(q.dtype)
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[2], dtype=acc)
    row_max, total = (q.new_empty(q.shape[0], q.shape[1], dtype=acc) for _ in range(2))
    qa, ka, va = q.to(acc), k.to(acc), v.to(acc)
    kt = ka.transpose(1, 2)  # (B, C, M)
    for s, e in _chunks(q.shape[1], chunk):
        weights, row_max[:, s:e] = _exp_less_max(torch.bmm(qa[:, s:e], kt), None, -1, scale)  # (B, c, M)
        total[:, s:e] = weights.sum(-1)
        torch.bmm(weights.div_(total[:, s:e, None]), va, out=out[:, s:e])
    return out.to(v.dtype), row_max, total


def _chunked_softmax_backward(q, k, v, row_max, total, dout, scale: float, chunk: int, needs):
    """Gradients of softmax attention, recomputing each (B, chunk, M) block of probabilities.

    With S = q k^T, P = exp(scale (S - m)) / l (m and l saved by the forward), O = P v:
    dv = P^T dO, dP = dO v^T, dS = P * (dP - rowsum(dP * P)), dq = scale dS k, dk = scale dS^T q.
    """
    acc = _acc_dtype(q.dtype)
    qa, ka, va, dout = q.to(acc), k.to(acc), v.to(acc), dout.to(acc)
    dq = torch.empty_like(qa) if needs[0] else None
    dk = torch.zeros_like(ka) if needs[1] else None
    dv = torch.zeros_like(va) if needs[2] else None
    kt, vt = ka.transpose(1, 2), va.transpose(1, 2)
    for s, e in _chunks(q.shape[1], chunk):
        dout_c = dout[:, s:e]
        p, _ = _exp_less_max(torch.bmm(qa[:, s:e], kt), row_max[:, s:e], -1, scale)  # (B, c, M)
        p.div_(total[:, s:e, None])
        if dv is not None:
            dv.baddbmm_(p.transpose(1, 2), dout_c)
        if dq is None and dk is None:
            continue
        dp = torch.bmm(dout_c, vt)  # (B, c, M)
        ds = dp.sub_(_rowsum_of_products(dp, p, -1)).mul_(p)  # (B, c, M): dS without the scale
        if dq is not None:
            dq[:, s:e] = torch.bmm(ds, ka)
        if dk is not None:
            dk.baddbmm_(ds.transpose(1, 2), qa[:, s:e], alpha=scale)
    grads = []
    for g, t, scaled in ((dq, q, True), (dk, k, False), (dv, v, False)):
        if g is not None:
            g = g.mul_(scale) if scaled else g
            g = g.to(t.dtype)
        grads.append(g)
    return grads


class _SoftmaxAttention(torch.autograd.Function):
    """Softmax attention whose forward and backward never hold more than one chunk of the affinity."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float, chunk: int):
        with _full_precision(q):
            out, row_max, total = _chunked_softmax_forward(q, k, v, scale, chunk)
        ctx.save_for_backward(q, k, v, row_max, total)
        ctx.scale, ctx.chunk = scale, chunk
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, row_max, total = ctx.saved_tensors
        with _full_precision(q):
            dq, dk, dv = _chunked_softmax_backward(
                q, k, v, row_max, total, dout, ctx.scale, ctx.chunk, ctx.needs_input_grad[:3]
            )
        return dq, dk, dv, None, None


def softmax_attention(q, k, v, *, scale: float = 1.0, impl: str = "auto", chunk_size: int | None = None):
    """y = softmax(scale * q k^T) v without materialising the (B, N, M) affinity.

    Args:
        q: queries (B, N, C): theta for the embedded Gaussian, x for the Gaussian.
        k: keys (B, M, C): phi, or the (subsampled) x for the Gaussian.
        v: values (B, M, Cv): g.
        scale: multiplier of the logits (1/sqrt(C) in the official release, 1 in the paper).
        impl: ``"auto"`` picks the fastest exact path for the device (on CPU the chunked kernel,
            and PyTorch's flash kernel for an inference forward of equal widths); ``"sdpa"`` forces
            PyTorch's fused kernels with their own backward (RuntimeError if none accepts the
            inputs; on CPU that backward loses float32 accuracy at logits of 1e4 and more);
            ``"chunked"`` forces the query-chunked kernel; ``"naive"`` the reference.
        chunk_size: query rows per chunk for the chunked kernel (default: about 2**20 elements
            of affinity per chunk).

    Returns:
        (B, N, Cv) tensor.
    """
    _check_impl(impl)
    _check_qkv(q, k, v)
    if impl == "naive":
        return softmax_attention_reference(q, k, v, scale=scale)
    if impl == "sdpa":
        return fused_sdpa(q, k, v, scale=scale)
    scale = float(scale)
    chunk = chunk_size or default_chunk_size(q.shape[0], q.shape[1], k.shape[1])
    if impl == "auto" and q.device.type != "cpu":
        # On accelerators the fused kernels' own backward is the fast one.
        try:
            return fused_sdpa(q, k, v, scale=scale)
        except RuntimeError:
            pass
    if torch.jit.is_tracing():  # TorchScript cannot hold a Python autograd.Function: one SDPA op,
        # any backend (the runtime picks a fused one where the shapes allow)
        out = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), scale=scale)
        return out.squeeze(1)
    if impl == "auto" and _cpu_flash_ok(q, k, v) and not (
        torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    ):
        return _cpu_flash_forward(q, k, v, scale)  # inference: nothing recomputes from its statistics
    return _SoftmaxAttention.apply(q, k, v, scale, chunk)


def _check_channel_first(q, k, key_bias, v) -> None:
    _check_qkv(q, k, v, channel_first=True)
    if key_bias is not None and tuple(key_bias.shape) != (k.shape[0], k.shape[2]):
        raise ValueError(f"key_bias: expected shape {(k.shape[0], k.shape[2])}, got {tuple(key_bias.shape)}")


def channel_first_softmax_attention_reference(q, k, v, *, key_bias=None, scale: float = 1.0) -> torch.Tensor:
    """Naive twin of :func:`channel_first_softmax_attention`: materialises the (B, N, M) weights."""
    _check_channel_first(q, k, key_bias, v)
    logits = torch.bmm(q.transpose(1, 2), k)  # (B, N, M)
    if key_bias is not None:
        logits = logits + key_bias[:, None, :]
    weights = torch.softmax(logits * scale, dim=-1)
    return torch.bmm(v, weights.transpose(1, 2))  # (B, Cv, N)


def _channel_first_chunk(queries: int, keys: int) -> int:
    """Query columns per chunk of one clip: a (keys, chunk) block of at most about 2**21 elements
    (at least 128 columns), the columns spread evenly over the chunks."""
    cols = max(_MIN_CHUNK_ROWS, _CHUNK_ELEMENTS // max(1, keys))
    if isinstance(queries, torch.SymInt) or queries <= 0:
        return cols
    count = -(-queries // cols)
    return -(-queries // count)


def _dense_chunk(t, s, e):
    """Columns s:e of a (C, N) matrix, copied when they are not all of it: the products read a
    dense operand faster than a slice of a wider one, and the backward reads each slice twice."""
    return t if e - s == t.shape[1] else t[:, s:e].contiguous()


def _key_major_weights(keys, queries, bias, row_max):
    """The unnormalised weights E^T = exp(S^T - m) (M, c) of one clip and chunk, and m (c,): from the
    scaled keys (M, C), the queries (C, c), the scaled key bias (M,) or None, and the max of each
    query's logits (None in the forward, which takes it; the saved one in the backward)."""
    logits = mm(keys, queries)  # (M, c)
    if bias is not None:
        logits.add_(bias[:, None])
    return _exp_less_max(logits, row_max, 0)


def _scaled_keys(k, key_bias, scale: float):
    """The scaled key tokens (B, M, C), a new tensor, and the scaled key bias (B, M) or None."""
    keys = k.mul(scale).transpose(1, 2).contiguous()
    return keys, None if key_bias is None else key_bias * scale


def _channel_first_forward(q, k, key_bias, v, scale: float, chunk: int):
    """Output (B, Cv, N), and each query's logit max m and sum l = sum_j exp(S_ij - m) (B, N), one
    clip and one (M, chunk) block of logits at a time. The logits are kept key-major, E^T of shape
    (M, c): every product then reads a dense operand as it lies (q and v channel-first, the keys as
    tokens) and writes the output in its (Cv, c) layout. The values carry a row of ones, so the
    product with the weights also gives l, which divides the output."""
    out = q.new_empty(q.shape[0], v.shape[1], q.shape[2])
    row_max, total = (q.new_empty(q.shape[0], q.shape[2]) for _ in range(2))
    keys, bias = _scaled_keys(k, key_bias, scale)
    values = F.pad(v, (0, 0, 0, 1), value=1.0)  # (B, Cv + 1, M)
    for b in range(q.shape[0]):
        for s, e in _chunks(q.shape[2], chunk):
            bias_b = None if bias is None else bias[b]
            e_t, row_max[b, s:e] = _key_major_weights(keys[b], _dense_chunk(q[b], s, e), bias_b, None)
            sums = mm(values[b], e_t)  # (Cv + 1, c)
            total[b, s:e] = sums[-1]
            torch.div(sums[:-1], sums[-1], out=out[b, :, s:e])
    return out, row_max, total


def _channel_first_backward(q, k, key_bias, v, row_max, total, dout, scale: float, chunk: int, needs):
    """Gradients of :func:`_channel_first_forward`, recomputing each (M, chunk) block of weights.

    With S = scale (q^T k + bias), E = exp(S - m), P = E / l, O = v P^T, dP = dO^T v:
    dS = P * (dP - rowsum(dP * P)), dq = scale k dS^T, dk = scale q dS, dbias = scale colsum(dS),
    dv = dO P. All kept transposed as the forward keeps E (key-major).
    """
    # 1/l scales whichever of the (M, c) weights and the (Cv, c) gradient chunk is smaller: P and
    # dO, or E and dO / l, which give the same products, dP / l and rowsum(dP * P) / l
    keys_fewer = k.shape[2] < v.shape[1]
    keys, bias = _scaled_keys(k, key_bias, scale)
    values = v.transpose(1, 2).contiguous()  # (B, M, Cv)
    dq = torch.empty_like(q) if needs[0] else None
    dk_t = k.new_zeros(k.shape[0], k.shape[2], k.shape[1]) if needs[1] else None  # (B, M, C)
    dbias = torch.zeros_like(key_bias) if key_bias is not None and needs[2] else None
    dv_t = v.new_zeros(v.shape[0], v.shape[2], v.shape[1]) if needs[3] else None  # (B, M, Cv)
    for b in range(q.shape[0]):
        for s, e in _chunks(q.shape[2], chunk):
            queries = _dense_chunk(q[b], s, e)  # (C, c)
            p_t, _ = _key_major_weights(keys[b], queries, None if bias is None else bias[b], row_max[b, s:e])
            if keys_fewer:
                p_t, grad = p_t.div_(total[b, s:e]), _dense_chunk(dout[b], s, e)  # P^T (M, c), dO (Cv, c)
            else:
                grad = dout[b, :, s:e] / total[b, s:e]  # E^T, dO / l
            if dv_t is not None:
                dv_t[b] += mm(p_t, grad.t())
            if dq is None and dk_t is None and dbias is None:
                continue
            dp_t = mm(values[b], grad)  # (M, c)
            delta = _rowsum_of_products(dp_t, p_t, 0)  # rowsum(dP * P), or that / l
            ds_t = dp_t.sub_(delta if keys_fewer else delta.div_(total[b, s:e])).mul_(p_t)  # dS^T / scale
            if dq is not None:
                dq[b, :, s:e] = mm(k[b], ds_t)
            if dk_t is not None:
                dk_t[b] += mm(ds_t, queries.t())
            if dbias is not None:
                dbias[b] += ds_t.sum(1)
    grads = [dq, None if dk_t is None else dk_t.transpose(1, 2), dbias,
             None if dv_t is None else dv_t.transpose(1, 2)]
    return [None if g is None else g.mul_(scale) if i < 3 else g for i, g in enumerate(grads)]


class _ChannelFirstSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, key_bias, v, scale: float, chunk: int):
        with _full_precision(q):
            out, row_max, total = _channel_first_forward(q, k, key_bias, v, scale, chunk)
        ctx.save_for_backward(q, k, key_bias, v, row_max, total)
        ctx.scale, ctx.chunk = scale, chunk
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, key_bias, v, row_max, total = ctx.saved_tensors
        with _full_precision(q):
            grads = _channel_first_backward(
                q, k, key_bias, v, row_max, total, dout, ctx.scale, ctx.chunk, ctx.needs_input_grad[:4]
            )
        return (*grads, None, None)


def channel_first_softmax_attention(
    q, k, v, *, key_bias=None, scale: float = 1.0, impl: str = "auto", chunk_size: int | None = None
):
    """Softmax attention on channel-first features, the block's own layout:

        out[:, :, i] = sum_j softmax_j(scale * (q[:, :, i] . k[:, :, j] + key_bias_j)) v[:, :, j]

    q (theta, or the block input x itself when W_theta is folded into the keys, see
    :meth:`nonlocalnet.NonLocalBlock.transform`), k and v are read in the (B, C, positions) layout
    the 1x1 convs write, and the output comes in the layout of the conv, norm and residual that
    follow: no transposed copies of the N query positions. Each clip is done one (M, chunk) block
    of logits at a time with float32 products through oneDNN on CPU (:mod:`nonlocalnet._gemm`); the
    backward recomputes the blocks from the saved row maxima and sums. The (B, N, M) weights are
    never held whole.

    Args:
        q: queries (B, C, N).
        k: keys (B, C, M).
        v: values (B, Cv, M).
        key_bias: optional (B, M) logit term of each key (b_theta . phi_j when W_theta is folded).
        scale: multiplier of the logits.
        impl: ``"auto"`` (or ``"chunked"``) for the chunked kernel, ``"naive"`` for the reference.
        chunk_size: query positions per chunk (default: about 2**21 logits per chunk).

    Returns:
        (B, Cv, N) tensor.
    """
    _check_impl(impl, ("auto", "chunked", "naive"))
    _check_channel_first(q, k, key_bias, v)
    if impl == "naive":
        return channel_first_softmax_attention_reference(q, k, v, key_bias=key_bias, scale=scale)
    scale = float(scale)
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        # One SDPA op, which TorchScript, ONNX, torch.export and torch.compile all take (a loop over
        # the clips would fix the batch size), and autograd differentiates.
        mask = None if key_bias is None else (key_bias * scale)[:, None, None, :]
        out = F.scaled_dot_product_attention(q.transpose(1, 2).unsqueeze(1), k.transpose(1, 2).unsqueeze(1),
                                             v.transpose(1, 2).unsqueeze(1), attn_mask=mask, scale=scale)
        return out.squeeze(1).transpose(1, 2)
    dtype = v.dtype
    acc = _acc_dtype(dtype)
    args = [None if t is None else t.to(acc) for t in (q, k, key_bias, v)]
    chunk = chunk_size or _channel_first_chunk(q.shape[2], k.shape[2])
    return _ChannelFirstSoftmax.apply(*args, scale, chunk).to(dtype)


# --------------------------------------------------------------------------------------------
# Dot product: f = theta_i . phi_j, C(x) = M
# --------------------------------------------------------------------------------------------


def dot_product_attention_reference(q, k, v) -> torch.Tensor:
    """Naive twin: materialises q k^T / M of shape (B, N, M)."""
    _check_qkv(q, k, v)
    return torch.bmm(torch.bmm(q, k.transpose(1, 2)) / k.shape[1], v)


def dot_product_attention(q, k, v, *, impl: str = "auto") -> torch.Tensor:
    """y = (q k^T / M) v computed associatively as q (k^T v) / M, O((N + M) C Cv)."""
    _check_impl(impl, ("auto", "naive"))
    _check_qkv(q, k, v)
    if impl == "naive":
        return dot_product_attention_reference(q, k, v)
    kv = torch.bmm(k.transpose(1, 2), v) / k.shape[1]  # (B, C, Cv)
    return torch.bmm(q, kv)


# --------------------------------------------------------------------------------------------
# Concatenation: f = ReLU(w^T [theta_i, phi_j]) = ReLU(a_i + b_j), C(x) = M
# --------------------------------------------------------------------------------------------


def _check_concat(a, b, v) -> None:
    if a.dim() != 2 or b.dim() != 2 or v.dim() != 3:
        raise ValueError(
            "a, b, v: expected shapes (B, N), (B, M), (B, M, Cv), "
            f"got {tuple(a.shape)}, {tuple(b.shape)}, {tuple(v.shape)}"
        )
    if b.shape[0] != a.shape[0] or v.shape[0] != a.shape[0] or v.shape[1] != b.shape[1]:
        raise ValueError(f"a, b, v: inconsistent shapes {tuple(a.shape)}, {tuple(b.shape)}, {tuple(v.shape)}")
    if b.shape[1] == 0:
        raise ValueError("b: expected at least one key position, got 0")


def concatenation_attention_reference(a, b, v) -> torch.Tensor:
    """Naive twin: materialises ReLU(a_i + b_j) / M of shape (B, N, M)."""
    _check_concat(a, b, v)
    pairwise = torch.relu(a[:, :, None] + b[:, None, :]) / b.shape[1]  # (B, N, M)
    return torch.bmm(pairwise, v)


def concatenation_attention(a, b, v, *, impl: str = "auto") -> torch.Tensor:
    """y_i = 1/M sum_j ReLU(a_i + b_j) v_j, exactly, without the (B, N, M) matrix.

    ReLU(a_i + b_j) is a_i + b_j for the keys with b_j > -a_i and 0 for the others. With the keys
    sorted by decreasing b, those keys are a prefix whose length a binary search finds, so
    y_i = (a_i * sum_prefix v + sum_prefix b v) / M with prefix sums. Keys with b_j = -a_i
    contribute 0, as ReLU(0) = 0, and get the zero subgradient ReLU has there.

    Args:
        a: (B, N) query terms w_theta . theta_i.
        b: (B, M) key terms w_phi . phi_j.
        v: (B, M, Cv) values g.
        impl: ``"auto"`` (sorted prefix sums) or ``"naive"``.
    """
    _check_impl(impl, ("auto", "naive"))
    _check_concat(a, b, v)
    if impl == "naive":
        return concatenation_attention_reference(a, b, v)
    dtype = v.dtype
    acc = _acc_dtype(dtype)
    a, b, v = a.to(acc), b.to(acc), v.to(acc)
    batch, keys, width = v.shape
    neg_sorted, order = torch.sort(-b, dim=1)  # ascending -b, i.e. b decreasing
    v_sorted = v.gather(1, order[:, :, None].expand(-1, -1, width))  # (B, M, Cv)
    zero = v.new_zeros(batch, 1, width)
    sum_v = torch.cat([zero, v_sorted.cumsum(1)], dim=1)  # (B, M+1, Cv)
    sum_bv = torch.cat([zero, (-neg_sorted[:, :, None] * v_sorted).cumsum(1)], dim=1)
    # Number of keys with -b_j < a_i, i.e. b_j > -a_i: the active prefix of the sorted keys.
    count = torch.searchsorted(neg_sorted.detach(), a.detach().contiguous(), side="left")  # (B, N)
    index = count[:, :, None].expand(-1, -1, width)
    y = (a[:, :, None] * sum_v.gather(1, index) + sum_bv.gather(1, index)) / keys
    return y.to(dtype)


# --------------------------------------------------------------------------------------------
# Dispatch and attention maps
# --------------------------------------------------------------------------------------------


def _concat_terms(q, k, concat_weight):
    if concat_weight is None:
        raise ValueError("concat_weight: required for mode 'concatenation', got None")
    width = q.shape[-1]
    w = concat_weight.reshape(-1)
    if w.numel() != 2 * width:
        raise ValueError(f"concat_weight: expected {2 * width} values (2 x channels), got {w.numel()}")
    return q @ w[:width], k @ w[width:]  # (B, N), (B, M)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")


def nonlocal_attention(
    q, k, v, *, mode: str = "embedded_gaussian", scale: float = 1.0, concat_weight=None, impl: str = "auto"
):
    """The non-local operation y = 1/C(x) sum_j f(q_i, k_j) v_j for any of the paper's four f.

    Args:
        q, k, v: token tensors (B, N, C), (B, M, C), (B, M, Cv).
        mode: ``gaussian``, ``embedded_gaussian``, ``dot_product`` or ``concatenation``.
        scale: logit multiplier of the softmax modes (ignored by the others).
        concat_weight: w_f of the concatenation, 2C values (first half multiplies q, second k).
        impl: ``"auto"`` for the exact fast path, ``"naive"`` for the materialising reference;
            the softmax modes also take ``"sdpa"`` and ``"chunked"``.
    """
    _check_mode(mode)
    if mode in SOFTMAX_MODES:
        return softmax_attention(q, k, v, scale=scale, impl=impl)
    _check_impl(impl)
    impl = "naive" if impl == "naive" else "auto"
    if mode == "dot_product":
        return dot_product_attention(q, k, v, impl=impl)
    _check_qkv(q, k, v)
    a, b = _concat_terms(q, k, concat_weight)
    return concatenation_attention(a, b, v, impl=impl)


def attention_weights(q, k, queries, *, mode: str = "embedded_gaussian", scale: float = 1.0, concat_weight=None):
    """Rows f(x_i, .)/C(x) of the affinity for chosen query positions only, shape (B, Q, M).

    Args:
        q, k: token tensors (B, N, C) and (B, M, C).
        queries: indices into N, shape (Q,) for all batch entries or (B, Q).
        mode, scale, concat_weight: as in :func:`nonlocal_attention`.

    Memory is O(Q * M): the full (N, M) affinity is never formed.
    """
    _check_mode(mode)
    queries = torch.as_tensor(queries, device=q.device, dtype=torch.long)
    if queries.dim() == 1:
        queries = queries.expand(q.shape[0], -1)
    if queries.dim() != 2 or queries.shape[0] != q.shape[0]:
        raise ValueError(f"queries: expected shape (Q,) or ({q.shape[0]}, Q), got {tuple(queries.shape)}")
    if queries.numel() and (queries.min() < 0 or queries.max() >= q.shape[1]):
        raise ValueError(f"queries: expected indices in [0, {q.shape[1]}), got min {queries.min()} max {queries.max()}")
    q_sel = q.gather(1, queries[:, :, None].expand(-1, -1, q.shape[2]))  # (B, Q, C)
    if mode == "concatenation":
        a, b = _concat_terms(q_sel, k, concat_weight)
        return torch.relu(a[:, :, None] + b[:, None, :]) / k.shape[1]
    logits = torch.bmm(q_sel, k.transpose(1, 2))  # (B, Q, M)
    if mode == "dot_product":
        return logits / k.shape[1]
    return torch.softmax(logits.to(_acc_dtype(logits.dtype)) * scale, dim=-1).to(logits.dtype)
