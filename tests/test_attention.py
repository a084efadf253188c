"""Fast attention paths against their materialising twins: values, gradients, memory, precision."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import rel_err
from nonlocalnet import attention as A

SHAPES = [(1, 1, 1, 3, 2), (2, 37, 11, 5, 7), (3, 53, 29, 8, 8), (2, 129, 61, 16, 16)]  # B, N, M, C, Cv


def _inputs(shape, dtype, grad=True, spread=1.0):
    b, n, m, c, cv = shape
    q = torch.randn(b, n, c, dtype=dtype) * spread
    k = torch.randn(b, m, c, dtype=dtype) * spread
    v = torch.randn(b, m, cv, dtype=dtype)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def _value_and_grads(fn, tensors, weight=None):
    out = fn(*tensors)
    if weight is None:
        weight = torch.randn_like(out)  # a random upstream gradient, never all ones or zeros
    grads = torch.autograd.grad((out * weight).sum(), tensors)
    return out, grads, weight


def _compare(fast, naive, tensors, tol):
    out_n, grads_n, weight = _value_and_grads(naive, tensors)
    out_f, grads_f, _ = _value_and_grads(fast, tensors, weight)
    assert rel_err(out_f, out_n) < tol
    for gf, gn in zip(grads_f, grads_n):
        assert rel_err(gf, gn) < tol


_SOFTMAX_CASES = [
    (shape, impl, chunk)
    for shape in SHAPES
    for impl, chunk in [("auto", None), ("chunked", 7), ("chunked", None), ("sdpa", None)]
    if impl != "sdpa" or shape[3] == shape[4]  # the CPU flash kernel needs equal q and v widths
]


@pytest.mark.parametrize("shape,impl,chunk", _SOFTMAX_CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_softmax_matches_reference(shape, dtype, tol, impl, chunk):
    tensors = _inputs(shape, dtype)
    scale = shape[3] ** -0.5
    _compare(
        lambda q, k, v: A.softmax_attention(q, k, v, scale=scale, impl=impl, chunk_size=chunk),
        lambda q, k, v: A.softmax_attention_reference(q, k, v, scale=scale),
        tensors,
        tol,
    )


def _channel_first_inputs(shape, dtype, bias, spread=1.0):
    """Channel-first q (B, C, N), k (B, C, M), v (B, Cv, M) and a key bias (B, M) or None."""
    b, n, m, c, cv = shape
    tensors = [torch.randn(b, c, n, dtype=dtype) * spread, torch.randn(b, c, m, dtype=dtype) * spread,
               torch.randn(b, cv, m, dtype=dtype)]
    if bias:
        tensors.append(torch.randn(b, m, dtype=dtype) * spread)
    return [t.requires_grad_() for t in tensors]


def _channel_first(fn, **kwargs):
    return lambda q, k, v, key_bias=None: fn(q, k, v, key_bias=key_bias, **kwargs)


# M < Cv and M > Cv: the backward takes rowsum(dO * O) from the smaller of the weights and the output
CHANNEL_FIRST_SHAPES = SHAPES + [(2, 45, 6, 9, 13)]


@pytest.mark.parametrize("shape", CHANNEL_FIRST_SHAPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [None, 7])
def test_channel_first_matches_reference_float64(shape, bias, chunk):
    scale = shape[3] ** -0.5
    _compare(_channel_first(A.channel_first_softmax_attention, scale=scale, chunk_size=chunk),
             _channel_first(A.channel_first_softmax_attention_reference, scale=scale),
             _channel_first_inputs(shape, torch.float64, bias), 1e-10)


@pytest.mark.parametrize("shape", CHANNEL_FIRST_SHAPES)
@pytest.mark.parametrize("chunk", [None, 7])
def test_channel_first_float32_through_onednn(onednn, shape, chunk):
    # float32 products through oneDNN (every size, for the test) against the float64 reference
    tensors = _channel_first_inputs(shape, torch.float32, bias=True)
    scale = shape[3] ** -0.5
    weight = torch.randn(shape[0], shape[4], shape[1], dtype=torch.float64)
    wide = [t.detach().double().requires_grad_() for t in tensors]
    expected = A.channel_first_softmax_attention_reference(*wide[:3], key_bias=wide[3], scale=scale)
    grads_expected = torch.autograd.grad((expected * weight).sum(), wide)
    with onednn() as calls:
        out = A.channel_first_softmax_attention(*tensors[:3], key_bias=tensors[3], scale=scale, chunk_size=chunk)
        grads = torch.autograd.grad((out * weight.float()).sum(), tensors)
    assert calls.count > 0
    assert rel_err(out, expected) < 1e-5
    for g, ge in zip(grads, grads_expected):
        assert rel_err(g, ge) < 1e-5


def test_channel_first_never_materialises_affinity():
    b, n, m, c = 1, 16384, 1024, 16
    q, k, v = _channel_first_inputs((b, n, m, c, c), torch.float32, bias=False)
    with _LargestTensor() as mode:
        out = A.channel_first_softmax_attention(q, k, v, scale=0.2)
        out.backward(torch.randn_like(out))
    chunk = A._channel_first_chunk(n, m)
    assert chunk < n and mode.largest <= max(chunk * m, b * c * n)
    assert mode.largest < n * m / 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_channel_first_autocast_large_logits_finite(dtype):
    tensors = _channel_first_inputs((2, 50, 20, 16, 16), torch.float32, bias=True, spread=30.0)
    with torch.autocast("cpu", dtype=dtype):
        out = A.channel_first_softmax_attention(*(t.to(dtype) for t in tensors[:3]), key_bias=tensors[3].to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    out.float().sum().backward()
    for t in tensors:
        assert torch.isfinite(t.grad).all()


def test_channel_first_bad_arguments_name_the_argument():
    q, k, v, bias = _channel_first_inputs((2, 5, 4, 3, 6), torch.float32, bias=True)
    f = A.channel_first_softmax_attention
    with pytest.raises(ValueError, match=r"k: expected 3 channels \(as q, dim 1\), got 2"):
        f(q, k[:, :2], v)
    with pytest.raises(ValueError, match=r"v: expected 4 positions \(as k, dim 2\), got 3"):
        f(q, k, v[..., :3])
    with pytest.raises(ValueError, match=r"key_bias: expected shape \(2, 4\), got \(2, 5\)"):
        f(q, k, v, key_bias=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="q, k, v: expected 3-D channel-first"):
        f(q[0], k, v)
    with pytest.raises(ValueError, match="impl"):
        f(q, k, v, impl="sdpa")


# --------------------------------------------------------------------------------------------
# float32 at large logits with near-tied keys
# --------------------------------------------------------------------------------------------

# Sizes of the scaled logits: the Gaussian's raw x.x over 512-1024 channels of real res4 inputs
# reaches 1e4-1e5 (issue 18).
LOGIT_SIZES = [3.5e2, 3.5e4, 3e5]


def near_tied(cluster, channels, logit, scale=1.0):
    """Float64 features (*cluster.shape, channels) whose Gaussian logits scale * x_i . x_j are about
    ``logit`` within a cluster, with near-ties: each is a copy of the random centre its entry of
    ``cluster`` (ints) names plus noise small enough that the logits of a cluster differ by units,
    so that a softmax row spreads over near-copies."""
    centres = torch.randn(int(cluster.max()) + 1, channels, dtype=torch.float64)
    x = centres[cluster]
    x = x + 16.0 / logit * torch.randn_like(x)
    return x * (logit / (scale * x.pow(2).sum(-1).mean())) ** 0.5


def float32_errors(fn, inputs, upstream):
    """Relative errors against float64 of ``fn`` run in float32: its output and its gradients with
    respect to each of ``inputs`` (float64 tensors, rounded to float32 first, so that only the
    computation's own rounding counts) under the ``upstream`` gradient."""
    inputs = [t.float().double() for t in inputs]
    wide = [t.clone().requires_grad_() for t in inputs]
    narrow = [t.float().requires_grad_() for t in inputs]
    expected = fn(*wide)
    grads_expected = torch.autograd.grad((expected * upstream).sum(), wide)
    out = fn(*narrow)
    grads = torch.autograd.grad((out * upstream.float()).sum(), narrow)
    return [rel_err(out, expected)] + [rel_err(g, ge) for g, ge in zip(grads, grads_expected)]


def assert_as_accurate_as_naive(fast, naive, factor=4.0):
    """Each float32 error of the fast path within ``factor`` times the naive float32 softmax's (what
    mmcv and pytorchvideo compute) on the same inputs, or under 1e-6. The naive errors come from the
    logits' rounding, which the fast kernels share (oneDNN sums the products in another order than
    MKL: about 2x the naive error on these inputs), and from a row that sums to 1 to float32
    precision. Measured: at most 2.8x with the row max and sum kept apart; with a float32
    log-sum-exp in the exponent 4x (at logits of 350) to 1e4x."""
    for name, f, n in zip(["output", "grad 0", "grad 1", "grad 2", "grad 3"], fast, naive):
        assert f <= max(factor * n, 1e-6), f"{name}: fast {f:.2e} against naive float32 {n:.2e}"


def _tied_tokens(logit, n=96, m=40, c=512, cv=64):
    """Near-tied Gaussian tokens: queries x (1, N, C), keys every other x (1, M, C), values a linear
    map of the keys (as g(x_j)), so that the output depends on the sum of each row's weights over
    near-copies, not on how the weight spreads over them."""
    scale = c**-0.5
    x = near_tied(torch.randint(4, (1, n)), c, logit, scale)
    k = x[:, 1::2][:, :m].contiguous()
    v = k @ torch.randn(c, cv, dtype=torch.float64) * c**-0.5
    return [x, k, v], scale


@pytest.mark.parametrize("logit", LOGIT_SIZES)
@pytest.mark.parametrize("impl,chunk,cv", [("auto", None, 64), ("chunked", 17, 64), ("auto", None, 512),
                                           ("chunked", 17, 32)])
def test_softmax_float32_large_logits_near_ties(logit, impl, chunk, cv):
    # the token kernels (equal widths: "auto" would take PyTorch's flash kernel were the forward not
    # differentiated) against the naive float32 softmax, values and every gradient
    tensors, scale = _tied_tokens(logit, cv=cv)
    upstream = torch.randn(1, tensors[0].shape[1], cv, dtype=torch.float64)
    fast = float32_errors(lambda q, k, v: A.softmax_attention(q, k, v, scale=scale, impl=impl, chunk_size=chunk),
                          tensors, upstream)
    naive = float32_errors(lambda q, k, v: A.softmax_attention_reference(q, k, v, scale=scale), tensors, upstream)
    assert_as_accurate_as_naive(fast, naive)


@pytest.mark.parametrize("logit", LOGIT_SIZES)
def test_softmax_float32_inference_large_logits_near_ties(logit):
    # inference with equal widths: PyTorch's flash kernel, which divides by each row's sum itself
    tensors, scale = _tied_tokens(logit, cv=512)
    q, k, v = (t.float() for t in tensors)
    expected = A.softmax_attention_reference(q.double(), k.double(), v.double(), scale=scale)
    with torch.no_grad():
        fast = rel_err(A.softmax_attention(q, k, v, scale=scale), expected)
    naive = rel_err(A.softmax_attention_reference(q, k, v, scale=scale), expected)
    assert fast <= max(4 * naive, 1e-6), (fast, naive)


@pytest.mark.parametrize("logit", LOGIT_SIZES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk,cv", [(None, 64), (17, 64), (None, 16)])  # more keys than values (cv 16)
def test_channel_first_float32_large_logits_near_ties(logit, bias, chunk, cv):
    tensors, scale = _tied_tokens(logit, cv=cv)
    q, k, v = (t.transpose(1, 2) for t in tensors)
    # a key bias (b_theta . phi_j when W_theta is folded) that moves the scaled logits by units
    inputs = [q, k, v] + ([torch.randn(1, k.shape[2], dtype=torch.float64) * 2 / scale] if bias else [])
    upstream = torch.randn(1, cv, q.shape[2], dtype=torch.float64)

    def run(fn, **kw):
        return float32_errors(lambda q, k, v, key_bias=None: fn(q, k, v, key_bias=key_bias, scale=scale, **kw),
                              inputs, upstream)

    fast = run(A.channel_first_softmax_attention, chunk_size=chunk)
    assert_as_accurate_as_naive(fast, run(A.channel_first_softmax_attention_reference))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_dot_product_matches_reference(shape, dtype, tol):
    _compare(A.dot_product_attention, A.dot_product_attention_reference, _inputs(shape, dtype), tol)


@pytest.mark.parametrize("shape", SHAPES)
def test_concatenation_matches_reference(shape):
    b, n, m, _, cv = shape
    a = torch.randn(b, n, dtype=torch.float64, requires_grad=True)
    bb = torch.randn(b, m, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, m, cv, dtype=torch.float64, requires_grad=True)
    _compare(A.concatenation_attention, A.concatenation_attention_reference, [a, bb, v], 1e-10)


def test_concatenation_float32_values():
    a, b, v = torch.randn(2, 301), torch.randn(2, 97), torch.randn(2, 97, 9)
    assert rel_err(A.concatenation_attention(a, b, v), A.concatenation_attention_reference(a, b, v)) < 1e-5


def test_concatenation_ties_follow_relu_subgradient():
    # b_j == -a_i exactly: ReLU(0) = 0 and PyTorch's ReLU'(0) = 0; the sorted path must agree.
    a = torch.tensor([[0.5, -0.25, 1.0]], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([[-0.5, 0.25, -1.0, 0.75]], dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 4, 3, dtype=torch.float64, requires_grad=True)
    _compare(A.concatenation_attention, A.concatenation_attention_reference, [a, b, v], 1e-12)


@pytest.mark.parametrize("mode", A.MODES)
def test_nonlocal_attention_dispatch(mode):
    q, k, v = _inputs((2, 23, 13, 6, 6), torch.float64)
    w = torch.randn(12, dtype=torch.float64, requires_grad=True)
    kw = dict(mode=mode, scale=0.7, concat_weight=w if mode == "concatenation" else None)
    _compare(
        lambda q, k, v: A.nonlocal_attention(q, k, v, impl="auto", **kw),
        lambda q, k, v: A.nonlocal_attention(q, k, v, impl="naive", **kw),
        [q, k, v],
        1e-10,
    )


@pytest.mark.parametrize(
    "fn",
    [
        lambda q, k, v: A.softmax_attention(q, k, v, scale=0.5, impl="chunked", chunk_size=3),
        lambda q, k, v: A.softmax_attention(q, k, v, scale=0.5, impl="auto"),
        A.dot_product_attention,
        lambda q, k, v: A.concatenation_attention(q[..., 0], k[..., 0], v),
    ],
    ids=["softmax-chunked", "softmax-auto", "dot", "concat"],
)
def test_gradcheck(fn):
    q, k, v = _inputs((2, 7, 5, 4, 4), torch.float64)
    assert torch.autograd.gradcheck(fn, (q, k, v))


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces, and the ops' names."""

    def __init__(self):
        super().__init__()
        self.largest, self.ops = 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(str(func.overloadpacket))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("cv", [32, 16])
def test_softmax_never_materialises_affinity(cv):
    # N * M = 4M elements; the default path may only hold chunks of it, forward and backward.
    b, n, m, c = 1, 4096, 1024, 32
    q, k, v = _inputs((b, n, m, c, cv), torch.float32)
    with _LargestTensor() as mode:
        out = A.softmax_attention(q, k, v, scale=0.2)
        out.backward(torch.randn_like(out))
    assert mode.largest <= A.default_chunk_size(b, n, m) * m
    assert mode.largest < n * m / 3
    # for training the chunked forward, whose row maxima and sums the backward reuses; PyTorch's
    # fused CPU flash kernel (equal widths) only for inference, see test_softmax_float32_*
    assert not any("flash_attention" in op for op in mode.ops), mode.ops
    with torch.no_grad(), _LargestTensor() as mode:
        A.softmax_attention(q, k, v, scale=0.2)
    assert any("flash_attention" in op for op in mode.ops) == (cv == c), mode.ops
    assert mode.largest < n * m / 3


def test_dot_and_concat_never_materialise():
    b, n, m, c = 1, 3000, 2000, 8
    q, k, v = _inputs((b, n, m, c, c), torch.float32)
    with _LargestTensor() as mode:
        A.dot_product_attention(q, k, v).sum().backward()
        A.concatenation_attention(q[..., 0], k[..., 0], v).sum().backward()
    assert mode.largest < n * m / 100


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", A.MODES)
def test_autocast_large_logits_finite(dtype, mode):
    # Logits around 1e4 overflow float16 (max 65504) if formed in half precision, and saturate exp.
    q, k, v = _inputs((2, 50, 20, 16, 16), torch.float32, spread=30.0)
    w = torch.randn(32, requires_grad=True) * 30
    with torch.autocast("cpu", dtype=dtype):
        out = A.nonlocal_attention(
            q.to(dtype), k.to(dtype), v.to(dtype), mode=mode, scale=1.0, concat_weight=w.to(dtype)
        )
    assert out.dtype == dtype
    out.float().sum().backward()
    assert torch.isfinite(out).all()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize("kernel", ["chunked", "channel_first"])
def test_autocast_leaves_the_kernels_in_float32(kernel):
    # Under autocast the softmax kernels still form logits, maxima and sums in float32 (bfloat16
    # logits of 100 are off by units, and the backward recomputes them in float32): the result is
    # that of the same bfloat16 inputs in float32, rounded once.
    tensors = _inputs((2, 50, 20, 16, 16), torch.float32, grad=False, spread=3.0)
    if kernel == "chunked":
        fn = lambda q, k, v: A.softmax_attention(q, k, v, impl="chunked", chunk_size=16)
    else:
        fn = lambda *qkv: A.channel_first_softmax_attention(*(t.transpose(1, 2) for t in qkv)).transpose(1, 2)
    half = [t.to(torch.bfloat16).requires_grad_() for t in tensors]
    full = [t.detach().float().requires_grad_() for t in half]
    upstream = torch.randn(2, 50, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn(*half)
    grads = torch.autograd.grad((out.float() * upstream).sum(), half)
    expected = fn(*full)
    grads_expected = torch.autograd.grad((expected * upstream).sum(), full)
    # bfloat16 rounds to 4e-3: the output once (7e-4 here), the gradients also dO (6e-3); bfloat16
    # products gave 2e-2 and 0.25
    assert out.dtype == torch.bfloat16 and rel_err(out, expected) < 5e-3
    for g, ge in zip(grads, grads_expected):
        assert rel_err(g, ge) < 2e-2


@pytest.mark.parametrize("mode", A.MODES)
def test_attention_weights_are_rows_of_the_affinity(mode):
    q, k, _ = _inputs((2, 31, 17, 6, 6), torch.float64, grad=False)
    w = torch.randn(12, dtype=torch.float64)
    queries = torch.tensor([0, 5, 30])
    weights = A.attention_weights(q, k, queries, mode=mode, scale=0.4, concat_weight=w)
    logits = q @ k.transpose(1, 2)
    if mode in A.SOFTMAX_MODES:
        full = torch.softmax(logits * 0.4, -1)
    elif mode == "dot_product":
        full = logits / 17
    else:
        full = torch.relu((q @ w[:6])[:, :, None] + (k @ w[6:])[:, None, :]) / 17
    assert torch.allclose(weights, full[:, queries], rtol=1e-12, atol=1e-14)
    per_batch = A.attention_weights(q, k, torch.tensor([[1, 2], [3, 4]]), mode=mode, scale=0.4, concat_weight=w)
    assert torch.allclose(per_batch[1], full[1, [3, 4]], rtol=1e-12, atol=1e-14)


def test_bad_arguments_name_the_argument():
    q, k, v = _inputs((2, 5, 4, 3, 3), torch.float32, grad=False)
    with pytest.raises(ValueError, match="impl"):
        A.softmax_attention(q, k, v, impl="fast")
    with pytest.raises(ValueError, match="mode"):
        A.nonlocal_attention(q, k, v, mode="cosine")
    with pytest.raises(ValueError, match="k: expected 3 channels"):
        A.softmax_attention(q, k[..., :2], v)
    with pytest.raises(ValueError, match="q, k, v: expected 3-D"):
        A.dot_product_attention(q[0], k, v)
    with pytest.raises(ValueError, match="concat_weight"):
        A.nonlocal_attention(q, k, v, mode="concatenation")
    with pytest.raises(ValueError, match="queries"):
        A.attention_weights(q, k, [7])
    with pytest.raises(RuntimeError), pytest.warns(UserWarning):  # "sdpa" forbids the math backend
        A.softmax_attention(q, k, v[..., :2], impl="sdpa")
