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
- dot product: the associative form q (k^T v) / M, O((N + M) Cq Cv).
- concatenation: ReLU(a_i + b_j) with a = q w_q, b = k w_k is summed exactly in
  O((N + M) log M + (N + M) Cv) by sorting b, prefix sums of v and b v, and a binary search for -a_i.

Low-precision inputs (float16 / bfloat16, e.g. under autocast) are computed in float32 inside the
chunked and sorted kernels and cast back, so large logits cannot overflow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

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


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            "q, k, v: expected 3-D token tensors (B, N, C), (B, M, C), (B, M, Cv), "
            f"got shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        raise ValueError(f"q, k, v: batch sizes differ: {q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"k: expected {q.shape[2]} channels (as q), got {k.shape[2]}")
    if v.shape[1] != k.shape[1]:
        raise ValueError(f"v: expected {k.shape[1]} positions (as k), got {v.shape[1]}")
    if k.shape[1] == 0:
        raise ValueError("k: expected at least one key position, got 0")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Float32 for half types, so logits and sums cannot overflow; the dtype itself otherwise."""
    return torch.promote_types(dtype, torch.float32)


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


def _cpu_flash_forward(q, k, v, scale: float):
    """PyTorch's fused CPU flash kernel on (B, N, C) tokens: the output and, for the backward,
    the row log-sum-exp of the scaled logits, (B, N)."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), 0.0, False, attn_mask=None, scale=scale
    )
    return out.squeeze(1), lse.squeeze(1)


def _chunked_softmax_forward(q, k, v, scale: float, chunk: int):
    """Softmax attention a (B, chunk, M) block of logits at a time; returns the output and the
    row log-sum-exp of the scaled logits, (B, N), which the backward reuses."""
    out = v.new_empty(q.shape[0], q.shape[1], v.shape[2])
    acc = _acc_dtype(q.dtype)
    lse = q.new_empty(q.shape[0], q.shape[1], dtype=acc)
    qa, ka, va = q.to(acc), k.to(acc), v.to(acc)
    kt = ka.transpose(1, 2)  # (B, C, M)
    for s, e in _chunks(q.shape[1], chunk):
        logits = torch.bmm(qa[:, s:e], kt).mul_(scale)  # (B, c, M)
        lse[:, s:e] = torch.logsumexp(logits, dim=-1)
        p = logits.sub_(lse[:, s:e, None]).exp_()
        out[:, s:e] = torch.bmm(p, va)
    return out, lse


def _chunked_softmax_backward(q, k, v, out, lse, dout, scale: float, chunk: int, needs):
    """Gradients of softmax attention, recomputing each (B, chunk, M) block of probabilities.

    With S = scale q k^T, P = exp(S - lse) (lse saved by the forward), O = P v:
    dv = P^T dO, dP = dO v^T, dS = P * (dP - rowsum(dO * O)), dq = scale dS k, dk = scale dS^T q.
    """
    acc = _acc_dtype(q.dtype)
    qa, ka, va, dout = q.to(acc), k.to(acc), v.to(acc), dout.to(acc)
    neg_lse = lse.to(acc).neg()[:, :, None]  # (B, N, 1)
    neg_delta = (dout * out.to(acc)).sum(-1, keepdim=True).neg_()  # (B, N, 1) = -rowsum(dP * P)
    dq = torch.empty_like(qa) if needs[0] else None
    dk = torch.zeros_like(ka) if needs[1] else None
    dv = torch.zeros_like(va) if needs[2] else None
    kt, vt = ka.transpose(1, 2), va.transpose(1, 2)
    for s, e in _chunks(q.shape[1], chunk):
        dout_c = dout[:, s:e]
        p = torch.baddbmm(neg_lse[:, s:e], qa[:, s:e], kt, alpha=scale).exp_()  # (B, c, M)
        if dv is not None:
            dv.baddbmm_(p.transpose(1, 2), dout_c)
        if dq is None and dk is None:
            continue
        ds = torch.baddbmm(neg_delta[:, s:e], dout_c, vt).mul_(p)  # (B, c, M): dS without the scale
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
    def forward(ctx, q, k, v, scale: float, chunk: int, flash_forward: bool):
        if flash_forward:
            out, lse = _cpu_flash_forward(q, k, v, scale)
        else:
            out, lse = _chunked_softmax_forward(q, k, v, scale, chunk)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.chunk = scale, chunk
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _chunked_softmax_backward(
            q, k, v, out, lse, dout, ctx.scale, ctx.chunk, ctx.needs_input_grad[:3]
        )
        return dq, dk, dv, None, None, None


def softmax_attention(q, k, v, *, scale: float = 1.0, impl: str = "auto", chunk_size: int | None = None):
    """y = softmax(scale * q k^T) v without materialising the (B, N, M) affinity.

    Args:
        q: queries (B, N, C): theta for the embedded Gaussian, x for the Gaussian.
        k: keys (B, M, C): phi, or the (subsampled) x for the Gaussian.
        v: values (B, M, Cv): g.
        scale: multiplier of the logits (1/sqrt(C) in the official release, 1 in the paper).
        impl: ``"auto"`` picks the fastest exact path for the device; ``"sdpa"`` forces PyTorch's
            fused kernels with their own backward (RuntimeError if none accepts the inputs);
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
    flash_forward = impl == "auto" and _cpu_flash_ok(q, k, v)
    return _SoftmaxAttention.apply(q, k, v, scale, chunk, flash_forward)


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
