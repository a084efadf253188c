"""ResNet3d against the official architecture: parameter counts, map sizes, NL placement."""

import pytest
import torch

from nonlocalnet import NonLocalBlock
from nonlocalnet.bench import randomize_
from nonlocalnet.models import ResNet3d

R50_NL5 = {"res3": (1, 3), "res4": (1, 3, 5)}
R101_NL5 = {"res3": (1, 3), "res4": (6, 13, 20)}


def _weights_in_millions(model):
    """The official counter's convention: conv and FC weights only, no BN, no biases."""
    return round(sum(p.numel() for p in model.parameters() if p.dim() > 1) / 1e6, 2)


@pytest.mark.parametrize(
    "kwargs, millions",  # by hand, official convention (R101 C2D: the paper's 43.2M; docs/paper.md §6)
    [
        (dict(depth=50), 24.27),
        (dict(depth=50, inflation="3x1x1"), 27.99),
        (dict(depth=50, nonlocal_blocks={"res4": (4,)}), 26.37),
        (dict(depth=50, nonlocal_blocks=R50_NL5), 31.61),
        (dict(depth=50, nonlocal_blocks={"res3": range(4), "res4": range(6)}), 38.95),
        (dict(depth=50, inflation="3x1x1", nonlocal_blocks=R50_NL5), 35.33),
        (dict(depth=101), 43.21),
        (dict(depth=101, nonlocal_blocks=R101_NL5), 50.55),
        (dict(depth=101, inflation="3x1x1"), 51.65),
        (dict(depth=101, inflation="3x3x3"), 62.94),
        (dict(depth=101, inflation="3x1x1", nonlocal_blocks=R101_NL5), 58.99),
    ],
)
def test_parameter_counts_match_the_official_models(kwargs, millions):
    with torch.device("meta"):
        model = ResNet3d(**kwargs)
    assert _weights_in_millions(model) == millions


@pytest.mark.parametrize("stem, frames", [("32x2", 32), ("8x8", 8)])
def test_feature_map_sizes_follow_the_official_code(stem, frames):
    with torch.device("meta"):
        model = ResNet3d(depth=50, inflation="3x1x1", stem=stem)
    sizes = {}
    for name in ("res2", "pool2", "res3", "res4", "res5"):
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: sizes.update({name: tuple(o.shape[1:])}))
    out = model(torch.empty(2, 3, frames, 224, 224, device="meta"))
    assert tuple(out.shape) == (2, 400)
    assert sizes == {
        "res2": (256, 8, 55, 55), "pool2": (256, 4, 55, 55), "res3": (512, 4, 28, 28),
        "res4": (1024, 4, 14, 14), "res5": (2048, 4, 7, 7),
    }


def test_paper_stem_gives_every_stage_shape_of_table_1():
    with torch.device("meta"):
        model = ResNet3d(depth=50, stem="paper")
    sizes = {}
    for name in ("conv1", "pool1", "res2", "pool2", "res3", "res4", "res5"):
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: sizes.update({name: tuple(o.shape[1:])}))
    assert tuple(model(torch.empty(1, 3, 32, 224, 224, device="meta")).shape) == (1, 400)
    assert sizes == {  # Table 1: (channels, T, H, W) of a 32 x 224 x 224 clip
        "conv1": (64, 16, 112, 112), "pool1": (64, 8, 56, 56), "res2": (256, 8, 56, 56), "pool2": (256, 4, 56, 56),
        "res3": (512, 4, 28, 28), "res4": (1024, 4, 14, 14), "res5": (2048, 4, 7, 7),
    }
    assert model.pool1.kernel_size == (3, 3, 3) and model.pool2.kernel_size == (3, 1, 1)
    assert model.pool1.stride == (2, 2, 2) and model.pool2.stride == (2, 1, 1)
    with torch.device("meta"):  # the same parameters as the official stem: its weights load unchanged
        official = ResNet3d(depth=50, stem="32x2")
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in official.state_dict().items()}


@pytest.mark.parametrize("depth, inflated", [(50, 9), (101, 18)])
def test_i3d_inflates_every_other_block(depth, inflated):
    with torch.device("meta"):
        a = ResNet3d(depth=depth, inflation="3x1x1")
        b = ResNet3d(depth=depth, inflation="3x3x3")
    assert a.conv1.kernel_size == b.conv1.kernel_size == (5, 7, 7)
    blocks_a = [blk for name in ("res2", "res3", "res4", "res5") for blk in getattr(a, name)]
    blocks_b = [blk for name in ("res2", "res3", "res4", "res5") for blk in getattr(b, name)]
    assert sum(blk.branch2a.kernel_size == (3, 1, 1) for blk in blocks_a) == inflated
    assert sum(blk.branch2b.kernel_size == (3, 3, 3) for blk in blocks_b) == inflated
    assert all(blk.branch2b.kernel_size == (1, 3, 3) for blk in blocks_a)
    assert [blk.branch2a.kernel_size[0] for blk in a.res5] == [1, 3, 1]


def test_nonlocal_blocks_sit_after_the_named_residual_blocks():
    model = ResNet3d(depth=50, nonlocal_blocks=R50_NL5, nonlocal_options={"mode": "dot_product"})
    keys = {k.split(".nonlocal_block.")[0] for k in model.state_dict() if ".nonlocal_block." in k}
    assert keys == {"res3.1", "res3.3", "res4.1", "res4.3", "res4.5"}
    block = model.res4[5].nonlocal_block
    assert isinstance(block, NonLocalBlock) and block.in_channels == 1024 and block.mode == "dot_product"
    assert model.res3[1].nonlocal_block.in_channels == 512


def test_nonlocal_model_equals_its_baseline_at_initialisation():
    torch.manual_seed(0)
    baseline = ResNet3d(depth=50, stem="8x8", num_classes=7, zero_init_residual=False).eval()
    nl = ResNet3d(depth=50, stem="8x8", num_classes=7, zero_init_residual=False, nonlocal_blocks=R50_NL5).eval()
    missing = nl.load_state_dict(baseline.state_dict(), strict=False).missing_keys
    assert missing and all(".nonlocal_block." in k for k in missing)
    x = torch.randn(1, 3, 8, 64, 64)
    with torch.no_grad():
        assert torch.allclose(nl(x), baseline(x), rtol=0, atol=1e-6)
        for name in R50_NL5:
            for i in R50_NL5[name]:
                randomize_(getattr(nl, name)[i].nonlocal_block)
        assert not torch.allclose(nl(x), baseline(x), atol=1e-3)


@pytest.mark.parametrize("shape", [(2, 3, 8, 64, 64), (1, 3, 16, 96, 80), (1, 3, 4, 33, 47)])
def test_fully_convolutional_and_trainable(shape):
    torch.manual_seed(0)
    model = ResNet3d(depth=50, inflation="3x1x1", stem="8x8", num_classes=5, zero_init_residual=False,
                     nonlocal_blocks={"res4": (4,)}, nonlocal_options={"subsample": shape[-1] >= 64})
    randomize_(model.res4[4].nonlocal_block)
    out = model(torch.randn(shape))
    assert out.shape == (shape[0], 5) and torch.isfinite(out).all()
    out.square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.res4[4].nonlocal_block.theta.weight.grad.abs().sum() > 0


def test_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="depth: expected one of"):
        ResNet3d(depth=34)
    with pytest.raises(ValueError, match="inflation: expected one of"):
        ResNet3d(inflation="2x1x1")
    with pytest.raises(ValueError, match="stem: expected one of"):
        ResNet3d(stem="16x4")
    with pytest.raises(ValueError, match="nonlocal_blocks: expected stage names"):
        ResNet3d(nonlocal_blocks={"res6": (0,)})
    with pytest.raises(ValueError, match=r"nonlocal_blocks\['res4'\]: expected block indices in 0..5 for res4 of 6 blocks, got \[6\]"):
        ResNet3d(nonlocal_blocks={"res4": (6,)})
    with pytest.raises(TypeError):
        ResNet3d(nonlocal_blocks={"res4": (1,)}, nonlocal_options={"modee": "dot_product"})
    model = ResNet3d(stem="8x8", num_classes=3)
    with pytest.raises(ValueError, match=r"x: expected a clip batch \(B, 3, T, H, W\), got shape \(2, 3, 64, 64\)"):
        model(torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match="got shape"):
        model(torch.randn(1, 1, 8, 64, 64))


def _report(input_shape=(1, 3, 32, 224, 224), **kwargs):
    from nonlocalnet.flops import model_report

    with torch.device("meta"):
        model = ResNet3d(**kwargs)
    return model_report(model, input_shape)


@pytest.mark.parametrize(
    "kwargs, gmacs",  # by hand: multiply-adds at 32 x 224^2 in the official convention
    [
        (dict(depth=50), 20.23),
        (dict(depth=50, nonlocal_blocks={"res4": (4,)}), 21.42),
        (dict(depth=50, nonlocal_blocks=R50_NL5), 28.36),
        (dict(depth=50, inflation="3x1x1", nonlocal_blocks=R50_NL5), 40.96),
        (dict(depth=101), 35.08),
        (dict(depth=101, inflation="3x3x3"), 61.86),
        (dict(depth=101, inflation="3x1x1", nonlocal_blocks=R101_NL5), 59.51),
    ],
)
def test_flops_match_the_official_counting(kwargs, gmacs):
    rows = _report(**kwargs)
    total = rows[-1]
    assert total.name == "total" and round(total.flops / 2e9, 2) == gmacs
    assert sum(r.flops for r in rows[:-1]) == total.flops  # every FLOP belongs to a stage
    assert total.weights == sum(r.weights for r in rows[:-1]) < total.params


def test_flops_ratios_match_table_2e():
    c2d, nl_c2d, i3d = (_report(depth=101, **kw)[-1] for kw in ({}, {"nonlocal_blocks": R101_NL5}, {"inflation": "3x1x1"}))
    # Paper, R101 vs C2D: NL C2D 1.2x params and 1.2x FLOPs; I3D 1.2x params and 1.5x FLOPs.
    assert round(nl_c2d.weights / c2d.weights, 1) == 1.2 and round(nl_c2d.flops / c2d.flops, 1) == 1.2
    assert round(i3d.weights / c2d.weights, 1) == 1.2 and round(i3d.flops / c2d.flops, 1) == 1.5
    assert round(c2d.weights / 1e6, 1) == 43.2


def test_flops_ignore_how_the_blocks_run():
    from nonlocalnet.flops import model_report

    model = ResNet3d(depth=50, stem="8x8", nonlocal_blocks={"res4": (1, 3)}, nonlocal_options={"fold": True})
    folded = model_report(model, (1, 3, 8, 224, 224))[-1].flops
    for i in (1, 3):
        model.res4[i].nonlocal_block.fold = False
    assert model_report(model, (1, 3, 8, 224, 224))[-1].flops == folded
    assert model.res4[1].nonlocal_block.impl == "auto"  # the report changed only its own copy


def test_frozen_bn_models_keep_the_names_and_drop_the_statistics():
    with torch.device("meta"):
        bn = ResNet3d(depth=50, inflation="3x1x1", nonlocal_blocks=R50_NL5)
        frozen = ResNet3d(depth=50, inflation="3x1x1", nonlocal_blocks=R50_NL5, frozen_bn=True,
                          nonlocal_options={"norm": False}, nonlocal_stage_options={"res3": {"group_size": 4}})
    stats = ("running_mean", "running_var", "num_batches_tracked")
    expected = {k for k in bn.state_dict() if not k.endswith(stats) and ".nonlocal_block.norm." not in k}
    assert set(frozen.state_dict()) == expected
    assert frozen.res3[1].nonlocal_block.group_size == 4 and frozen.res4[1].nonlocal_block.group_size is None
    assert bn.res2[0].branch2a_bn.eps == bn.res4[1].nonlocal_block.norm.eps == 1.0000001e-5  # official BN_EPSILON
    affine = frozen.res2[0].branch2a_bn
    affine.to_empty(device="cpu")
    torch.nn.init.normal_(affine.weight), torch.nn.init.normal_(affine.bias)
    x = torch.randn(2, 64, 3, 4, 5)
    assert torch.allclose(affine(x), x * affine.weight.view(1, -1, 1, 1, 1) + affine.bias.view(1, -1, 1, 1, 1))
    with pytest.raises(ValueError, match="nonlocal_stage_options: expected stage names"):
        ResNet3d(nonlocal_stage_options={"layer3": {}})


def test_reset_parameters_restores_the_official_initialisation():
    model = ResNet3d(depth=50, stem="8x8", nonlocal_blocks={"res4": (4,)})
    randomize_(model)
    model.reset_parameters()
    block = model.res4[4].nonlocal_block
    assert block.norm.weight.abs().sum() == 0 and 0.005 < block.theta.weight.std() < 0.015  # N(0, 0.01^2)
    assert model.res4[4].branch2c_bn.weight.abs().sum() == 0 and model.res4[4].branch2a_bn.weight.eq(1).all()
    fan_out = 256 * 3 * 3
    assert abs(model.res4[4].branch2b.weight.std() - (2 / fan_out) ** 0.5) < 2e-3


@pytest.mark.parametrize(
    "depth, preset, expected",  # Table 2b: "right before the last residual block of a stage"
    [(50, "res2", {"res2": (1,)}), (50, "res3", {"res3": (2,)}), (50, "res4", {"res4": (4,)}), (50, "res5", {"res5": (1,)}),
     (101, "res4", {"res4": (21,)}), (101, "nl1", {"res4": (21,)}), (50, "nl5", R50_NL5), (101, "nl5", R101_NL5),
     (101, "nl10", {"res3": (0, 1, 2, 3), "res4": (3, 7, 11, 15, 19, 22)})],
)
def test_nonlocal_presets(depth, preset, expected):
    with torch.device("meta"):
        model = ResNet3d(depth=depth, nonlocal_blocks=preset)
    found = {}
    for stage in ("res2", "res3", "res4", "res5"):
        indices = tuple(i for i, b in enumerate(getattr(model, stage)) if b.nonlocal_block is not None)
        if indices:
            found[stage] = indices
            assert {b.nonlocal_block.in_channels for b in getattr(model, stage) if b.nonlocal_block} == {
                getattr(model, stage)[0].branch2c.out_channels}
    assert found == expected
    last = {"res2": 2, "res3": 3, "res4": 5 if depth == 50 else 22, "res5": 2}
    if preset.startswith("res"):  # right before the stage's last residual block
        assert found[preset] == (last[preset] - 1,)
    with pytest.raises(ValueError, match="nonlocal_blocks: expected a mapping or a preset from"):
        ResNet3d(nonlocal_blocks="nl3")


def test_dense_test_head_follows_the_official_fully_convolutional_test():
    torch.manual_seed(0)
    model = ResNet3d(depth=50, stem="8x8", num_classes=6, zero_init_residual=False).eval()
    with torch.no_grad():
        x = torch.randn(1, 3, 2, 224, 224)
        scale = model.forward_features(x).mean((2, 3, 4)).norm()
        torch.nn.init.normal_(model.pred.weight, std=3 / scale), torch.nn.init.normal_(model.pred.bias)  # logits ~ 3
        dense = model.forward_dense(x)
        assert dense.shape == (1, 6, 1, 1, 1) and torch.allclose(dense.flatten(1), model(x), atol=1e-5)
        x = torch.randn(2, 3, 2, 256, 256)  # res5 8 x 8: a 2 x 2 grid of 7 x 7 windows
        features = model.forward_features(x)
        dense = model.forward_dense(x)
        assert dense.shape == (2, 6, 1, 2, 2)
        for i in range(2):
            for j in range(2):
                window = features[:, :, :, i : i + 7, j : j + 7].mean((2, 3, 4))
                assert torch.allclose(dense[:, :, 0, i, j], model.pred(window), atol=1e-5)
        expected = torch.stack([dense[:, :, 0, i, j].softmax(1) for i in range(2) for j in range(2)]).mean(0)
        assert torch.allclose(model.view_scores(x), expected, atol=1e-6)
        assert not torch.allclose(model.view_scores(x), model(x).softmax(1), atol=1e-4)
