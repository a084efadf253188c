"""add_nonlocal on real torchvision networks: channels/dims inferred, identity at init, keys kept."""

import copy

import pytest
import timm
import torch
import torch.nn as nn
from torchvision.models import resnet18
from torchvision.models.video import r3d_18

from nonlocalnet import NonLocalBlock, add_nonlocal
from nonlocalnet.bench import randomize_


def _eval_output(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize(
    "build, after, shape, expected",
    [
        (lambda: resnet18(num_classes=7), ["layer3.1"], (2, 3, 64, 64), [(256, 2)]),
        (lambda: resnet18(num_classes=7), ["layer2.0", "layer3"], (2, 3, 64, 64), [(128, 2), (256, 2)]),
        (lambda: r3d_18(num_classes=5), ["layer2.0"], (1, 3, 4, 32, 32), [(128, 3)]),
        (lambda: timm.create_model("resnet50", num_classes=5), ["layer3.4"], (1, 3, 64, 64), [(1024, 2)]),
        (lambda: timm.create_model("seresnet18", num_classes=5), ["layer2.1"], (1, 3, 64, 64), [(128, 2)]),
    ],
)
def test_inferred_and_identity_at_init(build, after, shape, expected):
    model = build()
    x = torch.randn(shape)
    before = _eval_output(model, x)
    original = copy.deepcopy(model).train()
    keys = set(model.state_dict())
    blocks = add_nonlocal(model, after)
    assert [(b.in_channels, b.dims) for b in blocks] == expected
    assert torch.equal(_eval_output(model, x), before)  # zero-initialised BN scale: exactly the identity
    assert torch.equal(model.train()(x), original(x))  # and in train mode, with batch statistics
    new_keys = set(model.state_dict()) - keys
    assert keys <= set(model.state_dict())  # every pretrained key unchanged
    assert {k.split(".nonlocal_block.")[0] for k in new_keys} == set(after)
    assert f"{after[0]}.nonlocal_block.theta.weight" in new_keys


def test_blocks_are_applied_and_trained():
    model = resnet18(num_classes=7)
    (block,) = add_nonlocal(model, ["layer3.1"], mode="dot_product")
    assert block.mode == "dot_product"
    x = torch.randn(2, 3, 64, 64)
    before = _eval_output(model, x)
    randomize_(block)
    after = _eval_output(model, x)
    assert (after - before).abs().max() > 1e-3  # the block's output reaches the logits
    model.train()
    model(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())


def test_pretrained_weights_load_and_copies_keep_the_block():
    pretrained = resnet18(num_classes=7).state_dict()
    model = resnet18(num_classes=7)
    add_nonlocal(model, ["layer4.0"])
    result = model.load_state_dict(pretrained, strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(".nonlocal_block." in k for k in result.missing_keys)
    randomize_(model.layer4[0].nonlocal_block)
    x = torch.randn(1, 3, 64, 64)
    twin = copy.deepcopy(model)
    assert torch.equal(_eval_output(twin, x), _eval_output(model, x))
    plain = resnet18(num_classes=7)
    plain.load_state_dict(pretrained)
    assert not torch.allclose(_eval_output(plain, x), _eval_output(model, x))


def test_explicit_channels_for_modules_without_convs():
    model = nn.Sequential(nn.Identity(), nn.Conv1d(4, 6, 1))
    with pytest.raises(ValueError, match="in_channels= and dims="):
        add_nonlocal(model, ["0"])
    (block,) = add_nonlocal(model, ["0"], in_channels=4, dims=1, subsample=False)
    assert isinstance(block, NonLocalBlock) and block.in_channels == 4
    randomize_(block)
    x = torch.randn(2, 4, 9)
    model.eval()
    assert torch.allclose(model(x), model[1](block(x)))


def test_bad_arguments():
    model = resnet18()
    with pytest.raises(ValueError, match=r"after: no submodule named 'layer3\.9'.*layer3\.1"):
        add_nonlocal(model, ["layer3.9"])
    add_nonlocal(model, "layer2")
    with pytest.raises(ValueError, match="already has a non-local block"):
        add_nonlocal(model, ["layer2"])
    with pytest.raises(TypeError):
        add_nonlocal(model, ["layer3"], modee="dot_product")
    with pytest.raises(ValueError, match="mode"):
        add_nonlocal(model, ["layer3"], mode="cosine")
