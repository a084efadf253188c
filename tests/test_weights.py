"""Weights: official Caffe2 checkpoints built here from the official naming, 2-D inflation, our files."""

import io
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from conftest import rel_err
from nonlocalnet import create_model
from nonlocalnet.cli import main
from nonlocalnet.weights import (
    convert_caffe2, inflate_torchvision, load_caffe2_blobs, load_weights, read_weights, save_weights,
)

BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
I3D_TEMPORAL = {2: {0, 1, 2}, 3: {0, 2}, 4: {0, 2, 4}, 5: {1}}  # R50, official obtain_arc


def official_blobs(depth=50, i3d=True, nonlocal_positions=None, classes=400, *, affine=False, two_d=False,
                   seed=0):
    """A checkpoint in the official layout (docs/paper.md §5), written from the naming rules alone."""
    rng = np.random.default_rng(seed)
    blobs = {}

    def conv(name, out, inp, t, k):
        shape = (out, inp, k, k) if two_d else (out, inp, t, k, k)
        blobs[name + "_w"] = rng.normal(0, (2 / (inp * t * k * k)) ** 0.5, shape).astype(np.float32)

    def bn(prefix, c):
        blobs[prefix + "_s"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        blobs[prefix + "_b"] = rng.normal(0, 0.1, c).astype(np.float32)
        if not affine:
            blobs[prefix + "_rm"] = rng.normal(0, 0.1, c).astype(np.float32)
            blobs[prefix + "_riv"] = rng.uniform(0.5, 2.0, c).astype(np.float32)

    conv("conv1", 64, 3, 5 if i3d else 1, 7)
    bn("res_conv1_bn", 64)
    channels = 64
    for s, count in zip((2, 3, 4, 5), BLOCKS[depth]):
        inner, out = 64 * 2 ** (s - 2), 256 * 2 ** (s - 2)
        for i in range(count):
            prefix = f"res{s}_{i}_"
            t = 3 if i3d and (i in I3D_TEMPORAL[s] if depth == 50 else (i % 2 == 0 if s == 4 else i in I3D_TEMPORAL[s])) else 1
            conv(prefix + "branch2a", inner, channels, t, 1)
            conv(prefix + "branch2b", inner, inner, 1, 3)
            conv(prefix + "branch2c", out, inner, 1, 1)
            for branch in ("branch2a", "branch2b"):
                bn(prefix + branch + "_bn", inner)
            bn(prefix + "branch2c_bn", out)
            if i == 0:
                conv(prefix + "branch1", out, channels, 1, 1)
                bn(prefix + "branch1_bn", out)
            channels = out
            if i in (nonlocal_positions or {}).get(s, ()):
                nl = f"nonlocal_conv{s}_{i}_"
                for name in ("theta", "phi", "g"):
                    conv(nl + name, out // 2, out, 1, 1)
                    blobs[nl + name + "_b"] = rng.normal(0, 0.1, out // 2).astype(np.float32)
                conv(nl + "out", out, out // 2, 1, 1)
                blobs[nl + "out_b"] = rng.normal(0, 0.1, out).astype(np.float32)
                if not affine:
                    bn(nl + "bn", out)
    blobs["pred_w"] = rng.normal(0, 0.01, (classes, 2048)).astype(np.float32)
    blobs["pred_b"] = rng.normal(0, 0.01, classes).astype(np.float32)
    for name in ["conv1_w", "res2_0_branch2a_bn_s", "pred_b"]:  # the real files hold one per parameter
        blobs[name + "_momentum"] = np.zeros_like(blobs[name])
    blobs["lr"] = np.array(0.0001, dtype=np.float32)
    blobs["model_iter"] = 400000
    return blobs


class _Python2Pickler(pickle._Pickler):
    """Protocol 2 as Python 2's cPickle wrote it: str as (SHORT_)BINSTRING bytes, numpy.core names."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_string(self, obj):
        raw = obj if isinstance(obj, bytes) else obj.encode("latin1")
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = dispatch[str] = save_py2_string

    def save_global(self, obj, name=None):
        module = "numpy" if obj is np.ndarray or obj is np.dtype else obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)

    dispatch[type] = save_global


def write_pkl(path, blobs):
    """An official-style .pkl: ``{'blobs': {...}}`` pickled as the Python 2 writer did."""
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump({"blobs": blobs})
    data = buffer.getvalue()
    assert b"_codecs" not in data and b"numpy.core.multiarray\n_reconstruct" in data
    path.write_bytes(data)
    return path


R50_NL5 = {3: (1, 3), 4: (1, 3, 5)}


def test_official_checkpoint_converts_completely_and_lands_by_name(tmp_path):
    blobs = official_blobs(nonlocal_positions=R50_NL5)
    path = write_pkl(tmp_path / "i3d_nonlocal_8x8_IN_pretrain_400k.pkl", blobs)
    loaded = load_caffe2_blobs(path)
    assert set(loaded) == set(blobs)
    model = create_model("i3d_nl5_r50_8x8")
    conversion = convert_caffe2(loaded, model)
    assert conversion.complete, conversion.report()
    assert not conversion.inflated and len(conversion.dropped) == sum(n.endswith("_momentum") for n in blobs) + 2
    model.load_state_dict(conversion.state_dict, strict=True)
    sd = model.state_dict()
    expect = {
        "conv1.weight": "conv1_w", "res_conv1_bn.running_var": "res_conv1_bn_riv",
        "res2.0.branch1_bn.weight": "res2_0_branch1_bn_s", "res4.2.branch2a.weight": "res4_2_branch2a_w",
        "res4.5.nonlocal_block.theta.weight": "nonlocal_conv4_5_theta_w",
        "res3.1.nonlocal_block.phi.bias": "nonlocal_conv3_1_phi_b", "res3.3.nonlocal_block.g.weight": "nonlocal_conv3_3_g_w",
        "res4.1.nonlocal_block.out.weight": "nonlocal_conv4_1_out_w",
        "res4.3.nonlocal_block.norm.running_mean": "nonlocal_conv4_3_bn_rm",
        "res4.3.nonlocal_block.norm.running_var": "nonlocal_conv4_3_bn_riv",  # _riv is the variance itself
        "pred.weight": "pred_w",
    }
    for key, blob in expect.items():
        assert torch.equal(sd[key], torch.from_numpy(blobs[blob])), key
    for name, key in conversion.matched:
        assert torch.equal(sd[key].reshape(-1), torch.from_numpy(blobs[name]).reshape(-1)), (name, key)
    assert len(conversion.matched) == len([k for k in sd if not k.endswith("num_batches_tracked")])


def test_convert_command_writes_a_file_that_create_model_loads(tmp_path, capsys):
    path = write_pkl(tmp_path / "c2d.pkl", official_blobs(i3d=False, nonlocal_positions=R50_NL5, seed=1))
    out = tmp_path / "c2d_nl5_r50.pt"
    assert main(["convert", str(path), str(out), "--model", "c2d_nl5_r50_8x8"]) == 0
    assert "matched" in capsys.readouterr().out
    payload = torch.load(out, weights_only=True)
    assert payload["model"] == "c2d_nl5_r50_8x8" and payload["meta"]["source"] == "c2d.pkl"
    model = create_model("c2d_nl5_r50_8x8", weights=out).eval()
    direct = create_model("c2d_nl5_r50_8x8").eval()
    direct.load_state_dict(convert_caffe2(load_caffe2_blobs(path), direct).state_dict)
    x = torch.randn(1, 3, 8, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), direct(x))
        assert not torch.allclose(model(x), create_model("c2d_nl5_r50_8x8").eval()(x))


def test_frozen_bn_model_folds_the_statistics_as_the_official_converter(tmp_path):
    blobs = official_blobs(seed=2)
    bn_model = create_model("i3d_r50_8x8").eval()
    affine_model = create_model("i3d_r50_32x4").eval()  # same network, every BN frozen to an affine
    bn_model.load_state_dict(convert_caffe2(blobs, bn_model).state_dict)
    conversion = convert_caffe2(blobs, affine_model)
    assert conversion.complete and len(conversion.folded) == 2 * 53
    affine_model.load_state_dict(conversion.state_dict)
    s, b, rm, riv = (blobs["res3_2_branch2b_bn" + x] for x in ("_s", "_b", "_rm", "_riv"))
    scale = s / np.sqrt(riv + 1e-5)
    assert np.allclose(affine_model.res3[2].branch2b_bn.weight.detach().numpy(), scale, rtol=1e-6)
    assert np.allclose(affine_model.res3[2].branch2b_bn.bias.detach().numpy(), b - rm * scale, rtol=1e-5, atol=1e-7)
    x = torch.randn(1, 3, 8, 64, 64)
    with torch.no_grad():
        assert rel_err(affine_model(x), bn_model(x)) < 1e-5
    # An affine checkpoint (the 128x1 / 32x4 models) loads into the frozen-BN model directly.
    affine_blobs = official_blobs(seed=3, affine=True, nonlocal_positions=R50_NL5)
    assert convert_caffe2(affine_blobs, create_model("i3d_nl5_r50_32x4")).complete


def test_imagenet_pretrain_inflates_with_init(tmp_path, capsys):
    path = write_pkl(tmp_path / "r50_pretrain_c2_model_iter450450_clean.pkl",
                     official_blobs(two_d=True, affine=True, classes=1000, seed=4))
    out = tmp_path / "init.pt"
    assert main(["convert", str(path), str(out), "--model", "i3d_nl5_r50"]) == 1
    assert not out.exists() and "--init" in capsys.readouterr().err
    assert main(["convert", str(path), str(out), "--model", "i3d_nl5_r50", "--init"]) == 0
    model = create_model("i3d_nl5_r50", weights=out)
    conversion = convert_caffe2(load_caffe2_blobs(path), create_model("i3d_nl5_r50"), skip_classifier=True)
    assert len(conversion.inflated) == 53 and not conversion.unmatched and not conversion.mismatched
    assert {k.split(".")[-1] for k in conversion.missing} >= {"running_mean", "running_var", "weight", "bias"}
    assert all(".nonlocal_block." in k or k.endswith(("running_mean", "running_var")) or k.startswith("pred.")
               for k in conversion.missing)
    w2d = load_caffe2_blobs(path)["res2_0_branch2a_w"]  # 53 convs; (64, 64, 1, 1) -> (64, 64, 3, 1, 1), each slice / 3
    assert torch.allclose(model.res2[0].branch2a.weight, torch.from_numpy(w2d)[:, :, None].expand(-1, -1, 3, -1, -1) / 3)


def test_checkpoints_of_another_model_say_which_blobs_do_not_fit(tmp_path, capsys):
    r101 = write_pkl(tmp_path / "r101.pkl", official_blobs(depth=101, i3d=False, seed=5))
    assert main(["convert", str(r101), str(tmp_path / "x.pt"), "--model", "c2d_r50"]) == 1
    printed = capsys.readouterr().out
    assert "unmatched (no model entry takes them): " in printed and "res4_6_branch2a_w (256, 1024, 1, 1, 1)" in printed
    c2d = official_blobs(i3d=False, seed=6)
    conversion = convert_caffe2(c2d, create_model("i3d_r50"))
    assert ("conv1_w", "conv1.weight", (64, 3, 1, 7, 7), (64, 3, 5, 7, 7)) in conversion.mismatched
    assert "shape mismatch (source vs model)" in conversion.report()


def test_loading_a_pkl_never_runs_code(tmp_path):
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"blobs": {"conv1_w": Exploit()}}, protocol=2))
    with pytest.raises(ValueError, match=r"refusing to load global (posix|os|nt)\.system"):
        load_caffe2_blobs(path)
    assert not marker.exists()
    with pytest.raises(FileNotFoundError, match="path: expected an official Caffe2 .pkl"):
        load_caffe2_blobs(tmp_path / "absent.pkl")
    (tmp_path / "bad.pkl").write_bytes(b"\x80\x02}q\x00(U")
    with pytest.raises(ValueError, match="not a readable Caffe2 checkpoint"):
        load_caffe2_blobs(tmp_path / "bad.pkl")


def test_our_weights_files_are_atomic_weights_only_and_checked(tmp_path):
    model = create_model("c2d_nl1_r50_8x8", num_classes=5)
    path = tmp_path / "w.pt"
    save_weights(model, path, model="c2d_nl1_r50_8x8", meta={"epoch": 3})
    assert sorted(os.listdir(tmp_path)) == ["w.pt"]  # no temporary file left behind
    payload = torch.load(path, weights_only=True)
    assert payload["meta"] == {"epoch": 3} and payload["format"] == "nonlocalnet.weights/1"
    other = create_model("c2d_nl1_r50_8x8", num_classes=5)
    load_weights(other, path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    torch.save(model.state_dict(), tmp_path / "bare.pt")  # a plain state dict also loads
    assert read_weights(tmp_path / "bare.pt")["format"] is None
    with pytest.raises(ValueError, match=r"does not fit the model\nmissing \(65\): res3\.1\.nonlocal_block.*\nunexpected \(13\): res4\.4\.nonlocal_block\.theta\.weight \(512, 1024, 1, 1, 1\).*\nshape mismatch.*pred.weight: file \(5, 2048\), model \(400, 2048\)"):
        load_weights(create_model("c2d_nl5_r50"), path)
    with pytest.raises(ValueError, match="is not a loadable weights file"):
        (tmp_path / "evil.pt").write_bytes(pickle.dumps({"x": os.getcwd}, protocol=2))
        read_weights(tmp_path / "evil.pt")


def _torchvision_resnet(depth):
    torchvision = pytest.importorskip("torchvision")
    net = getattr(torchvision.models, f"resnet{depth}")(weights=None).eval()
    with torch.no_grad():  # statistics and affine values away from the identity
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 2), m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    net.maxpool = torch.nn.MaxPool2d(3, 2, padding=0)  # the official pool1 has no padding
    return net


def _features_2d(net, image):
    x = net.maxpool(net.relu(net.bn1(net.conv1(image))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


@pytest.mark.parametrize("name, frames", [("c2d_r50_8x8", 8), ("i3d_r50_8x8", 40)])
def test_inflated_torchvision_resnet_gives_the_2d_features_on_a_still_clip(name, frames, tmp_path):
    net = _torchvision_resnet(50)
    model = create_model(name, num_classes=1000).eval()
    conversion = inflate_torchvision(net.state_dict(), model)
    assert not conversion.unmatched and not conversion.mismatched and not conversion.missing
    model.load_state_dict(conversion.state_dict)
    image = torch.randn(1, 3, 64, 64)
    clip = image[:, :, None].expand(-1, -1, frames, -1, -1)
    with torch.no_grad():
        expected = _features_2d(net, image)
        features = model.forward_features(clip)  # (1, 2048, T', 2, 2)
        logits = net(image)
    if name.startswith("c2d"):  # every frame is the image
        assert rel_err(features, expected[:, :, None].expand_as(features)) < 1e-5
        assert rel_err(model(clip), logits) < 1e-5
    else:  # zero temporal padding only reaches the edge frames; the middle is exactly 2-D
        assert rel_err(features[:, :, features.shape[2] // 2], expected) < 1e-5
        assert rel_err(features[:, :, 0], expected) > 1e-2
    path = tmp_path / "tv.pth"
    torch.save(net.state_dict(), path)
    assert main(["inflate", str(path), str(tmp_path / "out.pt"), "--model", name, "--num-classes", "1000"]) == 0
    # the file records ImageNet's input normalisation: pipeline-normalised pixels in, what the
    # weights see on ImageNet-normalised ones out
    inflated = create_model(name, num_classes=1000, weights=tmp_path / "out.pt").eval()
    pixels = torch.rand(1, 3, frames, 64, 64) * 255
    mean, std = (torch.tensor(v).view(1, 3, 1, 1, 1) for v in ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    with torch.no_grad():
        assert rel_err(inflated((pixels - 114.75) / 57.375), model((pixels / 255 - mean) / std)) < 1e-5


def test_blobs_that_are_not_numeric_arrays_are_refused_by_name(tmp_path):
    model = create_model("c2d_r50_8x8")
    with pytest.raises(ValueError, match=r"blobs\['conv1_w'\]: expected a numeric numpy array, got dtype object"):
        convert_caffe2({"conv1_w": np.array([{}], dtype=object)}, model)
    with pytest.raises(ValueError, match=r"blobs\['pred_b'\]: expected a numeric numpy array, got str"):
        convert_caffe2({"pred_b": "abc"}, model)
    save_weights(model, tmp_path / "w.pt")
    assert os.stat(tmp_path / "w.pt").st_mode & 0o777 == 0o666 & ~_umask()


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask
