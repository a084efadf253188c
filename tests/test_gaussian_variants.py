"""The Gaussian of Eq. 2 as the paper writes it: unscaled by default, and the Euclidean-distance
form exp(-|x_i - x_j|^2) it mentions, exact in every path against a direct computation."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from nonlocalnet import NonLocalBlock


def _direct(block: NonLocalBlock, x: torch.Tensor) -> torch.Tensor:
    """W_z y by the definition: softmax_j(-scale |x_i - x_j|^2) over the pooled keys of the
    affinity's group, g of the pooled x (spacetime, pool before the convs)."""
    b, c = x.shape[:2]
    keys = F.max_pool3d(x, block.pool_kernel) if block.subsample else x
    q, k = x.flatten(2).transpose(1, 2), keys.flatten(2).transpose(1, 2)  # (B, N, C), (B, M, C)
    logits = -block.scale * torch.cdist(q, k) ** 2
    g = block.g(keys).flatten(2).transpose(1, 2)  # (B, M, C')
    y = torch.softmax(logits, -1) @ g  # (B, N, C')
    return block.out(y.transpose(1, 2).reshape(b, -1, *x.shape[2:]))


def test_gaussian_is_unscaled_by_default_and_the_embedded_one_scaled():
    assert NonLocalBlock(64, mode="gaussian").scale == 1.0
    assert NonLocalBlock(64, mode="embedded_gaussian").scale == pytest.approx(32**-0.5)
    assert NonLocalBlock(64, mode="gaussian", scale=True).scale == pytest.approx(64**-0.5)  # the old default, asked for
    assert NonLocalBlock(64, mode="dot_product").scale == 1.0


@pytest.mark.parametrize("impl, fold", [("auto", None), ("auto", True), ("auto", False), ("naive", None),
                                        ("chunked", None), ("sdpa", True)])
def test_euclidean_gaussian_is_exact_in_every_path(impl, fold):
    torch.manual_seed(0)
    block = NonLocalBlock(16, mode="gaussian", distance="euclidean", scale=0.05, impl=impl, fold=fold).double()
    x = torch.randn(2, 16, 3, 6, 8, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(block.transform(x), _direct(block, x), atol=1e-10, rtol=1e-10)
    grad = torch.randn(2, 16, 3, 6, 8, dtype=torch.float64)
    (ours,) = torch.autograd.grad((block.transform(x) * grad).sum(), x)
    (direct,) = torch.autograd.grad((_direct(block, x) * grad).sum(), x)
    torch.testing.assert_close(ours, direct, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("affinity, impl", itertools.product(["space", "time"], ["auto", "naive"]))
def test_euclidean_gaussian_in_grouped_affinities_matches_naive(affinity, impl):
    torch.manual_seed(1)
    x = torch.randn(2, 8, 4, 6, 6, dtype=torch.float64)
    ref = NonLocalBlock(8, mode="gaussian", distance="euclidean", affinity=affinity, impl="naive").double()
    block = NonLocalBlock(8, mode="gaussian", distance="euclidean", affinity=affinity, impl=impl).double()
    block.load_state_dict(ref.state_dict())
    torch.testing.assert_close(block.transform(x), ref.transform(x), atol=1e-10, rtol=1e-10)
    plain = NonLocalBlock(8, mode="gaussian", affinity=affinity).double()
    plain.load_state_dict(ref.state_dict())
    assert not torch.allclose(plain.transform(x), ref.transform(x))  # another function than the dot form


def test_euclidean_attention_map_sums_to_one_and_prefers_near_keys():
    torch.manual_seed(2)
    block = NonLocalBlock(8, mode="gaussian", distance="euclidean", subsample=False).double()
    x = torch.randn(1, 8, 2, 4, 4, dtype=torch.float64)
    weights = block.attention_map(x, [5])  # (1, 1, M)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 1, dtype=torch.float64))
    assert int(weights.argmax()) == 5  # the query itself is at distance 0


def test_distance_errors():
    with pytest.raises(ValueError, match="distance: expected 'dot', or 'euclidean' with mode='gaussian'"):
        NonLocalBlock(8, mode="embedded_gaussian", distance="euclidean")
    with pytest.raises(ValueError, match="distance: expected"):
        NonLocalBlock(8, mode="gaussian", distance="cosine")


def test_kernel_weights_are_never_subnormal():
    """An unscaled Gaussian spreads logits over thousands: exp below e^-87 gives subnormal floats,
    on which every CPU product takes its slow path (30x at res3). They are flushed to 0."""
    from nonlocalnet.attention import _exp_less_max

    logits = torch.linspace(-200.0, 0.0, 4001).repeat(3, 1)  # (queries, keys)
    weights, _ = _exp_less_max(logits.clone(), None, -1)
    tiny = torch.finfo(torch.float32).tiny
    assert not ((weights != 0) & (weights < tiny)).any()
    torch.testing.assert_close(weights / weights.sum(-1, keepdim=True), torch.softmax(logits, -1), atol=2e-28,
                               rtol=1e-6)
