"""The model section of a configuration: a zoo name gives the defaults, every field given
explicitly overrides them or is an error naming the conflict, and the configuration a run saves
(:func:`nonlocalnet.engine.resolve_model`) rebuilds exactly the network that was built."""

import dataclasses

import pytest
import torch

from nonlocalnet.config import Config, ModelConfig, load_config, to_yaml
from nonlocalnet.engine import build_model, resolve_model

NAMES = ["c2d_nl5_r50", "i3d_nl5_r101_128x1", "i3d_r50_8x8"]
# a value other than every NAMES model's for each field that builds the network
CHANGES = {
    "inflation": "3x3x3", "stem": "paper", "width": 32, "stage_blocks": [3, 5, 23, 3],
    "nonlocal_blocks": {"res4": [0]}, "nonlocal_preset": "nl1", "nonlocal_mode": "dot_product", "dropout": 0.1,
    "options": {"stem": "slowfast"},
}


def _built(cfg: ModelConfig) -> str:
    with torch.device("meta"):
        return repr(build_model(cfg, 10))  # modules, shapes, pools, block modes, dropout, eps


def test_every_field_covered():
    untested = {f.name for f in dataclasses.fields(ModelConfig)} - set(CHANGES) - {"name", "depth", "weights"}
    assert not untested, f"add a change for {untested}"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("field", list(CHANGES))
def test_a_field_given_with_a_name_changes_the_model(name, field):
    named = _built(ModelConfig(name=name))
    if field == "nonlocal_mode" and "_nl" not in name:
        return  # test_a_mode_without_blocks_is_an_error
    assert _built(ModelConfig(name=name, **{field: CHANGES[field]})) != named


@pytest.mark.parametrize("name", NAMES)
def test_a_depth_other_than_the_names_is_an_error(name):
    depth = 101 if "r50" in name else 50
    with pytest.raises(ValueError, match=f"model.depth: {depth} differs from model.name '{name}'"):
        build_model(ModelConfig(name=name, depth=depth), 10)
    assert _built(ModelConfig(name=name, depth=50 if "r50" in name else 101)) == _built(ModelConfig(name=name))


def test_a_mode_without_blocks_is_an_error():
    with pytest.raises(ValueError, match="model.nonlocal_mode: 'dot_product' given for a model without non-local"):
        build_model(ModelConfig(name="i3d_r50_8x8", nonlocal_mode="dot_product"), 10)
    with pytest.raises(ValueError, match="model.nonlocal_mode: 'gaussian' given for a model without non-local"):
        build_model(ModelConfig(name="c2d_nl5_r50", nonlocal_blocks={}, nonlocal_mode="gaussian"), 10)


def test_preset_and_blocks_together_are_an_error():
    with pytest.raises(ValueError, match=r"model.nonlocal_preset \('nl1'\) and model.nonlocal_blocks"):
        build_model(ModelConfig(name="c2d_r50", nonlocal_preset="nl1", nonlocal_blocks={"res4": [1]}), 10)
    with pytest.raises(ValueError, match="model.nonlocal_preset: expected one of"):
        build_model(ModelConfig(nonlocal_preset="nl7"), 10)


def test_the_name_survives_what_the_fields_do_not_say():
    with torch.device("meta"):
        model = build_model(ModelConfig(name="i3d_nl5_r50_128x1", nonlocal_mode="dot_product"), 10)
    blocks = [m for m in model.modules() if type(m).__name__ == "NonLocalBlock"]
    assert model.frozen_bn and len(blocks) == 5 and {b.mode for b in blocks} == {"dot_product"}
    assert all(b.norm is None or not isinstance(b.norm, torch.nn.BatchNorm3d) for b in blocks)  # still no BN


@pytest.mark.parametrize("model", [ModelConfig(name="i3d_nl5_r101_128x1", stem="paper", nonlocal_preset="nl1"),
                                   ModelConfig(name="c2d_r50", nonlocal_mode="gaussian", nonlocal_blocks={"res3": [2]}),
                                   ModelConfig(width=8, stage_blocks=[1, 4, 1, 1], nonlocal_preset="res3")])
def test_the_saved_configuration_rebuilds_the_same_network(model, tmp_path):
    resolved = resolve_model(model)
    assert _built(resolved) == _built(model) and resolve_model(resolved) == resolved
    for key in ("depth", "inflation", "stem", "width", "stage_blocks", "nonlocal_blocks", "nonlocal_mode"):
        assert getattr(resolved, key) is not None, key  # every field says what was built
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(Config(model=resolved)))
    assert _built(load_config(path).model) == _built(model)


def test_baseline_weights_initialise_a_non_local_model_whose_blocks_start_fresh(tmp_path):
    from nonlocalnet.weights import save_weights

    fields = {"width": 8, "stage_blocks": [1, 3, 1, 1], "stem": "8x8"}
    baseline = build_model(ModelConfig(**fields, nonlocal_blocks={}), 5)
    save_weights(baseline.state_dict(), tmp_path / "base.pt")  # ImageNet or a baseline: no block in it
    model = build_model(ModelConfig(**fields, nonlocal_preset="res3", weights=str(tmp_path / "base.pt")), 5)
    assert model.res3[2].nonlocal_block is not None
    own = model.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in baseline.state_dict().items())
    x = torch.randn(1, 3, 4, 32, 32)
    torch.testing.assert_close(model.eval()(x), baseline.eval()(x))  # a fresh block is the identity


def test_a_field_that_the_options_contradict_is_an_error():
    with pytest.raises(ValueError, match=r"model.stem is 'paper' but model.options .* say 'mmaction2'"):
        build_model(ModelConfig(name="i3d_nl5_r50", stem="paper", options={"stem": "mmaction2"}), 10)
    with pytest.raises(ValueError, match=r"model.nonlocal_mode is 'gaussian' but .* say 'dot_product'"):
        build_model(ModelConfig(name="i3d_nl5_r50", nonlocal_mode="gaussian",
                                options={"nonlocal_options": {"mode": "dot_product"}}), 10)
    resolved = resolve_model(ModelConfig(name="i3d_nl5_r50", options={"stem": "mmaction2"}))
    assert resolved.stem == "mmaction2" and _built(resolved) == _built(ModelConfig(name="i3d_nl5_r50",
                                                                                    options={"stem": "mmaction2"}))
