"""The zoo: every name builds what its card says, costs are recounted, names and errors."""

import re

import pytest
import torch

import nonlocalnet
from nonlocalnet import create_model, list_models, model_card
from nonlocalnet.flops import model_report
from nonlocalnet.models import ResNet3d
from nonlocalnet.models.zoo import NONLOCAL_POSITIONS

NAME = re.compile(r"^(c2d|i3d)(?:_nl(1|5|10))?_r(50|101)(?:_(8x8|128x1|32x4))?$")
BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def _hand_count(arch, depth, count, frozen, classes=400):
    """(all parameters, conv/fc weights) from the architecture (docs/paper.md §3), by hand."""
    inflate = arch == "i3d"
    temporal = {"res2": {0, 1, 2}, "res3": {0, 2}, "res4": set(range(0, BLOCKS[depth][2], 2)), "res5": {1}}
    weights, norms = 3 * 64 * (5 if inflate else 1) * 7 * 7, 64
    channels = 64
    for s, stage in enumerate(("res2", "res3", "res4", "res5")):
        inner, out = 64 * 2**s, 256 * 2**s
        for i in range(BLOCKS[depth][s]):
            t = 3 if inflate and i in temporal[stage] else 1
            weights += channels * inner * t + inner * inner * 9 + inner * out
            norms += 2 * inner + out
            if i == 0:
                weights += channels * out
                norms += out
            channels = out
    nl = 0
    for stage, indices in (NONLOCAL_POSITIONS[depth, count] if count else {}).items():
        c = 512 if stage == "res3" else 1024
        weights += len(indices) * 4 * c * c // 2  # theta, phi, g: C -> C/2; out: C/2 -> C
        nl += len(indices) * (3 * c // 2 + c + (0 if frozen else 2 * c))  # conv biases, BN
    weights += 2048 * classes
    return weights + 2 * norms + nl + classes, weights


def test_names_follow_the_scheme_and_cover_table_2_and_the_official_zoo():
    names = list_models()
    assert len(names) == len(set(names)) == 2 * 4 * 2 * 4
    for name in names:
        assert NAME.match(name), name
    assert {"c2d_r50", "c2d_nl5_r50", "i3d_nl5_r101", "c2d_nl10_r101", "i3d_r50_128x1", "i3d_nl5_r50_8x8"} <= set(names)
    assert list_models("i3d_nl5_r50*") == ["i3d_nl5_r50", "i3d_nl5_r50_8x8", "i3d_nl5_r50_128x1", "i3d_nl5_r50_32x4"]
    assert model_card("i3d_nl5_r50_32x2") is model_card("i3d_nl5_r50")
    official = [n for n in names if model_card(n).official]
    assert len(official) == 12  # the official README's twelve models of distinct settings
    assert all(model_card(n).depth == 50 for n in official)
    with_paper = [n for n in names if model_card(n).paper]
    assert len(with_paper) == 18  # Table 2c (8), 2f (4), 2g (6)


@pytest.mark.parametrize("name", list_models())
def test_card_matches_the_built_model_and_a_hand_count(name):
    card = model_card(name)
    arch, count, depth, setting = NAME.match(name).groups()
    count, depth, setting = int(count or 0), int(depth), setting or "32x2"
    frames, rate = map(int, setting.split("x"))
    assert (card.arch, card.nonlocal_count, card.depth, card.frames, card.rate) == (arch, count, depth, frames, rate)
    assert card.frozen_bn == (setting in ("128x1", "32x4"))
    with torch.device("meta"):
        model = create_model(name)
    assert (card.params, card.weights) == _hand_count(arch, depth, count, card.frozen_bn)
    assert sum(p.numel() for p in model.parameters()) == card.params
    positions = {s: tuple(i for i, b in enumerate(getattr(model, s)) if b.nonlocal_block is not None)
                 for s in ("res2", "res3", "res4", "res5")}
    assert sum(map(len, positions.values())) == count
    if count:
        assert {s: v for s, v in positions.items() if v} == NONLOCAL_POSITIONS[depth, count]
    total = model_report(model, card.input_shape)[-1]
    assert round(total.flops / 1e9, 2) == card.gflops
    if setting == "32x2":
        assert round(model_report(model, (1, 3, frames, 256, 256))[-1].flops / 1e9, 2) == card.test_gflops


def test_frozen_bn_settings_build_the_official_affine_models():
    model = create_model("i3d_nl5_r50_128x1")
    assert isinstance(model.res2[0].branch2a_bn, nonlocalnet.models.Affine3d)
    block3, block4 = model.res3[1].nonlocal_block, model.res4[1].nonlocal_block
    assert block3.norm is None and block3.group_size == 4 and block4.group_size is None
    assert block3.out.weight.abs().sum() == 0  # NONLOCAL.USE_ZERO_INIT_CONV
    assert model.stem == "32x2" and create_model("i3d_r50_32x4").stem == "8x8"


def test_cards_reproduce_table_2e_and_the_paper_r101_size():
    c2d, nl, i3d = (model_card(n) for n in ("c2d_r101", "c2d_nl5_r101", "i3d_r101"))
    assert round(c2d.weights / 1e6, 1) == 43.2
    assert round(nl.weights / c2d.weights, 1) == 1.2 and round(nl.gflops / c2d.gflops, 1) == 1.2
    assert round(i3d.weights / c2d.weights, 1) == 1.2 and round(i3d.gflops / c2d.gflops, 1) == 1.5
    # "only ~70% parameters and ~80% FLOPs of the ResNet-101 baseline" (the 5-block R50)
    r50 = model_card("c2d_nl5_r50")
    assert round(r50.weights / c2d.weights, 1) == 0.7 and round(r50.gflops / c2d.gflops, 1) == 0.8


@pytest.mark.parametrize("name", ["c2d_nl1_r50_8x8", "i3d_nl5_r50_8x8", "i3d_nl10_r50_32x4"])
def test_zoo_models_run_on_small_clips(name):
    card = model_card(name)
    model = create_model(name, num_classes=3).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, card.frames, 64, 64))
    assert out.shape == (1, 3) and torch.isfinite(out).all()


def test_overrides_and_errors():
    with torch.device("meta"):
        model = create_model("i3d_r101", inflation="3x3x3", dropout=0.0)
        charades = create_model("i3d_nl5_r101", num_classes=157)
    assert model.res2[0].branch2b.kernel_size == (3, 3, 3) and model.dropout.p == 0.0
    assert round(sum(p.numel() for p in model.parameters() if p.dim() > 1) / 1e6, 2) == 62.94  # by hand, every-other 3x3x3 pattern
    assert charades.pred.out_features == 157
    with torch.device("meta"):
        dot = create_model("c2d_nl5_r50", nonlocal_options={"mode": "dot_product"})
    assert dot.res4[5].nonlocal_block.mode == "dot_product"
    with pytest.raises(TypeError):
        create_model("c2d_r50", inflaton="3x3x3")
    with pytest.raises(ValueError, match=r"name: unknown model 'i3d_nl5_r5'\. Close matches: i3d_nl5_r50.*Known models: c2d_r50, "):
        create_model("i3d_nl5_r5")
    assert isinstance(create_model("c2d_r50", num_classes=2), ResNet3d)


def test_nonlocal_overrides_merge_into_the_card():
    with torch.device("meta"):
        model = create_model("i3d_nl5_r50_32x4", nonlocal_options={"mode": "dot_product"},
                             nonlocal_stage_options={"res4": {"affinity": "space"}})
    res3, res4 = model.res3[1].nonlocal_block, model.res4[1].nonlocal_block
    assert res3.mode == res4.mode == "dot_product" and res3.norm is None and res4.norm is None  # frozen-BN: no BN
    assert res3.group_size == 4 and res4.affinity == "space" and res3.affinity == "spacetime"
