"""NonLocalBlock against an independent float64 reference of the paper's equations."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from conftest import rel_err
from nonlocalnet import NonLocalBlock
from nonlocalnet import block as block_module
from test_attention import LOGIT_SIZES, assert_as_accurate_as_naive, near_tied

SHAPES = {1: (2, 6, 11), 2: (2, 6, 7, 9), 3: (2, 6, 3, 7, 9)}  # odd sizes: pooling drops an edge


@pytest.fixture(autouse=True)
def _channel_first_at_every_size(monkeypatch):
    """The channel-first kernels serve clips of any size here (by default only clips of 2**17
    query-key pairs and more, which these tests' inputs are not); see test_small_clips_*."""
    monkeypatch.setattr(block_module, "_CHANNEL_FIRST_MIN_PAIRS", 0)
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
KERNEL = {1: (2,), 2: (2, 2), 3: (1, 2, 2)}


def _position_grid(shape):
    """(P, 3) (t, h, w) coordinates of a flattened (T, H, W) / (H, W) / (T,) grid, absent axes 0."""
    if len(shape) == 1:
        full = (shape[0], 1, 1)
    elif len(shape) == 2:
        full = (1, shape[0], shape[1])
    else:
        full = tuple(shape)
    grid = torch.stack(torch.meshgrid(*[torch.arange(s) for s in full], indexing="ij"), -1)
    return grid.reshape(-1, 3)


def reference_block(sd, x, *, mode, dims, subsample, scale, affinity, norm, eps=1e-5):
    """z = BN(W_z y) + x with y_i = 1/C(x) sum_j f(x_i, x_j) g(x_j), from the paper's §3.

    Written independently of the package: plain convolutions and max-pooling, the full pairwise
    matrix f, and the affinity (space / time / spacetime) as a mask over position pairs.
    """
    conv = lambda name, inp: CONV[dims](inp, sd[name + ".weight"], sd.get(name + ".bias"))
    kernel = KERNEL[dims]
    if subsample:
        src = POOL[dims](x, kernel, kernel, ceil_mode=(affinity == "time"))
    else:
        src = x
    theta = x if mode == "gaussian" else conv("theta", x)
    phi = src if mode == "gaussian" else conv("phi", src)
    g = conv("g", src)
    b = x.shape[0]
    theta, phi, g = theta.reshape(b, theta.shape[1], -1), phi.reshape(b, phi.shape[1], -1), g.reshape(b, g.shape[1], -1)
    # Which key j each query i may see (paper Table 2d).
    qpos, kpos = _position_grid(x.shape[2:]), _position_grid(src.shape[2:])
    k_t, k_h, k_w = {1: (kernel[0], 1, 1), 2: (1, *kernel), 3: kernel}[dims] if subsample else (1, 1, 1)
    if affinity == "spacetime" or (dims == 1) or (dims == 2):
        mask = torch.ones(len(qpos), len(kpos), dtype=torch.bool)
    elif affinity == "space":
        mask = qpos[:, None, 0] == kpos[None, :, 0]
    else:  # time: same (pooled) location
        mask = (qpos[:, None, 1] // k_h == kpos[None, :, 1]) & (qpos[:, None, 2] // k_w == kpos[None, :, 2])
    dot = torch.einsum("bci,bcj->bij", theta, phi)
    if mode in ("gaussian", "embedded_gaussian"):
        f = torch.exp(scale * dot - (scale * dot).masked_fill(~mask, -torch.inf).amax(-1, keepdim=True))
        f = f * mask
        f = f / f.sum(-1, keepdim=True)  # C(x) = sum_j f
    else:
        if mode == "dot_product":
            f = dot
        else:
            w = sd["concat.weight"].reshape(-1)
            c = theta.shape[1]
            f = torch.relu(
                torch.einsum("c,bci->bi", w[:c], theta)[:, :, None] + torch.einsum("c,bcj->bj", w[c:], phi)[:, None, :]
            )
        f = f * mask / mask.sum(-1, keepdim=True)  # C(x) = number of visible key positions
    y = torch.einsum("bij,bcj->bci", f, g).reshape(b, -1, *x.shape[2:])
    out = conv("out", y)
    if norm:
        view = (1, -1) + (1,) * dims
        out = (out - sd["norm.running_mean"].view(view)) / torch.sqrt(sd["norm.running_var"].view(view) + eps)
        out = out * sd["norm.weight"].view(view) + sd["norm.bias"].view(view)
    return out + x


def _randomise(block):
    """Random weights, biases and BN statistics (never the zero-initialised identity)."""
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "weight" in name else 0.1))
        if block.norm is not None:
            block.norm.running_mean.copy_(torch.randn_like(block.norm.running_mean) * 0.1)
            block.norm.running_var.copy_(torch.rand_like(block.norm.running_var) + 0.5)
    return block


def _configs():
    for mode, dims, subsample, scale, affinity, norm in itertools.product(
        ["gaussian", "embedded_gaussian", "dot_product", "concatenation"],
        [1, 2, 3],
        [True, False],
        [True, False],
        ["spacetime", "space", "time"],
        [True, False],
    ):
        if (affinity == "space" and dims == 1) or (affinity == "time" and dims == 2):
            continue
        if not scale and mode not in ("gaussian", "embedded_gaussian"):
            continue  # scale changes nothing there; True already covers it
        yield mode, dims, subsample, scale, affinity, norm


def _assert_values_and_input_grads_match(actual, expected, x, tol=1e-10):
    """Outputs, and gradients w.r.t. x under a random output weighting, agree to ``tol``."""
    assert rel_err(actual, expected) < tol
    weight = torch.randn_like(expected)
    (g_exp,) = torch.autograd.grad((expected * weight).sum(), x)
    (g_act,) = torch.autograd.grad((actual * weight).sum(), x)
    assert rel_err(g_act, g_exp) < tol


def _configs_and_impls():
    for config in _configs():
        folds = [False] if config[0] == "concatenation" else [False, True]
        for fold in folds:  # fold=True: projections folded into the attention (no-op for concatenation)
            yield (*config, "auto", fold)
        yield (*config, "naive", None)


@pytest.mark.parametrize("mode,dims,subsample,scale,affinity,norm,impl,fold", list(_configs_and_impls()))
def test_block_matches_independent_reference(mode, dims, subsample, scale, affinity, norm, impl, fold):
    block = _randomise(NonLocalBlock(6, 4, mode=mode, dims=dims, subsample=subsample, scale=scale,
                                     norm=norm, affinity=affinity, impl=impl, fold=fold)).double().eval()
    x = torch.randn(*SHAPES[dims], dtype=torch.float64, requires_grad=True)
    width = 6 if mode == "gaussian" else 4
    expected = reference_block(
        {k: v for k, v in block.state_dict().items()}, x, mode=mode, dims=dims, subsample=subsample,
        scale=width**-0.5 if scale else 1.0, affinity=affinity, norm=norm,
    )
    actual = block(x)
    _assert_values_and_input_grads_match(actual, expected, x)


def _fast_variants():
    for mode in ["gaussian", "embedded_gaussian", "dot_product", "concatenation"]:
        for affinity in ["spacetime", "space", "time"]:
            for fold in ([None] if mode == "concatenation" else [False, True]):
                yield mode, affinity, fold


@pytest.mark.parametrize("mode,affinity,fold", list(_fast_variants()))
def test_fast_equals_naive_parameter_gradients(mode, affinity, fold):
    torch.manual_seed(1)
    fast = _randomise(NonLocalBlock(8, mode=mode, affinity=affinity, fold=fold)).double().train()
    naive = NonLocalBlock(8, mode=mode, affinity=affinity, impl="naive").double().train()
    naive.load_state_dict(fast.state_dict())
    x = torch.randn(2, 8, 4, 6, 10, dtype=torch.float64)
    weight = torch.randn(2, 8, 4, 6, 10, dtype=torch.float64)
    (fast(x) * weight).sum().backward()
    (naive(x) * weight).sum().backward()
    flat = lambda m: torch.cat([p.grad.reshape(-1) for p in m.parameters()])
    assert rel_err(flat(fast), flat(naive)) < 1e-10
    # Per parameter against the overall scale: some gradients are exactly 0 in theory (the phi
    # bias under a softmax shifts every logit of a row equally) and only round-off remains.
    scale = flat(naive).norm()
    for (name, pf), (_, pn) in zip(fast.named_parameters(), naive.named_parameters()):
        assert (pf.grad - pn.grad).norm() <= 1e-10 * scale, name
    assert torch.allclose(fast.norm.running_mean, naive.norm.running_mean, rtol=1e-12, atol=1e-14)


def _float32_onednn_against_float64_naive(onednn, **options):
    """A block in float32 with every product through oneDNN and the same block in float64, naive:
    both run forward and backward on the same random input and upstream gradient. Returns
    (fast, naive, channel-first path taken); the outputs and input gradients agree to 1e-5."""
    fast = _randomise(NonLocalBlock(12, **options)).train()
    naive = NonLocalBlock(12, **dict(options, fold=None), impl="naive").double().train()
    naive.load_state_dict({k: v.double() for k, v in fast.state_dict().items()})
    x = torch.randn(2, 12, 4, 7, 9, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    weight = torch.randn(2, 12, 4, 7, 9, dtype=torch.float64)
    with onednn() as calls:
        out = fast(x)
        (out * weight.float()).sum().backward()
    assert calls.count > 0
    expected = naive(x64)
    (expected * weight).sum().backward()
    assert rel_err(out, expected) < 1e-5 and rel_err(x.grad, x64.grad) < 1e-5
    return fast, naive, fast._channel_first(x, fast._folds(x))


@pytest.mark.parametrize("mode", ["gaussian", "embedded_gaussian", "dot_product"])
@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("pool", ["before", "after"])
def test_float32_onednn_block_matches_float64_naive(onednn, mode, fold, pool):
    # The default CPU path (channel-first convs and attention, products through oneDNN) in float32,
    # values and every gradient, against the naive block in float64 with the same weights.
    torch.manual_seed(2)
    fast, naive, channel_first = _float32_onednn_against_float64_naive(onednn, mode=mode, fold=fold, pool=pool)
    assert channel_first
    # per parameter against the overall scale: the g bias's gradient is 0 in theory (BN removes
    # the constant it adds to each channel) and only round-off remains
    scale = torch.cat([p.grad.reshape(-1) for p in naive.parameters()]).norm()
    for (name, pf), (_, pn) in zip(fast.named_parameters(), naive.named_parameters()):
        assert (pf.grad.double() - pn.grad).norm() <= 1e-5 * scale, name


@pytest.mark.parametrize("mode,affinity", [("concatenation", "spacetime"), ("embedded_gaussian", "space"),
                                           ("dot_product", "time")])
def test_float32_onednn_token_paths_match_float64_naive(onednn, mode, affinity):
    # the token-layout convs (concatenation, space/time affinities) through oneDNN as well
    torch.manual_seed(3)
    _, _, channel_first = _float32_onednn_against_float64_naive(onednn, mode=mode, affinity=affinity)
    assert not channel_first


@pytest.mark.parametrize("positions", [17, 300])  # one batched convolution, or a product per clip
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_conv1x1_matches_conv1d(onednn, dtype, tol, positions):
    from nonlocalnet._ops import _conv1x1

    feats = torch.randn(3, 10, positions, dtype=dtype, requires_grad=True)
    weight = torch.randn(6, 10, dtype=dtype, requires_grad=True)
    bias = torch.randn(6, dtype=dtype, requires_grad=True)
    upstream = torch.randn(3, 6, positions, dtype=dtype)
    out = _conv1x1(feats, weight, bias)
    grads = torch.autograd.grad((out * upstream).sum(), (feats, weight, bias))
    expected = F.conv1d(feats.double(), weight.double()[:, :, None], bias.double())
    grads_expected = torch.autograd.grad((expected * upstream.double()).sum(), (feats, weight, bias))
    assert rel_err(out, expected) < tol
    for g, ge in zip(grads, grads_expected):
        assert rel_err(g, ge) < tol


@pytest.mark.parametrize("mode", ["gaussian", "embedded_gaussian"])
def test_small_clips_take_the_token_path_and_agree(monkeypatch, mode):
    monkeypatch.setattr(block_module, "_CHANNEL_FIRST_MIN_PAIRS", 1 << 17)
    fast = _randomise(NonLocalBlock(8, mode=mode, fold=False)).double().train()
    naive = NonLocalBlock(8, mode=mode, impl="naive").double().train()
    naive.load_state_dict(fast.state_dict())
    x = torch.randn(2, 8, 4, 6, 10, dtype=torch.float64, requires_grad=True)
    assert not fast._channel_first(x, False)  # 240 x 60 pairs per clip
    assert fast._channel_first(torch.randn(1, 8, 8, 32, 32), False)  # 8192 x 2048
    _assert_values_and_input_grads_match(fast(x), naive(x), x)


def _near_tied_block(mode, channels, logit, shape=(4, 6, 6), **options):
    """A float32 block with random weights and a float64 input (1, C, *shape) of near-tied positions
    (see :func:`test_attention.near_tied`) whose scaled logits are about ``logit`` within a cluster.
    The clusters are constant over the key max-pool's (1, 2, 2) windows, so that the pooled keys are
    near-tied too. For the embedded Gaussian phi shares theta's weights, so that theta_i . phi_j is
    large and near-tied where x_i and x_j are, as the Gaussian's x_i . x_j."""
    block = NonLocalBlock(channels, mode=mode, **options)
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.copy_(torch.randn_like(p) * (channels**-0.5 if "weight" in name else 0.1))
        if mode != "gaussian":
            block.phi.weight.copy_(block.theta.weight)
    cluster = torch.randint(4, (shape[0], shape[1] // 2, shape[2] // 2))
    cluster = cluster.repeat_interleave(2, 1).repeat_interleave(2, 2)  # (T, H, W)
    x = near_tied(cluster, channels, logit).permute(3, 0, 1, 2)[None]  # (1, C, T, H, W)
    tokens = x.flatten(2)[0].t()  # (N, C)
    if mode != "gaussian":
        tokens = tokens @ block.theta.weight.detach().flatten(1).double().t()
    size = (block.scale * tokens @ tokens.t()).amax(1).mean()  # each query's largest logit
    return block, x * (logit / size) ** 0.5


def _block_float32_errors(block, x, upstream):
    """Relative errors against float64 of block.transform (W_z y, the branch the attention feeds)
    run in float32: its value, its gradient with respect to x and with respect to the convs' weights
    and biases (the norm comes after the branch)."""
    errors, expected = [], None
    for dtype in (torch.float64, torch.float32):
        inp = x.to(dtype).requires_grad_()
        params = [p for name, p in block.to(dtype).named_parameters() if not name.startswith("norm.")]
        out = block.transform(inp)
        grads = torch.autograd.grad((out * upstream.to(dtype)).sum(), [inp] + params)
        result = [out, grads[0], torch.cat([g.flatten() for g in grads[1:]])]
        if expected is None:
            expected = result
        else:
            errors = [rel_err(a, e) for a, e in zip(result, expected)]
    return errors


def _softmax_paths():
    """(mode, affinity, fold, channel-first kernel) of every softmax path of the block on CPU."""
    for mode in ("gaussian", "embedded_gaussian"):
        yield mode, "spacetime", True, True
        yield mode, "spacetime", False, True
        yield mode, "spacetime", False, False  # a small clip: the token kernels
        for affinity in ("space", "time"):  # token kernels, folded in token layouts or not
            for fold in (False, True):
                yield mode, affinity, fold, False


@pytest.mark.parametrize("logit", LOGIT_SIZES)
@pytest.mark.parametrize("mode,affinity,fold,channel_first", list(_softmax_paths()))
def test_float32_large_logits_near_ties_as_accurate_as_naive(monkeypatch, logit, mode, affinity, fold,
                                                             channel_first):
    # Issue 18: at the Gaussian's logits of a real network (1e2-1e5 over 512-1024 channels) with
    # near-tied keys, every softmax path in float32 (values, input and parameter gradients, and
    # the inference forward) is within a small factor of the naive float32 block's own error.
    if not channel_first:
        monkeypatch.setattr(block_module, "_CHANNEL_FIRST_MIN_PAIRS", 1 << 17)
    channels = 1024 if (mode, affinity, fold) == ("gaussian", "spacetime", True) else 512
    fast, x = _near_tied_block(mode, channels, logit, affinity=affinity, fold=fold)
    naive = NonLocalBlock(channels, mode=mode, affinity=affinity, impl="naive")
    naive.load_state_dict(fast.state_dict())
    x32 = x.float()
    assert fast._channel_first(x32, fast._folds(x32)) == channel_first and fast._folds(x32) == fold
    x = x32.double()  # the float32 input exactly: only the computation's rounding counts
    upstream = torch.randn_like(x)
    fast_errors = _block_float32_errors(fast, x, upstream)
    naive_errors = _block_float32_errors(naive, x, upstream)
    assert_as_accurate_as_naive(fast_errors, naive_errors)
    with torch.no_grad():  # inference: PyTorch's flash kernel where the widths are equal
        expected = naive.double().transform(x)
        inference = rel_err(fast.float().transform(x32), expected)
    assert_as_accurate_as_naive([inference], naive_errors[:1])


def test_float32_fast_matches_float64_reference():
    block = _randomise(NonLocalBlock(16)).eval()
    x = torch.randn(2, 16, 4, 10, 12)
    sd64 = {k: v.double() for k, v in block.state_dict().items()}
    expected = reference_block(sd64, x.double(), mode="embedded_gaussian", dims=3, subsample=True,
                               scale=8**-0.5, affinity="spacetime", norm=True)
    assert rel_err(block(x), expected) < 1e-5


@pytest.mark.parametrize("mode", ["gaussian", "embedded_gaussian", "dot_product", "concatenation"])
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("norm", [True, False])
def test_identity_at_initialisation(mode, dims, norm):
    block = NonLocalBlock(8, mode=mode, dims=dims, norm=norm)
    x = torch.randn(*((3, 8) + SHAPES[dims][2:]))
    for train in (True, False):
        block.train(train)
        assert torch.equal(block(x), x)
    if norm:
        assert torch.all(block.norm.weight == 0) and torch.all(block.norm.bias == 0)
    else:
        assert torch.all(block.out.weight == 0) and torch.all(block.out.bias == 0)
    # ... but it is not dead: the zero-initialised layer receives a gradient.
    block.train()
    (block(x) * torch.randn_like(x)).sum().backward()
    last = block.norm.weight if norm else block.out.weight
    assert last.grad.abs().sum() > 0


def test_submodules_keys_and_initialisation():
    block = NonLocalBlock(64, mode="concatenation")
    keys = set(block.state_dict())
    for name in ("theta", "phi", "g", "out"):
        assert {f"{name}.weight", f"{name}.bias"} <= keys
    assert "concat.weight" in keys and "concat.bias" not in keys
    assert block.concat.weight.numel() == 2 * 32
    assert block.theta.weight.shape == (32, 64, 1, 1, 1) and block.out.weight.shape == (64, 32, 1, 1, 1)
    assert {"norm.weight", "norm.bias", "norm.running_mean", "norm.running_var"} <= keys
    for name in ("theta", "phi", "g"):
        w = getattr(block, name).weight
        assert abs(float(w.detach().std()) - 0.01) < 0.002 and torch.all(getattr(block, name).bias == 0)
    gauss = NonLocalBlock(64, mode="gaussian", dims=2)
    assert not hasattr(gauss, "theta") and not hasattr(gauss, "phi")
    assert gauss.g.weight.shape == (32, 64, 1, 1)
    assert NonLocalBlock(64, 16).inner_channels == 16


def test_scale_values():
    assert NonLocalBlock(64).scale == pytest.approx(32**-0.5)
    assert NonLocalBlock(64, mode="gaussian").scale == 1.0  # Eq. 2 is unscaled (issue 17)
    assert NonLocalBlock(64, mode="gaussian", scale=True).scale == pytest.approx(64**-0.5)
    assert NonLocalBlock(64, scale=False).scale == 1.0
    assert NonLocalBlock(64, scale=0.25).scale == 0.25
    assert NonLocalBlock(64, mode="dot_product").scale == 1.0


def test_subsampling_shapes():
    assert NonLocalBlock(8, dims=3).key_shape((1, 8, 4, 9, 10)) == (4, 4, 5)
    assert NonLocalBlock(8, dims=2).key_shape((1, 8, 9, 10)) == (4, 5)
    assert NonLocalBlock(8, dims=1).key_shape((1, 8, 9)) == (4,)
    assert NonLocalBlock(8, affinity="time").key_shape((1, 8, 4, 9, 10)) == (4, 5, 5)
    assert NonLocalBlock(8, subsample=False).key_shape((1, 8, 4, 9, 10)) == (4, 9, 10)


@pytest.mark.parametrize("affinity", ["spacetime", "space", "time"])
@pytest.mark.parametrize("mode", ["embedded_gaussian", "concatenation"])
def test_attention_map_matches_reference_rows(mode, affinity):
    block = _randomise(NonLocalBlock(6, 4, mode=mode, affinity=affinity)).double().eval()
    x = torch.randn(2, 6, 3, 5, 7, dtype=torch.float64)
    queries = torch.tensor([0, 17, 104])
    weights = block.attention_map(x, queries)
    keys = block.key_shape(x.shape)
    assert weights.shape == (2, 3, keys[0] * keys[1] * keys[2])
    # Independent check: the response of the reference block is linear in g, so f / C(x) equals
    # the output's sensitivity to each key's value; instead compare with the reference's matrix.
    sd = block.state_dict()
    src = F.max_pool3d(x, (1, 2, 2), (1, 2, 2), ceil_mode=(affinity == "time"))
    theta = F.conv3d(x, sd["theta.weight"], sd["theta.bias"]).flatten(2)
    phi = F.conv3d(src, sd["phi.weight"], sd["phi.bias"]).flatten(2)
    qpos, kpos = _position_grid(x.shape[2:]), _position_grid(src.shape[2:])
    if affinity == "spacetime":
        mask = torch.ones(len(qpos), len(kpos), dtype=torch.bool)
    elif affinity == "space":
        mask = qpos[:, None, 0] == kpos[None, :, 0]
    else:
        mask = (qpos[:, None, 1] // 2 == kpos[None, :, 1]) & (qpos[:, None, 2] // 2 == kpos[None, :, 2])
    if mode == "embedded_gaussian":
        logits = torch.einsum("bci,bcj->bij", theta, phi) * 0.5
        full = torch.softmax(logits.masked_fill(~mask, -torch.inf), -1)
    else:
        w = sd["concat.weight"].reshape(-1)
        f = torch.relu(torch.einsum("c,bci->bi", w[:4], theta)[:, :, None] + torch.einsum("c,bcj->bj", w[4:], phi)[:, None])
        full = f * mask / mask.sum(-1, keepdim=True)
    assert torch.allclose(weights, full[:, queries], rtol=1e-10, atol=1e-13)


BAD_ARGS = [
    (dict(in_channels=8, mode="cosine"), "mode"),
    (dict(in_channels=8, affinity="spacetimes"), "affinity"),
    (dict(in_channels=8, dims=4), "dims"),
    (dict(in_channels=8, inner_channels=0), "inner_channels"),
    (dict(in_channels=1), "inner_channels"),
    (dict(in_channels=0), "in_channels"),
    (dict(in_channels=8, impl="fast"), "impl"),
    (dict(in_channels=8, scale=-1.0), "scale"),
    (dict(in_channels=8, mode="dot_product", scale=0.5), "scale"),
    (dict(in_channels=8, dims=1, affinity="space"), "affinity"),
    (dict(in_channels=8, dims=2, affinity="time"), "affinity"),
    (dict(in_channels=8, dims=2, group_size=2), "group_size"),
    (dict(in_channels=8, group_size=0), "group_size"),
]


@pytest.mark.parametrize("kwargs,argument", BAD_ARGS)
def test_bad_constructor_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=rf"^{argument}: expected"):
        NonLocalBlock(**kwargs)


def test_bad_inputs_name_argument_expected_and_actual():
    block = NonLocalBlock(8)
    with pytest.raises(ValueError, match=r"x: expected 8 channels \(dim 1\), got 6"):
        block(torch.randn(1, 6, 2, 4, 4))
    with pytest.raises(ValueError, match=r"x: expected a 5-D input \(B, C, T, H, W\) for dims=3, got 4-D"):
        block(torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match=r"too small to subsample by \(1, 2, 2\)"):
        block(torch.randn(1, 8, 2, 1, 4))
    NonLocalBlock(8, subsample=False)(torch.randn(1, 8, 2, 1, 1))  # fine without subsampling
    with pytest.raises(ValueError, match=r"x: expected a 3-D input \(B, C, T\)"):
        NonLocalBlock(8, dims=1)(torch.randn(1, 8, 4, 4))


@pytest.mark.parametrize("mode", ["embedded_gaussian", "dot_product"])
@pytest.mark.parametrize("impl", ["auto", "naive"])
def test_time_groups_attend_within_each_group(mode, impl):
    """group_size (official add_nonlocal_group): each group of frames is a clip of its own."""
    block = _randomise(NonLocalBlock(6, 4, mode=mode, group_size=2, impl=impl)).double().eval()
    x = torch.randn(2, 6, 6, 5, 7, dtype=torch.float64, requires_grad=True)
    sd = block.state_dict()
    expected = torch.cat([
        reference_block(sd, x[:, :, t : t + 2], mode=mode, dims=3, subsample=True, scale=0.5,
                        affinity="spacetime", norm=True)
        for t in (0, 2, 4)
    ], 2)
    actual = block(x)
    _assert_values_and_input_grads_match(actual, expected, x)
    block.group_size = None
    whole = block(x)
    assert rel_err(whole, expected) > 1e-3  # the groups do change the result
    block.group_size = 6
    assert torch.equal(block(x), whole)  # T <= group_size: one group
    block.group_size = 4
    with pytest.raises(ValueError, match=r"x: expected a number of frames \(dim 2\) divisible by group_size=4"):
        block(x)


@pytest.mark.parametrize("edge", [0, 1])  # windows that tile x (no element left out), or an odd edge
@pytest.mark.parametrize("kernel", [(1, 2, 2), (2, 2), (2,), (2, 3, 2)])
def test_window_max_matches_max_pool_with_ties(kernel, edge):
    from nonlocalnet._ops import _WindowMax

    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[len(kernel)]
    # ReLU-like inputs rounded to a coarse grid: most windows hold tied maxima (often zeros).
    shape = (2, 3) + tuple(2 * k + (edge if k > 1 else 0) for k in kernel)
    x = torch.relu(torch.randn(shape, dtype=torch.float64)).mul(2).round().div(2).requires_grad_()
    expected = pool(x, kernel, kernel)
    actual = _WindowMax.apply(x, kernel)
    assert torch.equal(actual, expected)
    grad = torch.randn_like(expected)
    (g_exp,) = torch.autograd.grad(expected, x, grad)
    (g_act,) = torch.autograd.grad(actual, x, grad)
    assert torch.equal(g_act, g_exp)  # the first maximum of each window takes the gradient


def test_fold_is_chosen_where_it_saves_work():
    x5 = torch.randn(1, 2048, 4, 7, 7)  # res5: 1x1 convs over N positions dominate
    x3 = torch.randn(1, 512, 4, 28, 28)  # res3: the attention dominates
    assert NonLocalBlock(2048)._folds(x5) and not NonLocalBlock(512)._folds(x3)
    x4 = torch.randn(2, 1024, 8, 14, 14)  # res4: the fold saves about a quarter of the work
    assert NonLocalBlock(1024)._folds(x4) and NonLocalBlock(1024, mode="gaussian")._folds(x4)
    assert not NonLocalBlock(1024)._folds(torch.randn(2, 1024, 16, 14, 14))  # twice the pairs: no
    assert not NonLocalBlock(2048, impl="naive")._folds(x5)
    assert not NonLocalBlock(2048, mode="concatenation", fold=True)._folds(x5)
    assert not NonLocalBlock(512, mode="dot_product", affinity="space", fold=True)._folds(x3)
    x2 = torch.randn(1, 256, 4, 56, 56)  # res2: the dot product's C x C map beats three convs
    assert NonLocalBlock(256, mode="dot_product")._folds(x2)
    assert not NonLocalBlock(1024, mode="dot_product")._folds(torch.randn(1, 1024, 4, 14, 14))
    assert NonLocalBlock(512, fold=True)._folds(x3) and not NonLocalBlock(2048, fold=False)._folds(x5)
    with pytest.raises(ValueError, match="fold: expected None, True or False, got 'yes'"):
        NonLocalBlock(8, fold="yes")
