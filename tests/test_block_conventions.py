"""The block's options for other implementations' conventions: the max-pool after the phi / g
convs (mmcv), any pooling kernel, group and layer norms; exact against hand computations."""

import pytest
import torch
import torch.nn.functional as F

from conftest import rel_err
from nonlocalnet import NonLocalBlock
from nonlocalnet.bench import randomize_

MODES = ["gaussian", "embedded_gaussian", "dot_product", "concatenation"]


def by_hand(block, x):
    """W_z y + b_z of the block from its definition, convs applied before the max-pool."""
    def conv(module, t):
        return torch.einsum("oc,bc...->bo...", module.weight.flatten(1), t) + module.bias.view(1, -1, *[1] * (t.dim() - 2))

    def pool(t):
        return F.max_pool3d(t, block.pool_kernel, block.pool_kernel)

    g = pool(conv(block.g, x)).flatten(2)  # (B, C', M)
    if block.mode == "gaussian":
        q, k = x.flatten(2), pool(x).flatten(2)
    else:
        q, k = conv(block.theta, x).flatten(2), pool(conv(block.phi, x)).flatten(2)
    if block.mode in ("gaussian", "embedded_gaussian"):
        weights = torch.softmax(block.scale * torch.einsum("bcn,bcm->bnm", q, k), -1)
    elif block.mode == "dot_product":
        weights = torch.einsum("bcn,bcm->bnm", q, k) / k.shape[-1]
    else:
        w = block.concat.weight.flatten()
        half = w.numel() // 2
        a = torch.einsum("c,bcn->bn", w[:half], q)
        b = torch.einsum("c,bcm->bm", w[half:], k)
        weights = torch.relu(a[:, :, None] + b[:, None, :]) / k.shape[-1]
    y = torch.einsum("bnm,bcm->bcn", weights, g).view(x.shape[0], -1, *x.shape[2:])
    return conv(block.out, y)


@pytest.mark.parametrize("impl", ["auto", "naive"])
@pytest.mark.parametrize("mode", MODES)
def test_pooling_after_the_convs_matches_the_definition(mode, impl):
    block = randomize_(NonLocalBlock(8, mode=mode, pool="after", impl=impl, norm=False)).double()
    torch.nn.init.normal_(block.out.weight)
    x = torch.randn(2, 8, 3, 7, 9, dtype=torch.float64, requires_grad=True)
    assert rel_err(block.transform(x), by_hand(block, x)) < 1e-10
    if mode != "gaussian":  # a different function from pooling first
        before = NonLocalBlock(8, mode=mode, impl=impl, norm=False).double()
        before.load_state_dict(block.state_dict())
        assert rel_err(before.transform(x), block.transform(x)) > 1e-3
    fast = NonLocalBlock(8, mode=mode, pool="after", norm=False).double()
    fast.load_state_dict(block.state_dict())
    grad = torch.randn(2, 8, 3, 7, 9, dtype=torch.float64)
    (expected,) = torch.autograd.grad(by_hand(block, x), x, grad)
    (got,) = torch.autograd.grad(fast.transform(x), x, grad)
    assert rel_err(got, expected) < 1e-10


@pytest.mark.parametrize("mode", MODES)
def test_forced_folding_never_applies_to_pooling_after_the_convs(mode):
    # the folds rewrite convs of the pooled x, the values' conv too (gaussian included)
    block = randomize_(NonLocalBlock(8, mode=mode, pool="after", fold=True, norm=False)).double()
    torch.nn.init.normal_(block.out.weight)
    x = torch.randn(1, 8, 3, 6, 8, dtype=torch.float64)
    assert not block._folds(x)
    assert rel_err(block.transform(x), by_hand(block, x)) < 1e-10


@pytest.mark.parametrize("pool", ["before", "after"])
@pytest.mark.parametrize("kernel", [(2, 2, 2), (1, 3, 3), (2, 1, 1)])
def test_any_pooling_kernel(kernel, pool):
    block = randomize_(NonLocalBlock(8, pool_kernel=kernel, pool=pool, norm=False)).double()
    x = torch.randn(1, 8, 5, 7, 8, dtype=torch.float64)
    assert block.key_shape(x.shape) == tuple(s // k for s, k in zip(x.shape[2:], kernel))
    naive = NonLocalBlock(8, pool_kernel=kernel, pool=pool, norm=False, impl="naive").double()
    naive.load_state_dict(block.state_dict())
    assert rel_err(block.transform(x), naive.transform(x)) < 1e-10
    if pool == "after":
        assert rel_err(block.transform(x), by_hand(block, x)) < 1e-10


@pytest.mark.parametrize("norm, kind", [("group", torch.nn.GroupNorm), ("layer", torch.nn.GroupNorm),
                                        ("batch", torch.nn.BatchNorm3d), (True, torch.nn.BatchNorm3d)])
def test_norms_start_as_the_identity_and_normalise(norm, kind):
    block = NonLocalBlock(16, norm=norm, norm_groups=4)
    assert isinstance(block.norm, kind) and not torch.count_nonzero(block.norm.weight)
    if norm == "layer":
        assert block.norm.num_groups == 1
    if norm == "group":
        assert block.norm.num_groups == 4
    x = torch.randn(2, 16, 2, 6, 6)
    assert torch.equal(block(x), x)
    randomize_(block)
    torch.nn.init.ones_(block.norm.weight)
    torch.nn.init.zeros_(block.norm.bias)
    block.train()
    z = block(x) - x  # the normalised branch: zero mean, unit variance per group of every clip
    if norm in ("group", "layer"):
        groups = z.reshape(2, block.norm.num_groups, -1)
        assert groups.mean(-1).abs().max() < 1e-4 and (groups.var(-1, unbiased=False) - 1).abs().max() < 1e-2


def test_bad_conventions_are_named():
    with pytest.raises(ValueError, match="pool: expected 'before' or 'after'"):
        NonLocalBlock(8, pool="inside")
    with pytest.raises(ValueError, match=r"pool_kernel: expected 3 positive ints \(one per dim\), got \(2, 2\)"):
        NonLocalBlock(8, pool_kernel=(2, 2))
    with pytest.raises(ValueError, match="pool_kernel: a kernel other than .* needs affinity='spacetime'"):
        NonLocalBlock(8, pool_kernel=(2, 2, 2), affinity="space")
    with pytest.raises(ValueError, match="norm: expected True, False, 'batch', 'group', 'layer' or 'none', got 'instance'"):
        NonLocalBlock(8, norm="instance")
    with pytest.raises(ValueError, match="norm_groups: expected a positive divisor of in_channels=8, got 3"):
        NonLocalBlock(8, norm="group", norm_groups=3)
    assert "pool='after'" in repr(NonLocalBlock(8, pool="after"))
