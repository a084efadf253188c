"""Trained checkpoints of mmaction2 and PySlowFast: written here in each library's key layout (read
from their repositories: mmaction2's ResNet3d + I3DHead with mmcv's NonLocal3d, PySlowFast's
ResNet with its Nonlocal, and their checkpoint files' wrappers), converted with
``nonlocalnet convert --from ...``, and compared with each network assembled by hand from the same
tensors: its convs and BNs written out below from the peer's architecture, its non-local blocks the
peer's own modules (mmcv's NonLocal3d; pytorchvideo's NonLocal, the same function as PySlowFast's).
"""

import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import rel_err
from nonlocalnet import create_model
from nonlocalnet.cli import main
from nonlocalnet.weights import kinetics400_classes, read_weights

R50 = (3, 4, 6, 3)
# Temporal kernel 3 on the first conv of these blocks (mmaction2's I3D `inflate`, PySlowFast's
# i3d _TEMPORAL_KERNEL_BASIS, both the official pattern), by layer.
INFLATE = ((1, 1, 1), (1, 0, 1, 0), (1, 0, 1, 0, 1, 0), (0, 1, 0))
NONLOCAL = {1: (1, 3), 2: (1, 3, 5)}  # layer -> blocks: mmaction2 `non_local`, PySlowFast NONLOCAL.LOCATION
MM_MEAN, MM_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


# Each layout's names of a bottleneck's parts: 1x1 (temporal 3 where inflated), 3x3, 1x1, projection.
MM_PARTS = {"a": ".conv1.conv", "a_bn": ".conv1.bn", "b": ".conv2.conv", "b_bn": ".conv2.bn", "c": ".conv3.conv",
            "c_bn": ".conv3.bn", "proj": ".downsample.conv", "proj_bn": ".downsample.bn"}
SF_PARTS = {"a": ".branch2.a", "a_bn": ".branch2.a_bn", "b": ".branch2.b", "b_bn": ".branch2.b_bn", "c": ".branch2.c",
            "c_bn": ".branch2.c_bn", "proj": ".branch1", "proj_bn": ".branch1_bn"}


R101, INFLATE_R101 = (3, 4, 23, 3), ((1, 1, 1), (1, 0, 1, 0), (1, 0) * 11 + (1,), (0, 1, 0))


def _i3d_r50_state(seed, classes, stem, stem_bn, head, block_prefix, parts, nonlocal_block, counts=R50,
                   inflate=INFLATE):
    """Random weights and BN statistics for an I3D R50 (or R101: ``counts``, ``inflate``) in a layout
    given by its names; non-local blocks written by ``nonlocal_block(conv, bn, layer, block, channels)``."""
    gen = torch.Generator().manual_seed(seed)
    state = {}

    def conv(key, out, inp, kernel, bias=False, gain=1.0):
        fan_in = inp * math.prod(kernel)
        state[key + ".weight"] = torch.randn(out, inp, *kernel, generator=gen) * gain * (1.0 / fan_in) ** 0.5
        if bias:
            state[key + ".bias"] = torch.randn(out, generator=gen) * 0.1

    def bn(key, c):
        state[key + ".weight"] = torch.rand(c, generator=gen) + 0.5
        state[key + ".bias"] = torch.randn(c, generator=gen) * 0.1
        state[key + ".running_mean"] = torch.randn(c, generator=gen) * 0.1
        state[key + ".running_var"] = torch.rand(c, generator=gen) + 0.5
        state[key + ".num_batches_tracked"] = torch.tensor(1000)

    conv(stem, 64, 3, (5, 7, 7))
    bn(stem_bn, 64)
    inp = 64
    for layer, blocks in enumerate(counts):
        planes = 64 * 2**layer
        for b in range(blocks):
            p = block_prefix(layer, b)
            convs = [("a", planes, inp, (3 if inflate[layer][b] else 1, 1, 1)), ("b", planes, planes, (1, 3, 3)),
                     ("c", planes * 4, planes, (1, 1, 1))] + ([("proj", planes * 4, inp, (1, 1, 1))] if b == 0 else [])
            for name, out, width, kernel in convs:
                conv(p + parts[name], out, width, kernel)
                bn(p + parts[name + "_bn"], out)
            if b in NONLOCAL.get(layer, ()):
                nonlocal_block(conv, bn, layer, b, planes * 4)
            inp = planes * 4
    state[head + ".weight"] = torch.randn(classes, 2048, generator=gen) * 0.05
    state[head + ".bias"] = torch.randn(classes, generator=gen) * 0.1
    return state


def mmaction2_state(mode, seed=0, classes=400, sub_sample=True, norm=True):
    """An mmaction2 Recognizer3D state dict: ResNet3d(depth=50, inflate=INFLATE, non_local=...,
    non_local_cfg=dict(sub_sample=True, norm_cfg=BN3d, mode=...)) as `backbone`, I3DHead as `cls_head`
    (``sub_sample=False``: no pools after phi / g; ``norm=False``: no BN after conv_out, which has a bias)."""

    def nonlocal_block(conv, bn, layer, b, c):
        q = f"backbone.layer{layer + 1}.{b}.non_local_block"
        pooled = ".0" if sub_sample else ""
        for part in (f"g{pooled}",) + (() if mode == "gaussian" else ("theta", f"phi{pooled}")):
            conv(f"{q}.{part}.conv", c // 2, c, (1, 1, 1), bias=True, gain=0.05)  # a dot product stays finite
        conv(q + ".conv_out.conv", c, c // 2, (1, 1, 1), bias=not norm, gain=1.0 if norm else 0.3)  # a BN: no bias
        if norm:
            bn(q + ".conv_out.bn", c)

    return _i3d_r50_state(seed, classes, "backbone.conv1.conv", "backbone.conv1.bn", "cls_head.fc_cls",
                          lambda layer, b: f"backbone.layer{layer + 1}.{b}", MM_PARTS, nonlocal_block)


def _bn(state, key, x, eps=1e-5):
    return F.batch_norm(x, state[key + ".running_mean"], state[key + ".running_var"], state[key + ".weight"],
                        state[key + ".bias"], False, 0.0, eps)


def mmaction2_forward(state, x, non_local_cfg):
    """mmaction2's I3D R50 recognizer on an mmaction2-normalised clip, written out from its code's
    structure; its non-local blocks are mmcv's NonLocal3d(channels, **non_local_cfg), mmcv's own
    defaults for what the config leaves out, loaded strictly from the state dict."""
    from mmcv.cnn import NonLocal3d

    def cbr(key, x, stride=1, padding=0, relu=True):
        x = _bn(state, key + ".bn", F.conv3d(x, state[key + ".conv.weight"], stride=stride, padding=padding))
        return F.relu(x) if relu else x

    x = cbr("backbone.conv1", x, (2, 2, 2), (2, 3, 3))
    x = F.max_pool3d(x, (1, 3, 3), (2, 2, 2), (0, 1, 1))
    for layer, blocks in enumerate(R50):
        for b in range(blocks):
            p = f"backbone.layer{layer + 1}.{b}"
            s = 2 if b == 0 and layer > 0 else 1
            out = cbr(p + ".conv1", x, 1, (1 if INFLATE[layer][b] else 0, 0, 0))
            out = cbr(p + ".conv2", out, (1, s, s), (0, 1, 1))
            out = cbr(p + ".conv3", out, relu=False)
            x = F.relu(out + (cbr(p + ".downsample", x, (1, s, s), relu=False) if b == 0 else x))
            if b in NONLOCAL.get(layer, ()):
                q = p + ".non_local_block."
                block = NonLocal3d(x.shape[1], **non_local_cfg)
                block.load_state_dict({k[len(q):]: v for k, v in state.items() if k.startswith(q)})
                x = block.to(x.dtype).eval()(x)
        if layer == 0:
            x = F.max_pool3d(x, (2, 1, 1), (2, 1, 1))  # pool2
    return F.linear(x.mean((2, 3, 4)), state["cls_head.fc_cls.weight"], state["cls_head.fc_cls.bias"])


def slowfast_state(seed=0, classes=400, depth=50):
    """A PySlowFast ResNet state dict (MODEL.ARCH i3d, RESNET.DEPTH 50, NONLOCAL.LOCATION
    [[[]], [[1, 3]], [[1, 3, 5]], [[]]]): `s{2..5}.pathway0_res{i}.branch2.{a,b,c}` with
    `branch2.{a,b,c}_bn`, `branch1` / `branch1_bn`, `s{k}.pathway0_nonlocal{i}` and `head.projection`."""

    def nonlocal_block(conv, bn, layer, b, c):
        q = f"s{layer + 2}.pathway0_nonlocal{b}"
        for part in ("theta", "phi", "g"):
            conv(f"{q}.conv_{part}", c // 2, c, (1, 1, 1), bias=True, gain=0.05)
        conv(q + ".conv_out", c, c // 2, (1, 1, 1), bias=True)
        bn(q + ".bn", c)

    return _i3d_r50_state(seed, classes, "s1.pathway0_stem.conv", "s1.pathway0_stem.bn", "head.projection",
                          lambda layer, b: f"s{layer + 2}.pathway0_res{b}", SF_PARTS, nonlocal_block,
                          *((R101, INFLATE_R101) if depth == 101 else ()))


def slowfast_forward(state, x, instantiation):
    """PySlowFast's I3D R50 (ResNetBasicStem, pathway0_pool after s2, ResBlocks, Nonlocal after
    blocks) on a PySlowFast-normalised clip; the blocks are pytorchvideo's NonLocal, which computes
    what PySlowFast's Nonlocal computes (same convs, pool before them, scaling, ``bn`` as ``norm``)."""
    from pytorchvideo.layers.nonlocal_net import create_nonlocal

    def conv_bn(key, bn_key, x, stride=1, padding=0, relu=True):
        x = _bn(state, bn_key, F.conv3d(x, state[key + ".weight"], stride=stride, padding=padding))
        return F.relu(x) if relu else x

    x = conv_bn("s1.pathway0_stem.conv", "s1.pathway0_stem.bn", x, (1, 2, 2), (2, 3, 3))
    x = F.max_pool3d(x, (1, 3, 3), (1, 2, 2), (0, 1, 1))
    for layer, blocks in enumerate(R50):
        stage = f"s{layer + 2}"
        for b in range(blocks):
            p = f"{stage}.pathway0_res{b}.branch"
            s = 2 if b == 0 and layer > 0 else 1
            out = conv_bn(p + "2.a", p + "2.a_bn", x, 1, (1 if INFLATE[layer][b] else 0, 0, 0))
            out = conv_bn(p + "2.b", p + "2.b_bn", out, (1, s, s), (0, 1, 1))
            out = conv_bn(p + "2.c", p + "2.c_bn", out, relu=False)
            x = F.relu(out + (conv_bn(p + "1", p + "1_bn", x, (1, s, s), relu=False) if b == 0 else x))
            if b in NONLOCAL.get(layer, ()):
                q, c = f"{stage}.pathway0_nonlocal{b}.", x.shape[1]
                block = create_nonlocal(dim_in=c, dim_inner=c // 2, pool_size=(1, 2, 2), instantiation=instantiation)
                block.load_state_dict({k[len(q):].replace("bn.", "norm."): v for k, v in state.items()
                                       if k.startswith(q)})
                x = block.to(x.dtype).eval()(x)
        if layer == 0:
            x = F.max_pool3d(x, (2, 1, 1), (2, 1, 1))  # pathway0_pool
    return F.linear(x.mean((2, 3, 4)), state["head.projection.weight"], state["head.projection.bias"])


def _pixels(frames, seed=1):
    return torch.rand(1, 3, frames, 64, 64, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 255


def _ours(pixels):
    return (pixels - 114.75) / 57.375  # what nonlocalnet's data pipeline feeds a model


def _python(value):
    """A value as mmengine's Config.pretty_text writes it: dicts as dict(...) calls."""
    if isinstance(value, dict):
        return "dict(" + ", ".join(f"{k}={_python(v)}" for k, v in value.items()) + ")"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_python(v) for v in value) + ("," if isinstance(value, tuple) else "")
        return f"[{inner}]" if isinstance(value, list) else f"({inner})"
    return repr(value)


def mm_model_config(non_local_cfg, **backbone):
    """The model part of mmaction2 1.2's i3d_imagenet-pretrained-r50-nl-*_8xb8-32x2x1-100e_kinetics400-rgb
    config (as Config.fromfile reads it), with ``non_local_cfg`` and backbone arguments changed
    (a value None: the argument left out)."""
    args = dict(conv1_kernel=(5, 7, 7), conv1_stride_t=2, conv_cfg=dict(type="Conv3d"), depth=50, inflate=INFLATE,
                non_local=((0, 0, 0), (0, 1, 0, 1), (0, 1, 0, 1, 0, 1), (0, 0, 0)), non_local_cfg=non_local_cfg,
                norm_eval=False, pool1_stride_t=2, pretrained="torchvision://resnet50", pretrained2d=True,
                type="ResNet3d", zero_init_residual=False)
    args = {k: v for k, v in {**args, **backbone}.items() if v is not None}
    return dict(backbone=args, cls_head=dict(average_clips="prob", dropout_ratio=0.5, in_channels=2048, init_std=0.01,
                                             num_classes=400, spatial_type="avg", type="I3DHead"),
                data_preprocessor=dict(format_shape="NCTHW", mean=list(MM_MEAN), std=list(MM_STD),
                                       type="ActionDataPreprocessor"), type="Recognizer3D")


def _mm_config(mode, use_scale, **backbone):
    # mmengine's meta['cfg'] (Config.pretty_text): Python source, model first
    cfg = dict(mode=mode, norm_cfg=dict(requires_grad=True, type="BN3d"), sub_sample=True, use_scale=use_scale)
    return (f"default_scope = 'mmaction'\nmodel = {_python(mm_model_config(cfg, **backbone))}\n"
            f"test_cfg = dict(type='TestLoop')\ntest_mode = True\n")


def mmengine_save(path, state, cfg=None):
    """A checkpoint as mmengine's Runner writes it, by mmengine's own ``save_checkpoint``: ``meta``
    (with the config text), ``state_dict``, a real ``MessageHub`` state (``HistoryBuffer`` objects
    holding numpy arrays), optimizer and scheduler states."""
    import numpy as np
    from mmengine.logging import MessageHub
    from mmengine.runner.checkpoint import save_checkpoint

    hub = MessageHub.get_instance(f"nonlocalnet-test-{path}")
    for i in range(3):
        hub.update_scalar("train/loss", 2.0 / (i + 1))
        hub.update_scalar("train/lr", np.float64(0.01))
    hub.update_info("epoch", 100)
    head = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.01, momentum=0.9)
    head(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    meta = {"epoch": 100, "iter": 1000, "seed": 0, "mmengine_version": "0.10.7", "dataset_meta": {"classes": None}}
    if cfg is not None:
        meta["cfg"] = cfg
    save_checkpoint({"meta": meta, "state_dict": state, "message_hub": hub.state_dict(),
                     "optimizer": optimizer.state_dict(),
                     "param_schedulers": [{"base_values": [0.01], "last_step": 1000, "verbose": False}]}, str(path))


@pytest.mark.parametrize("mode, use_scale", [("embedded_gaussian", False), ("embedded_gaussian", True),
                                             ("dot_product", False), ("gaussian", False)])
def test_mmaction2_checkpoint_converts_exactly(tmp_path, capsys, mode, use_scale):
    """A checkpoint written by mmengine's own save function (message hub and all) converts, and the
    model computes what mmaction2's computes."""
    pytest.importorskip("mmcv.cnn")
    state = mmaction2_state(mode)
    mmengine_save(tmp_path / "i3d_nl.pth", state, _mm_config(mode, use_scale))
    assert main(["convert", str(tmp_path / "i3d_nl.pth"), str(tmp_path / "out.pt"), "--from", "mmaction2",
                 "--model", "i3d_nl5_r50"]) == 0
    report = capsys.readouterr().out
    assert "unmatched" not in report and "missing" not in report and "mismatch" not in report
    expected_nbt = sum(k.endswith("num_batches_tracked") for k in state)
    assert f"dropped training state {expected_nbt}" in report

    model = create_model("i3d_nl5_r50", weights=tmp_path / "out.pt").double().eval()  # strict load
    payload = read_weights(tmp_path / "out.pt")
    assert payload["classes"] == kinetics400_classes() and payload["meta"]["from"] == "mmaction2"
    assert payload["options"]["nonlocal_options"]["pool"] == "after"
    assert model.pool1.padding == (0, 1, 1) and model.res3[1].nonlocal_block.mode == mode
    # our conv_out bias does not exist in mmaction2 (a BN follows): zero, and reported
    assert all(model.res4[i].nonlocal_block.out.bias.abs().max() == 0 for i in (1, 3, 5))
    assert "zero where the source has no parameter: 5" in report

    pixels = _pixels(16)
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1, 1) for v in (MM_MEAN, MM_STD))
    theirs = mmaction2_forward({k: v.double() if v.is_floating_point() else v for k, v in state.items()},
                               (pixels - mean) / std, dict(sub_sample=True, use_scale=use_scale, mode=mode,
                                                           norm_cfg=dict(type="BN3d")))
    with torch.no_grad():
        ours = model(_ours(pixels))
    assert 1 < theirs.abs().max() < 1e4 and theirs.std() > 0.1  # a network whose blocks matter, not a constant
    assert rel_err(ours, theirs) < 1e-10


@pytest.mark.slow
def test_mmaction2_config_leaving_out_non_local_arguments_means_mmcv_defaults(tmp_path, capsys):
    """``non_local_cfg=dict()`` (ResNet3d's default) is mmcv's NonLocal3d defaults: embedded Gaussian
    with use_scale=True, no subsampling, no norm (conv_out keeps its bias)."""
    pytest.importorskip("mmcv.cnn")
    state = mmaction2_state("embedded_gaussian", seed=3, sub_sample=False, norm=False)
    mmengine_save(tmp_path / "a.pth", state, f"model = {_python(mm_model_config(None))}\n")
    assert main(["convert", str(tmp_path / "a.pth"), str(tmp_path / "out.pt"), "--from", "mmaction2",
                 "--model", "i3d_nl5_r50"]) == 0
    report = capsys.readouterr().out
    assert "unmatched" not in report and "missing" not in report and "zero where" not in report
    assert read_weights(tmp_path / "out.pt")["options"]["nonlocal_options"] == {
        "mode": "embedded_gaussian", "pool": "after", "subsample": False, "scale": True, "norm": "none"}
    model = create_model("i3d_nl5_r50", weights=tmp_path / "out.pt").double().eval()
    pixels = _pixels(16)
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1, 1) for v in (MM_MEAN, MM_STD))
    theirs = mmaction2_forward({k: v.double() if v.is_floating_point() else v for k, v in state.items()},
                               (pixels - mean) / std, {})
    with torch.no_grad():
        ours = model(_ours(pixels))
    assert 1 < theirs.abs().max() < 1e4 and theirs.std() > 0.1
    assert rel_err(ours, theirs) < 1e-10


# the keys the options are read from (a subsampled embedded Gaussian / dot product block with BN)
MM_KEYS = {k: torch.zeros(1) for k in ("backbone.conv1.conv.weight",
                                       *(f"backbone.layer2.1.non_local_block.{part}.weight"
                                         for part in ("g.0.conv", "theta.conv", "conv_out.bn")))}


@pytest.mark.parametrize("non_local_cfg, expected", [
    (dict(sub_sample=True, norm_cfg=dict(type="BN3d")), {"mode": "embedded_gaussian", "scale": True}),
    (dict(sub_sample=True, norm_cfg=dict(type="BN3d"), use_scale=False), {"mode": "embedded_gaussian", "scale": False}),
    (dict(sub_sample=True, norm_cfg=dict(type="BN3d"), mode="dot_product"), {"mode": "dot_product", "scale": False}),
])
def test_mmaction2_config_leaving_out_mode_or_use_scale(tmp_path, non_local_cfg, expected):
    """mmcv's defaults where the config is silent: use_scale=True (mmcv's NonLocal3d signature), mode
    'embedded_gaussian'; what the config says wins. (That these options compute mmcv's blocks:
    the exact-conversion tests above.)"""
    from mmcv.cnn import NonLocal3d

    from nonlocalnet.weights import mmaction2_options

    block = NonLocal3d(16, **non_local_cfg)  # mmcv's own reading of the same arguments
    assert block.mode == expected["mode"]
    assert block.use_scale == expected["scale"] or block.mode != "embedded_gaussian"
    options = mmaction2_options(MM_KEYS, f"model = {_python(mm_model_config(non_local_cfg))}\n")
    assert options["nonlocal_options"] == {"pool": "after", "subsample": True, "norm": "batch", **expected}


@pytest.mark.parametrize("change, named", [
    (dict(style="caffe"), "model.backbone.style is 'caffe'"),
    (dict(conv1_stride_t=None), "model.backbone.conv1_stride_t is 1 (mmaction2's default: the config leaves it out)"),
    (dict(pool1_stride_t=1), "model.backbone.pool1_stride_t is 1;"),
    (dict(with_pool2=False), "model.backbone.with_pool2 is False"),
    (dict(spatial_strides=(1, 2, 2, 1)), "model.backbone.spatial_strides is (1, 2, 2, 1)"),
    (dict(temporal_strides=(1, 1, 2, 1)), "model.backbone.temporal_strides"),
    (dict(dilations=(1, 1, 1, 2)), "model.backbone.dilations"),
    (dict(conv1_stride_s=1), "model.backbone.conv1_stride_s"),
    (dict(with_pool1=False), "model.backbone.with_pool1"),
    (dict(inflate_style="3x3x3"), "model.backbone.inflate_style is '3x3x3'"),
    (dict(act_cfg=dict(type="LeakyReLU")), "model.backbone.act_cfg.type is 'LeakyReLU'"),
    (dict(type="ResNet3dSlowOnly"), "model.backbone.type is 'ResNet3dSlowOnly'"),
    (dict(non_local_cfg=dict(norm_cfg=dict(type="BN3d"), mode="dot_product")), "does not fit its weights"),
])
def test_mmaction2_config_that_changes_the_function_is_refused(tmp_path, capsys, change, named):
    """Each ResNet3d argument under which mmaction2 computes another network than ours: exit 2
    naming it, nothing written; a config that leaves one out means mmaction2's default."""
    non_local_cfg = change.pop("non_local_cfg", dict(mode="dot_product", norm_cfg=dict(type="BN3d"), sub_sample=True))
    torch.save({"meta": {"cfg": f"model = {_python(mm_model_config(non_local_cfg, **change))}\n"},
                "state_dict": MM_KEYS}, tmp_path / "a.pth")
    assert main(["convert", str(tmp_path / "a.pth"), str(tmp_path / "out.pt"), "--from", "mmaction2",
                 "--model", "i3d_nl5_r50"]) == 2
    err = capsys.readouterr().err
    assert named in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "out.pt").exists()


def test_mmengine_objects_among_the_weights_are_named(tmp_path, capsys):
    """Training state beside the weights is not loaded (placeholders); among them it is refused by type."""
    from mmengine.logging import HistoryBuffer

    torch.save({"state_dict": {"backbone.conv1.conv.weight": torch.zeros(1), "loss": HistoryBuffer()}},
               tmp_path / "a.pth")
    assert main(["convert", str(tmp_path / "a.pth"), str(tmp_path / "out.pt"), "--from", "mmaction2",
                 "--model", "i3d_nl5_r50"]) == 2
    err = capsys.readouterr().err
    assert "got 'loss': mmengine.logging.history_buffer.HistoryBuffer among its 2 entries" in err


def test_mmaction2_conventions_change_the_output(tmp_path):
    """The carried options are needed: the same tensors in a model with our default conventions
    (pool before the convs, scaled logits, unpadded pool1, official normalisation) differ."""
    state = mmaction2_state("embedded_gaussian")
    torch.save({"state_dict": state}, tmp_path / "a.pth")
    assert main(["convert", str(tmp_path / "a.pth"), str(tmp_path / "out.pt"), "--from", "mmaction2",
                 "--model", "i3d_nl5_r50", "--mode", "embedded_gaussian"]) == 0
    converted = create_model("i3d_nl5_r50", weights=tmp_path / "out.pt").double().eval()
    plain = create_model("i3d_nl5_r50").double().eval()
    plain.load_state_dict(read_weights(tmp_path / "out.pt")["state_dict"])
    x = _ours(_pixels(16))
    with torch.no_grad():
        assert rel_err(plain(x), converted(x)) > 1e-3


def test_mmaction2_mode_from_keys_or_argument(tmp_path, capsys):
    torch.save({"state_dict": mmaction2_state("dot_product")}, tmp_path / "dot.pth")
    out = str(tmp_path / "out.pt")
    # embedded Gaussian and dot product have the same keys: without a config, --mode decides
    assert main(["convert", str(tmp_path / "dot.pth"), out, "--from", "mmaction2", "--model", "i3d_nl5_r50"]) == 2
    err = capsys.readouterr().err
    assert "mode: the checkpoint's non-local blocks may be" in err and "pass --mode" in err
    assert main(["convert", str(tmp_path / "dot.pth"), out, "--from", "mmaction2", "--model", "i3d_nl5_r50",
                 "--mode", "gaussian"]) == 2
    assert "does not fit the checkpoint" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "dot.pth"), out, "--from", "mmaction2", "--model", "i3d_nl5_r50",
                 "--mode", "dot_product"]) == 0
    assert read_weights(out)["options"]["nonlocal_options"]["mode"] == "dot_product"
    # Gaussian blocks have no theta / phi: recognised from the keys
    torch.save({"state_dict": mmaction2_state("gaussian")}, tmp_path / "g.pth")
    assert main(["convert", str(tmp_path / "g.pth"), out, "--from", "mmaction2", "--model", "i3d_nl5_r50"]) == 0
    assert read_weights(out)["options"]["nonlocal_options"]["mode"] == "gaussian"


def test_mmaction2_checkpoint_of_another_model_is_reported(tmp_path, capsys):
    state = mmaction2_state("dot_product")
    state["backbone.layer4.0.extra.weight"] = torch.zeros(3)
    torch.save({"state_dict": state}, tmp_path / "a.pth")
    args = ["convert", str(tmp_path / "a.pth"), str(tmp_path / "out.pt"), "--from", "mmaction2", "--mode",
            "dot_product"]
    assert main(args + ["--model", "i3d_nl5_r50"]) == 1
    captured = capsys.readouterr()
    assert "unmatched (no model entry takes them): 1" in captured.out and "layer4.0.extra.weight" in captured.out
    assert "nothing written" in captured.err and not (tmp_path / "out.pt").exists()
    del state["backbone.layer4.0.extra.weight"]
    torch.save({"state_dict": state}, tmp_path / "a.pth")
    assert main(args + ["--model", "c2d_nl5_r50"]) == 1  # I3D kernels into C2D
    assert "shape mismatch (source vs model)" in capsys.readouterr().out
    assert main(args + ["--model", "i3d_nl10_r50"]) == 1  # blocks the checkpoint lacks
    assert "missing (kept as initialised)" in capsys.readouterr().out


def _sf_config(instantiation):
    # the parts of a PySlowFast cfg.dump() (configs/Kinetics/I3D_NLN_8x8_R50.yaml over defaults) read here
    return (f"DATA:\n  MEAN: [0.45, 0.45, 0.45]\n  STD: [0.225, 0.225, 0.225]\n  NUM_FRAMES: 8\n  SAMPLING_RATE: 8\n"
            f"MODEL:\n  ARCH: i3d\n  MODEL_NAME: ResNet\n  NUM_CLASSES: 400\n"
            f"NONLOCAL:\n  GROUP: [[1], [1], [1], [1]]\n  INSTANTIATION: {instantiation}\n"
            f"  LOCATION: [[[]], [[1, 3]], [[1, 3, 5]], [[]]]\n"
            f"  POOL: [[[1, 2, 2], [1, 2, 2]], [[1, 2, 2], [1, 2, 2]], [[1, 2, 2], [1, 2, 2]], [[1, 2, 2], [1, 2, 2]]]\n"
            f"RESNET:\n  DEPTH: 50\n  ZERO_INIT_FINAL_BN: true\n")


@pytest.mark.parametrize("instantiation", ["softmax", "dot_product"])
def test_slowfast_checkpoint_converts_exactly(tmp_path, capsys, instantiation):
    pytest.importorskip("pytorchvideo.layers.nonlocal_net")
    state = slowfast_state()
    torch.save({"epoch": 196, "model_state": state, "optimizer_state": {"state": {}, "param_groups": []},
                "cfg": _sf_config(instantiation)}, tmp_path / "I3D_NLN_8x8_R50.pyth")
    assert main(["convert", str(tmp_path / "I3D_NLN_8x8_R50.pyth"), str(tmp_path / "out.pt"), "--from", "slowfast",
                 "--model", "i3d_nl5_r50_8x8"]) == 0
    report = capsys.readouterr().out
    assert "unmatched" not in report and "missing" not in report and "zero where" not in report
    model = create_model("i3d_nl5_r50_8x8", weights=tmp_path / "out.pt").double().eval()
    assert read_weights(tmp_path / "out.pt")["classes"][-1] == "zumba"
    pixels = _pixels(8)
    theirs = slowfast_forward({k: v.double() if v.is_floating_point() else v for k, v in state.items()},
                              (pixels / 255 - 0.45) / 0.225, instantiation)
    with torch.no_grad():
        ours = model(_ours(pixels))
    assert 1 < theirs.abs().max() < 1e4 and theirs.std() > 0.1
    assert rel_err(ours, theirs) < 1e-10


def test_slowfast_without_config_and_bad_files(tmp_path, capsys):
    state = slowfast_state()
    out = str(tmp_path / "out.pt")
    torch.save({"model_state": {"module." + k: v for k, v in state.items()}}, tmp_path / "ddp.pyth")
    args = ["convert", str(tmp_path / "ddp.pyth"), out, "--from", "slowfast", "--model", "i3d_nl5_r50_8x8"]
    assert main(args) == 2 and "NONLOCAL.INSTANTIATION; pass --mode" in capsys.readouterr().err
    assert main(args + ["--mode", "embedded_gaussian"]) == 0  # the DDP prefix is removed
    assert read_weights(out)["options"] == {"stem": "slowfast", "bn_eps": 1e-5,
                                            "nonlocal_options": {"mode": "embedded_gaussian", "scale": True}}
    # a SlowFast (two-pathway) config, a Caffe2 pickle, a file of something else
    torch.save({"model_state": state, "cfg": "MODEL:\n  ARCH: slowfast\n"}, tmp_path / "sf.pyth")
    assert main(["convert", str(tmp_path / "sf.pyth"), out, "--from", "slowfast", "--model", "i3d_nl5_r50_8x8"]) == 2
    assert "MODEL.ARCH is 'slowfast'" in capsys.readouterr().err
    (tmp_path / "I3D_NLN_8x8_R50.pkl").write_bytes(b"\x80\x04}\x94.")
    assert main(["convert", str(tmp_path / "I3D_NLN_8x8_R50.pkl"), out, "--from", "slowfast", "--model",
                 "i3d_nl5_r50_8x8"]) == 2
    assert "convert it with --from caffe2" in capsys.readouterr().err
    torch.save({"model_state": [1, 2]}, tmp_path / "odd.pyth")
    assert main(["convert", str(tmp_path / "odd.pyth"), out, "--from", "slowfast", "--model", "i3d_nl5_r50_8x8"]) == 2
    assert "expected a state dict of tensors (or one under 'model_state')" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "nope.pyth"), out, "--from", "slowfast", "--model", "i3d_r50_8x8"]) == 2
    assert "no file at" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "odd.pyth"), out, "--from", "slowfast", "--model", "i3d_r5"]) == 2
    assert "unknown model 'i3d_r5'" in capsys.readouterr().err


def test_mmaction2_input_normalisation_from_its_config():
    """mmaction2 1.x normalises in model.data_preprocessor (mean / std left out: not at all), 0.x in
    img_norm_cfg; a BGR input is refused."""
    from nonlocalnet.models import ResNet3d
    from nonlocalnet.weights import mmaction2_options

    model = mm_model_config(dict(mode="dot_product", norm_cfg=dict(type="BN3d"), sub_sample=True))
    model["data_preprocessor"] = dict(type="ActionDataPreprocessor", format_shape="NCTHW")
    options = mmaction2_options(MM_KEYS, f"model = {_python(model)}\n")
    assert (options["pixel_mean"], options["pixel_std"]) == ([0.0] * 3, [1.0] * 3)
    pixels = _pixels(4)
    net = ResNet3d(width=8, stage_blocks=(1, 1, 1, 1), pixel_mean=options["pixel_mean"], pixel_std=options["pixel_std"])
    assert rel_err(net.map_input(_ours(pixels)), pixels) < 1e-14  # the raw 0-255 pixels, as mmaction2 gives them
    del model["data_preprocessor"]
    norm = dict(mean=[100.0, 110.0, 120.0], std=[50.0, 51.0, 52.0], to_bgr=False)
    options = mmaction2_options(MM_KEYS, f"img_norm_cfg = {_python(norm)}\nmodel = {_python(model)}\n")
    assert (options["pixel_mean"], options["pixel_std"]) == (norm["mean"], norm["std"])
    model["data_preprocessor"] = dict(type="ActionDataPreprocessor", mean=list(MM_MEAN), std=list(MM_STD), to_rgb=True)
    with pytest.raises(ValueError, match="model.data_preprocessor.to_rgb is True: only False converts"):
        mmaction2_options(MM_KEYS, f"model = {_python(model)}\n")


SF_KEYS = {k: torch.zeros(1) for k in ("s1.pathway0_stem.conv.weight", "s3.pathway0_nonlocal1.conv_theta.weight")}


def test_slowfast_config_leaving_keys_out_means_pyslowfast_defaults():
    """PySlowFast's defaults (slowfast/config/defaults.py) where its cfg is silent: NONLOCAL.INSTANTIATION
    dot_product, DATA.MEAN / STD 0.45 / 0.225; MODEL.ARCH slowfast, which is refused."""
    from nonlocalnet.weights import slowfast_options

    options = slowfast_options(SF_KEYS, "MODEL:\n  ARCH: i3d\n")
    assert options["nonlocal_options"] == {"mode": "dot_product", "scale": True}
    assert options["pixel_mean"] == [0.45 * 255] * 3 and options["pixel_std"] == [0.225 * 255] * 3
    assert slowfast_options(SF_KEYS, "MODEL:\n  ARCH: i3d\n", mode="embedded_gaussian")["nonlocal_options"]["mode"] \
        == "embedded_gaussian"  # --mode wins
    with pytest.raises(ValueError, match=r"MODEL.ARCH is 'slowfast' \(PySlowFast's default: the config leaves it "):
        slowfast_options(SF_KEYS, "NONLOCAL:\n  INSTANTIATION: softmax\n")


@pytest.mark.parametrize("key, value, named", [
    ("RESNET.STRIDE_1X1", "true", "RESNET.STRIDE_1X1 is True"),
    ("RESNET.SPATIAL_STRIDES", "[[1], [2], [2], [1]]", "RESNET.SPATIAL_STRIDES is [[1], [2], [2], [1]]"),
    ("RESNET.SPATIAL_DILATIONS", "[[1], [1], [1], [2]]", "RESNET.SPATIAL_DILATIONS"),
    ("RESNET.NUM_GROUPS", "32", "RESNET.NUM_GROUPS is 32"),
    ("RESNET.TRANS_FUNC", "basic_transform", "RESNET.TRANS_FUNC is 'basic_transform'"),
    ("DATA.REVERSE_INPUT_CHANNEL", "true", "DATA.REVERSE_INPUT_CHANNEL is True"),
    ("DETECTION.ENABLE", "true", "DETECTION.ENABLE is True"),
    ("BN.NORM_TYPE", "sub_batchnorm", "BN.NORM_TYPE is 'sub_batchnorm'"),
    ("MODEL.ARCH", "slow", "MODEL.ARCH is 'slow'"),
])
def test_slowfast_config_that_changes_the_function_is_refused(tmp_path, capsys, key, value, named):
    section, name = key.split(".")
    cfg = yaml.safe_load(_sf_config("softmax"))
    cfg.setdefault(section, {})[name] = yaml.safe_load(value)
    torch.save({"model_state": SF_KEYS, "cfg": yaml.safe_dump(cfg)}, tmp_path / "a.pyth")
    assert main(["convert", str(tmp_path / "a.pyth"), str(tmp_path / "out.pt"), "--from", "slowfast",
                 "--model", "i3d_nl5_r50_8x8"]) == 2
    err = capsys.readouterr().err
    assert named in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "out.pt").exists()


def test_slowfast_r101_nln_keeps_its_block_positions(tmp_path, capsys):
    """PySlowFast's I3D_NLN_8x8_R101 has its res4 blocks at 1, 3, 5 (NONLOCAL.LOCATION as R50's),
    the official R101 at 6, 13, 20: the file carries the checkpoint's positions, and converts completely."""
    cfg = _sf_config("softmax").replace("DEPTH: 50", "DEPTH: 101")
    torch.save({"model_state": slowfast_state(depth=101), "cfg": cfg}, tmp_path / "I3D_NLN_8x8_R101.pyth")
    assert main(["convert", str(tmp_path / "I3D_NLN_8x8_R101.pyth"), str(tmp_path / "out.pt"), "--from", "slowfast",
                 "--model", "i3d_nl5_r101_8x8"]) == 0
    report = capsys.readouterr().out
    assert "unmatched" not in report and "missing" not in report and "mismatch" not in report
    options = read_weights(tmp_path / "out.pt")["options"]
    assert options["nonlocal_blocks"] == {"res3": [1, 3], "res4": [1, 3, 5]}
    model = create_model("i3d_nl5_r101_8x8", weights=tmp_path / "out.pt")  # strict load
    assert model.nonlocal_positions == {"res3": (1, 3), "res4": (1, 3, 5)}
    # where the checkpoint's positions are the model's, nothing is added
    torch.save({"model_state": slowfast_state(), "cfg": _sf_config("softmax")}, tmp_path / "r50.pyth")
    assert main(["convert", str(tmp_path / "r50.pyth"), str(tmp_path / "out.pt"), "--from", "slowfast",
                 "--model", "i3d_nl5_r50_8x8"]) == 0
    assert "nonlocal_blocks" not in read_weights(tmp_path / "out.pt")["options"]


def test_converted_weights_train_with_their_options(tmp_path):
    """Fine-tuning from converted weights builds the network they need and records it, so that the
    run's checkpoints rebuild it."""
    from nonlocalnet.config import Config, ModelConfig, to_yaml
    from nonlocalnet.engine import build_model

    torch.save({"state_dict": mmaction2_state("dot_product")}, tmp_path / "a.pth")
    assert main(["convert", str(tmp_path / "a.pth"), str(tmp_path / "out.pt"), "--from", "mmaction2",
                 "--model", "i3d_nl5_r50", "--mode", "dot_product"]) == 0
    cfg = ModelConfig(name="i3d_nl5_r50", weights=str(tmp_path / "out.pt"))
    model = build_model(cfg, num_classes=10)  # fine-tuning: another classifier
    assert model.stem == "mmaction2" and model.res3[1].nonlocal_block.pool == "after"
    assert cfg.options["nonlocal_options"]["mode"] == "dot_product"
    # a run's checkpoint, as the initial weights of another run, brings the options too
    torch.save({"model": model.state_dict(), "classes": list("0123456789"), "config": to_yaml(Config(model=cfg))},
               tmp_path / "checkpoint.pt")
    again = ModelConfig(name="i3d_nl5_r50", weights=str(tmp_path / "checkpoint.pt"))
    assert build_model(again, num_classes=10).stem == "mmaction2" and again.options == cfg.options
    cfg.weights = ""
    rebuilt = build_model(cfg, num_classes=10)  # what load_trained does with a run's saved config
    rebuilt.load_state_dict(model.state_dict())
    x = _ours(_pixels(16)).float()
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), model.eval()(x))


def test_pixel_normalisation_map():
    from nonlocalnet.models import ResNet3d

    model = ResNet3d(width=8, stage_blocks=(1, 1, 1, 1), pixel_mean=MM_MEAN, pixel_std=MM_STD)
    pixels = _pixels(4)
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1, 1) for v in (MM_MEAN, MM_STD))
    assert rel_err(model.map_input(_ours(pixels)), (pixels - mean) / std) < 1e-14
    assert ResNet3d(width=8, stage_blocks=(1, 1, 1, 1)).input_map is None  # the pipeline's own: no work
    with pytest.raises(ValueError, match=r"pixel_std: expected a number or 3 numbers \(RGB, 0-255\), positive"):
        ResNet3d(width=8, stage_blocks=(1, 1, 1, 1), pixel_std=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="stem: expected one of"):
        ResNet3d(stem="mmaction")


def test_kinetics400_classes():
    names = kinetics400_classes()
    assert len(names) == 400 == len(set(names)) and names == sorted(names)
    assert names[0] == "abseiling" and "playing guitar" in names


def test_predict_with_converted_weights_names_kinetics_classes(tmp_path, capsys):
    """`nonlocalnet predict` takes a converted file: its options build the network, its class names
    label the scores."""
    pytest.importorskip("av")
    from nonlocalnet.data.synthetic import write_video
    from nonlocalnet.engine import load_for_inference

    torch.save({"model_state": slowfast_state(), "cfg": _sf_config("softmax")}, tmp_path / "sf.pyth")
    assert main(["convert", str(tmp_path / "sf.pyth"), str(tmp_path / "out.pt"), "--from", "slowfast",
                 "--model", "i3d_nl5_r50_8x8"]) == 0
    model, cfg, classes, multilabel = load_for_inference(tmp_path / "out.pt")
    assert model.stem == "slowfast" and (cfg.data.frames, cfg.data.rate) == (8, 8) and classes[0] == "abseiling"
    frames = torch.randint(0, 256, (20, 64, 80, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    write_video(tmp_path / "clip.mp4", frames.numpy())
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "clip.mp4"), "--weights", str(tmp_path / "out.pt"), "--top", "3",
                 "--clips", "1", "--crops", "1"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    labels = [part.rsplit(" ", 1)[0] for part in line.split(": ", 1)[1].split(", ")]
    assert len(labels) == 3 and all(label in classes for label in labels)
    with pytest.raises(ValueError, match="neither a training checkpoint nor a weights file naming its zoo model"):
        torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bare.pt")
        load_for_inference(tmp_path / "bare.pt")


def test_peer_conventions_export(tmp_path):
    """A network with a peer's stem, input map and block conventions exports to ONNX and agrees."""
    pytest.importorskip("onnxruntime")
    from nonlocalnet.export import export_model
    from nonlocalnet.models import ResNet3d

    model = ResNet3d(50, "3x1x1", "mmaction2", nonlocal_blocks={"res3": (0,)}, width=8, stage_blocks=(1, 1, 1, 1),
                     nonlocal_options={"pool": "after", "scale": False, "mode": "dot_product"}, num_classes=5,
                     pixel_mean=MM_MEAN, pixel_std=MM_STD)
    for module in model.modules():  # away from the identity start, so the blocks take part
        if isinstance(module, torch.nn.BatchNorm3d):
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
    report = export_model(model, tmp_path / "m.onnx", "onnx", frames=16, size=64)
    assert report["max_abs_error"] < 1e-4


def test_visualize_and_export_take_a_weights_file_alone(tmp_path):
    """`--checkpoint converted.pt` without --model: the file names its model, options and classes."""
    import argparse

    from nonlocalnet.cli import _cli_model
    from nonlocalnet.weights import save_weights

    save_weights(create_model("c2d_r50_8x8", num_classes=7, stem="slowfast"), tmp_path / "w.pt",
                 model="c2d_r50_8x8", options={"stem": "slowfast"})
    model, frames, rate = _cli_model(argparse.Namespace(checkpoint=str(tmp_path / "w.pt"), model=None, frames=None,
                                                        num_classes=400))
    assert model.pred.out_features == 7 and model.stem == "slowfast" and (frames, rate) == (8, 8)


def test_evaluate_converted_weights_on_a_data_set(tmp_path):
    """`nonlocalnet evaluate CONFIG --weights converted.pt`: the user's data, the file's model and
    Kinetics class names (a data set with other classes is refused by name)."""
    pytest.importorskip("av")
    from nonlocalnet.config import Config, DataConfig
    from nonlocalnet.data.synthetic import write_video
    from nonlocalnet.engine import evaluate_checkpoint

    torch.save({"model_state": slowfast_state(), "cfg": _sf_config("dot_product")}, tmp_path / "sf.pyth")
    assert main(["convert", str(tmp_path / "sf.pyth"), str(tmp_path / "out.pt"), "--from", "slowfast",
                 "--model", "i3d_nl5_r50_8x8"]) == 0
    gen = torch.Generator().manual_seed(0)
    for name in ("a", "b"):
        write_video(tmp_path / f"{name}.mp4", torch.randint(0, 256, (16, 64, 80, 3), generator=gen,
                                                            dtype=torch.uint8).numpy())
    (tmp_path / "classes.txt").write_text("\n".join(kinetics400_classes()) + "\n")
    (tmp_path / "val.txt").write_text("a.mp4 5\nb.mp4 399\n")
    data = DataConfig(dataset="list", root=str(tmp_path), train=str(tmp_path / "val.txt"),
                      val=str(tmp_path / "val.txt"), classes=str(tmp_path / "classes.txt"), frames=8, rate=8,
                      test_scale=64, test_crop=64, test_clips=1, test_crops=1, workers=0)
    report = evaluate_checkpoint(tmp_path / "out.pt", Config(data=data), batch_size=2)
    assert report["videos"] == 2 and 0.0 <= report["top1"] <= 1.0
    with pytest.raises(ValueError, match="holds weights without a data set; pass a config"):
        evaluate_checkpoint(tmp_path / "out.pt")
    (tmp_path / "few.txt").write_text("playing guitar\nzumba\n")
    data.classes = str(tmp_path / "few.txt")
    (tmp_path / "val.txt").write_text("a.mp4 0\nb.mp4 1\n")
    with pytest.raises(ValueError, match="the model's 400 classes differ from data.val's 2"):
        evaluate_checkpoint(tmp_path / "out.pt", Config(data=data), batch_size=2)
