"""NonLocalBlock.from_peer against the real peer code: random weights and BN statistics, eval
mode, the same outputs for every mode and dimension each peer supports."""

import pytest
import torch

from nonlocalnet import NonLocalBlock

MODES = ["gaussian", "embedded_gaussian", "dot_product", "concatenation"]


def randomize(module):
    """Random weights, biases and norm statistics everywhere (peers zero-initialise some)."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point():
                values = torch.randn(tensor.shape, generator=generator) * 0.3
                if name.endswith("running_var"):
                    values = values.abs() + 0.5
                tensor.copy_(values)
    return module.eval()


def same(peer, x):
    block = NonLocalBlock.from_peer(peer)
    assert isinstance(block, NonLocalBlock) and not block.training
    with torch.no_grad():
        expected, got = peer(x), block(x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max().item()), (got - expected).abs().max()
    return block


@pytest.mark.parametrize("pool_size", [(1, 1, 1), (1, 2, 2), (2, 2, 2)])
@pytest.mark.parametrize("instantiation", ["softmax", "dot_product"])
def test_pytorchvideo(instantiation, pool_size):
    nonlocal_net = pytest.importorskip("pytorchvideo.layers.nonlocal_net")
    peer = randomize(nonlocal_net.create_nonlocal(dim_in=16, dim_inner=8, pool_size=pool_size,
                                                  instantiation=instantiation))
    block = same(peer, torch.randn(2, 16, 4, 6, 7))
    assert block.pool == "before" and block.pool_kernel == (None if pool_size == (1, 1, 1) else pool_size)


@pytest.mark.parametrize("norm", [None, "BN", "GN"])
@pytest.mark.parametrize("sub_sample", [False, True])
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("mode", MODES)
def test_mmcv(mode, dims, sub_sample, norm):
    non_local = pytest.importorskip("mmcv.cnn.bricks.non_local")
    cls = {1: non_local.NonLocal1d, 2: non_local.NonLocal2d, 3: non_local.NonLocal3d}[dims]
    norm_cfg = {None: None, "BN": {"type": f"BN{dims}d" if dims > 1 else "BN1d"}, "GN": {"type": "GN", "num_groups": 4}}[norm]
    peer = randomize(cls(16, mode=mode, sub_sample=sub_sample, norm_cfg=norm_cfg))
    shape = {1: (2, 16, 9), 2: (2, 16, 6, 7), 3: (2, 16, 3, 6, 7)}[dims]
    block = same(peer, torch.randn(*shape))
    assert block.pool == "after" and block.mode == mode


@pytest.mark.parametrize("use_scale", [True, False])
def test_mmcv_embedded_gaussian_scale(use_scale):
    non_local = pytest.importorskip("mmcv.cnn.bricks.non_local")
    block = same(randomize(non_local.NonLocal2d(16, use_scale=use_scale)), torch.randn(2, 16, 5, 6))
    assert block.scale == pytest.approx(8 ** -0.5 if use_scale else 1.0)


@pytest.mark.parametrize("use_scale", [True, False])
def test_timm(use_scale):
    non_local_attn = pytest.importorskip("timm.layers.non_local_attn")
    peer = randomize(non_local_attn.NonLocalAttn(64, use_scale=use_scale))
    block = same(peer, torch.randn(2, 64, 5, 6))
    assert block.inner_channels == 8 and block.scale == pytest.approx(64 ** -0.5 if use_scale else 1.0)


def test_configurations_no_block_expresses():
    with pytest.raises(ValueError, match="module: expected a pytorchvideo NonLocal, an mmcv NonLocal1d/2d/3d or a timm"):
        NonLocalBlock.from_peer(torch.nn.Conv2d(3, 3, 1))
    non_local_attn = pytest.importorskip("timm.layers.non_local_attn")
    with pytest.raises(ValueError, match="BatNonLocalAttn"):
        NonLocalBlock.from_peer(non_local_attn.BatNonLocalAttn(16))
    non_local = pytest.importorskip("mmcv.cnn.bricks.non_local")
    with pytest.raises(ValueError, match="conv_out's norm is LayerNorm"):
        NonLocalBlock.from_peer(non_local.NonLocal2d(16, norm_cfg={"type": "LN"}))


def test_training_mode_and_gradients_follow():
    non_local = pytest.importorskip("mmcv.cnn.bricks.non_local")
    peer = randomize(non_local.NonLocal3d(16, sub_sample=True, norm_cfg={"type": "BN3d"})).train()
    block = NonLocalBlock.from_peer(peer)
    assert block.training
    x = torch.randn(2, 16, 3, 6, 7, requires_grad=True)
    (expected,) = torch.autograd.grad(peer(x).square().sum(), x)
    (got,) = torch.autograd.grad(block(x).square().sum(), x)
    assert (got - expected).abs().max() < 1e-4 * expected.abs().max()
