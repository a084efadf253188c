"""Weights: official Caffe2 checkpoints, 2-D ImageNet inflation, and our own checkpoints.

- :func:`load_caffe2_blobs` reads an official ``.pkl`` (a pickled ``{'blobs': {name: array}}``,
  shared/PAPER.md §4.4) with an unpickler that resolves only the globals numpy arrays need: a
  file cannot run code; a blob that is not a numeric array is then refused by name.
- :func:`convert_caffe2` maps every blob onto a model by the official naming (§4.3): ``conv1_w``
  -> ``conv1.weight``, ``res4_3_branch2a_bn_riv`` -> ``res4.3.branch2a_bn.running_var`` (``_riv``
  holds the variance, not its inverse), ``nonlocal_conv4_3_theta_w`` ->
  ``res4.3.nonlocal_block.theta.weight``, ``nonlocal_conv4_3_bn_s`` -> ``...nonlocal_block.norm.weight``,
  ``pred_w`` -> ``pred.weight``. Training state (``*_momentum``, ``lr``, ``model_iter``) is dropped.
- :func:`inflate_torchvision` maps a torchvision ResNet-50/101 state dict (``layer3.4.conv1.weight``
  -> ``res4.4.branch2a.weight``, ``fc`` -> ``pred``).
- :func:`convert_mmaction2` and :func:`convert_slowfast` map other libraries' trained C2D / I3D
  checkpoints (:func:`read_peer_checkpoint`) and say which model options (:func:`mmaction2_options`,
  :func:`slowfast_options`) make our model compute what theirs computes; the options are saved
  with the weights and :func:`nonlocalnet.create_model` applies them.
- Both inflate 2-D weights into 3-D kernels as the official initialisation does (each of the t
  temporal slices = the 2-D kernel / t) and fold BN statistics into a frozen-BN (:class:`Affine3d`)
  model with the official ``convert_to_finetune`` rule: scale s / sqrt(var + 1e-5), shift
  b - mean * scale.
- :func:`save_weights` writes atomically; :func:`load_weights` reads with
  ``torch.load(weights_only=True)``.

A conversion fills a complete state dict: entries the source lacks keep the model's current
(initial) values and are reported, so the result always loads strictly.
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from os import PathLike
from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn as nn
import yaml

from .checkpoint import atomic_save
from .models.resnet3d import Affine3d

__all__ = ["Conversion", "load_caffe2_blobs", "convert_caffe2", "inflate_torchvision", "save_weights",
           "read_weights", "load_weights", "caffe2_name", "FORMAT", "read_peer_checkpoint", "convert_mmaction2",
           "convert_slowfast", "mmaction2_options", "slowfast_options", "kinetics400_classes", "PEERS"]

FORMAT = "nonlocalnet.weights/1"
AFFINE_EPS = 1e-5  # official convert_to_finetune.py
_TRAINING_STATE = ("lr", "model_iter", "epoch")
_NORMS = (nn.BatchNorm3d, Affine3d)


# --------------------------------------------------------------------------------------------
# Reading official .pkl files without running code
# --------------------------------------------------------------------------------------------

def _numpy_core(name: str):
    for module in ("numpy._core." + name, "numpy.core." + name):
        try:
            return importlib.import_module(module)
        except ImportError:
            continue
    raise ImportError(f"numpy has no core.{name}")


def _allowed_globals() -> dict:
    multiarray, numeric = _numpy_core("multiarray"), _numpy_core("numeric")
    import _codecs
    import collections

    table = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
             ("_codecs", "encode"): _codecs.encode, ("collections", "OrderedDict"): collections.OrderedDict}
    for package in ("numpy.core", "numpy._core"):
        table[package + ".multiarray", "_reconstruct"] = multiarray._reconstruct
        table[package + ".multiarray", "scalar"] = multiarray.scalar
        if hasattr(numeric, "_frombuffer"):
            table[package + ".numeric", "_frombuffer"] = numeric._frombuffer
    return table


class _Refused(pickle.UnpicklingError):
    pass


class _ArraysOnly(pickle.Unpickler):
    """Resolves only the globals numpy arrays need; anything else is refused before it is looked up."""

    def __init__(self, file, **kwargs):
        super().__init__(file, **kwargs)
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str):
        allowed = self._allowed
        if (module, name) not in allowed:
            raise _Refused(
                f"refusing to load global {module}.{name}: an official checkpoint holds only numpy arrays"
            )
        return allowed[module, name]


def load_caffe2_blobs(path: str | PathLike) -> dict[str, np.ndarray]:
    """The named arrays of an official Caffe2 checkpoint (``{'blobs': {...}}`` or a flat dict)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: expected an official Caffe2 .pkl checkpoint, no file at {path!r}")
    try:
        with open(path, "rb") as f:
            data = _ArraysOnly(f, encoding="latin1").load()
    except _Refused as err:
        raise ValueError(f"{path}: not loaded: {err}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise ValueError(f"{path}: not a readable Caffe2 checkpoint ({type(err).__name__}: {err})") from None
    if isinstance(data, dict) and isinstance(data.get("blobs"), dict):
        data = data["blobs"]
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ValueError(f"{path}: expected a dict of named arrays (optionally under 'blobs'), got {type(data).__name__}")
    return {k: v for k, v in data.items()}


# --------------------------------------------------------------------------------------------
# The conversion report and the shared mapping step
# --------------------------------------------------------------------------------------------

@dataclass
class Conversion:
    """A complete state dict for a model and how each of its entries was obtained."""

    state_dict: dict[str, torch.Tensor]
    matched: list[tuple[str, str]] = field(default_factory=list)  # (source name, model key)
    inflated: list[str] = field(default_factory=list)  # model keys made 3-D from 2-D
    folded: list[str] = field(default_factory=list)  # Affine3d keys computed from BN statistics
    dropped: list[str] = field(default_factory=list)  # training state (momentum, lr, iteration)
    unmatched: list[tuple[str, tuple]] = field(default_factory=list)  # (source name, shape) nothing takes
    missing: list[str] = field(default_factory=list)  # model keys the source lacks (kept as initialised)
    zeroed: list[str] = field(default_factory=list)  # model keys the source has no parameter for, 0 there
    mismatched: list[tuple[str, str, tuple, tuple]] = field(default_factory=list)  # name, key, source, model shape

    @property
    def complete(self) -> bool:
        """Every source entry used and every model entry set from it, shapes agreeing."""
        return not (self.unmatched or self.missing or self.mismatched)

    def report(self, limit: int = 20) -> str:
        lines = [f"matched {len(self.matched)} (inflated 2-D -> 3-D: {len(self.inflated)}, folded into affine: "
                 f"{len(self.folded)}), dropped training state {len(self.dropped)}"
                 + (f", zero where the source has no parameter: {len(self.zeroed)} ({self.zeroed[0]}, ...)"
                    if self.zeroed else "")]
        sections = [
            ("unmatched (no model entry takes them)", [f"{n} {tuple(s)}" for n, s in self.unmatched]),
            ("shape mismatch (source vs model)", [f"{n} {tuple(a)} -> {k} {tuple(b)}" for n, k, a, b in self.mismatched]),
            ("missing (kept as initialised)", self.missing),
        ]
        for title, items in sections:
            if items:
                lines.append(f"{title}: {len(items)}")
                lines += [f"  {item}" for item in items[:limit]]
                if len(items) > limit:
                    lines.append(f"  ... and {len(items) - limit} more")
        return "\n".join(lines)


def _inflate(weight: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """A 2-D conv kernel (O, I, kH, kW) spread over the t temporal slices of (O, I, t, kH, kW), / t."""
    if weight.dim() != 4 or len(shape) != 5 or tuple(weight.shape) != (shape[0], shape[1], shape[3], shape[4]):
        return None
    return weight.unsqueeze(2).expand(shape).div(shape[2]).contiguous()


def _assemble(model: nn.Module, source: Mapping[str, torch.Tensor], name_of: Callable[[str, bool, str], str],
              stats: tuple[str, str], dropped: list[str], skip_shape: Callable[[str], bool] = lambda key: False,
              zero: Callable[[str], bool] = lambda key: False) -> Conversion:
    """Fill the model's state dict from ``source`` entries named by ``name_of(module, is_norm, param)``.

    ``stats`` are the param names under which ``name_of`` finds BN mean and variance, used to fold
    into an :class:`Affine3d`. ``skip_shape(key)``: a shape mismatch there counts as missing (a
    classifier for another number of classes). ``zero(key)``: a key the source cannot have (a
    bias its layer lacks) is set to 0 when absent, which computes what the source computes.
    """
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    result = Conversion(state, dropped=dropped)
    used = set()
    modules = dict(model.named_modules())
    for key, target in state.items():
        module_name, _, param = key.rpartition(".")
        module = modules[module_name]
        if param == "num_batches_tracked":
            continue
        is_norm = isinstance(module, _NORMS)
        name = name_of(module_name, is_norm, param)
        if isinstance(module, Affine3d) and all(name_of(module_name, True, s) in source for s in stats):
            mean, var = (source[name_of(module_name, True, s)] for s in stats)
            scale = source[name_of(module_name, True, "weight")] / torch.sqrt(var + AFFINE_EPS)
            value = scale if param == "weight" else source[name] - mean * scale
            used.update(name_of(module_name, True, s) for s in (*stats, "weight", "bias"))
            state[key] = value.to(target.dtype)
            result.folded.append(key)
            result.matched.append((name, key))
            continue
        if name not in source:
            if zero(key):
                state[key] = torch.zeros_like(target)
                result.zeroed.append(key)
            else:
                result.missing.append(key)
            continue
        used.add(name)
        value = source[name]
        if value.shape != target.shape:
            inflated = _inflate(value, target.shape)
            if inflated is None:
                if skip_shape(key):
                    result.missing.append(key)
                else:
                    result.mismatched.append((name, key, tuple(value.shape), tuple(target.shape)))
                continue
            value = inflated
            result.inflated.append(key)
        state[key] = value.to(target.dtype).reshape(target.shape)
        result.matched.append((name, key))
    result.unmatched = [(n, tuple(v.shape)) for n, v in source.items() if n not in used]
    return result


# --------------------------------------------------------------------------------------------
# Official Caffe2 checkpoints
# --------------------------------------------------------------------------------------------

_CAFFE2_SUFFIX = {
    True: {"weight": "_s", "bias": "_b", "running_mean": "_rm", "running_var": "_riv"},
    False: {"weight": "_w", "bias": "_b"},
}


def caffe2_name(module: str, is_norm: bool, param: str) -> str:
    """The official blob name of ``module.param`` in a :class:`~nonlocalnet.models.ResNet3d`."""
    parts = module.split(".")
    if len(parts) == 4 and parts[2] == "nonlocal_block":  # res4.3.nonlocal_block.theta
        stage, index, _, sub = parts
        prefix = f"nonlocal_conv{stage[3:]}_{index}_{'bn' if sub == 'norm' else sub}"
    else:  # conv1, res_conv1_bn, pred, res4.3.branch2a_bn
        prefix = "_".join(parts)
    return prefix + _CAFFE2_SUFFIX[is_norm].get(param, "_" + param)


def convert_caffe2(blobs: Mapping[str, object], model: nn.Module, *, skip_classifier: bool = False) -> Conversion:
    """Map official blobs onto ``model`` (a :class:`~nonlocalnet.models.ResNet3d`).

    2-D blobs (the ImageNet pretrain) are inflated; a BN checkpoint loaded into a frozen-BN model
    is folded into the affine form. ``skip_classifier``: a ``pred`` of another shape (1000
    ImageNet classes) keeps its initialisation instead of being a mismatch.
    """
    source, dropped = {}, []
    for name, value in blobs.items():
        if name.endswith("_momentum") or name in _TRAINING_STATE:
            dropped.append(name)
            continue
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "fiub":
            got = f"dtype {value.dtype}" if isinstance(value, np.ndarray) else type(value).__name__
            raise ValueError(f"blobs[{name!r}]: expected a numeric numpy array, got {got}")
        source[name] = torch.from_numpy(np.array(value, dtype=np.float32, copy=True))
    return _assemble(model, source, caffe2_name, ("running_mean", "running_var"), dropped,
                     skip_shape=lambda key: skip_classifier and key.startswith("pred."))


# --------------------------------------------------------------------------------------------
# torchvision 2-D ResNets
# --------------------------------------------------------------------------------------------

_TV_BRANCH = {"branch2a": "conv1", "branch2b": "conv2", "branch2c": "conv3", "branch2a_bn": "bn1",
              "branch2b_bn": "bn2", "branch2c_bn": "bn3", "branch1": "downsample.0", "branch1_bn": "downsample.1"}
_TV_TOP = {"conv1": "conv1", "res_conv1_bn": "bn1", "pred": "fc"}


def _torchvision_name(module: str, is_norm: bool, param: str) -> str:
    if module in _TV_TOP:
        return f"{_TV_TOP[module]}.{param}"
    parts = module.split(".")
    if len(parts) == 3 and parts[0].startswith("res"):  # res4.3.branch2a -> layer3.3.conv1
        sub = _TV_BRANCH.get(parts[2], parts[2])
        return f"layer{int(parts[0][3:]) - 1}.{parts[1]}.{sub}.{param}"
    return f"<none: {module}.{param}>"  # non-local blocks have no 2-D counterpart


def inflate_torchvision(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> Conversion:
    """Inflate a torchvision ResNet-50/101 state dict (ImageNet, a file the user has) into ``model``.

    Non-local blocks keep their initialisation (the identity); ``fc`` is used when its shape fits
    ``pred`` and otherwise left initialised. torchvision's stride-2 3x3 matches the official
    bottleneck (stride on branch2b); its padded 3x3 max-pool differs from the official pool1
    (no padding), which only shifts the pooling grid.
    """
    source = {k: v.float() for k, v in state_dict.items() if torch.is_tensor(v) and not k.endswith("num_batches_tracked")}
    dropped = [k for k in state_dict if k.endswith("num_batches_tracked")]
    return _assemble(model, source, _torchvision_name, ("running_mean", "running_var"), dropped,
                     skip_shape=lambda key: key.startswith("pred."))


# --------------------------------------------------------------------------------------------
# Other libraries' checkpoints: mmaction2 and PySlowFast
# --------------------------------------------------------------------------------------------

PEERS = ("caffe2", "mmaction2", "slowfast")
PEER_BN_EPS = 1e-5  # PyTorch's default, which both use
IMAGENET_PIXELS = ([123.675, 116.28, 103.53], [58.395, 57.12, 57.375])  # torchvision, mmaction2 (0-255 RGB)
_SOFTMAX = {"softmax": "embedded_gaussian", "dot_product": "dot_product"}  # PySlowFast's instantiations


def kinetics400_classes() -> list[str]:
    """The 400 Kinetics class names in their usual (sorted) index order, which the official release,
    mmaction2 (``label_map_k400.txt``) and PySlowFast use."""
    from importlib import resources

    return (resources.files("nonlocalnet") / "kinetics400.txt").read_text().splitlines()


def _torch_load(path: str, what: str) -> object:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"source: expected {what}, no file at {path!r}")
    if not zipfile.is_zipfile(path):
        hint = " (a Caffe2 pickle, as PySlowFast's I3D_NLN_8x8_R50.pkl: convert it with --from caffe2)" \
            if path.endswith(".pkl") else ""
        raise ValueError(f"source: expected {what} (a torch.save zip file), got {path}{hint}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # numpy scalars in a training script's metadata: allow those, nothing else
        pass
    except Exception as err:
        raise ValueError(f"source: {path} is not a readable checkpoint ({type(err).__name__}: {err})") from None
    try:
        with torch.serialization.safe_globals(list(_allowed_globals().values())):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"source: {path} holds objects other than tensors, numbers, strings and numpy arrays; "
                         f"not loaded ({type(err).__name__}: {str(err).splitlines()[0]})") from None


def read_peer_checkpoint(path: str | PathLike, peer: str) -> tuple[dict[str, torch.Tensor], str]:
    """The model state dict of an mmaction2 (``{'meta', 'state_dict'}``) or PySlowFast
    (``{'model_state', 'cfg', ...}``) checkpoint, or of a bare state dict, and the training
    configuration text it carries ('' if none): mmengine's ``meta['cfg']``, PySlowFast's ``cfg``.
    A ``module.`` prefix (a DistributedDataParallel wrapper) is removed."""
    if peer not in ("mmaction2", "slowfast"):
        raise ValueError(f"peer: expected 'mmaction2' or 'slowfast', got {peer!r}")
    path = os.fspath(path)
    data = _torch_load(path, {"mmaction2": "an mmaction2 .pth", "slowfast": "a PySlowFast .pyth"}[peer])
    wrapper = {"mmaction2": "state_dict", "slowfast": "model_state"}[peer]
    config = ""
    if isinstance(data, dict):
        meta = data["meta"] if isinstance(data.get("meta"), dict) else {}
        texts = [t for t in (meta.get("cfg"), meta.get("config"), data.get("cfg")) if isinstance(t, str)]
        config = texts[0] if texts else ""
        if isinstance(data.get(wrapper), dict):
            data = data[wrapper]
    if not isinstance(data, dict) or not data or not all(isinstance(k, str) and torch.is_tensor(v)
                                                         for k, v in data.items()):
        keys = list(data)[:6] if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"source: expected a state dict of tensors (or one under '{wrapper}') in {path}, got {keys}")
    state = {k.removeprefix("module."): v for k, v in data.items()}
    return state, config


def _peer_source(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    source = {k: v.float() for k, v in state.items() if not k.endswith("num_batches_tracked")}
    return source, [k for k in state if k.endswith("num_batches_tracked")]


def _config_value(text: str, anchor: str, key: str) -> str | None:
    """``key=value`` inside the Python-syntax config text following ``anchor`` (mmengine's
    pretty_text of ``non_local_cfg=dict(...)``), or None."""
    start = text.find(anchor)
    if start < 0:
        return None
    found = re.search(rf"\b{key}\s*=\s*(?:'([^']*)'|\"([^\"]*)\"|(True|False))", text[start:start + 600])
    return None if found is None else next(g for g in found.groups() if g is not None)


def mmaction2_options(state: Mapping[str, torch.Tensor], config: str = "", *, mode: str | None = None,
                      scale: bool | None = None) -> dict:
    """The :class:`~nonlocalnet.models.ResNet3d` options under which a zoo model computes what an
    mmaction2 ``ResNet3d`` + ``I3DHead`` recognizer with these weights computes.

    Always: its stem (pool1 [1,3,3] padded, stride 2 in time), BN epsilon 1e-5 and ImageNet input
    normalisation. Its ``NonLocal3d`` blocks: the key/value max-pool after the phi / g convs when
    ``sub_sample`` (``g.0.conv`` keys), the norm of ``conv_out`` (BN, or none), and ``mode`` and
    ``use_scale`` from the arguments, else from the config text, else what the keys show
    (Gaussian blocks have no theta) and ``use_scale=False``, the value of mmaction2's non-local
    configs. Embedded Gaussian and dot product have the same keys: without a config saying which,
    ``mode`` must be given.
    """
    options: dict = {"stem": "mmaction2", "bn_eps": PEER_BN_EPS, "pixel_mean": list(IMAGENET_PIXELS[0]),
                     "pixel_std": list(IMAGENET_PIXELS[1])}
    blocks = [k for k in state if ".non_local_block." in k]
    if not blocks:
        return options
    has_theta = any(".non_local_block.theta." in k for k in blocks)
    from_keys = "gaussian" if not has_theta else "concatenation" if any(".concat_project." in k for k in blocks) \
        else None
    mode = mode or _config_value(config, "non_local_cfg", "mode") or from_keys
    if mode is None:
        raise ValueError("mode: the checkpoint's non-local blocks may be 'embedded_gaussian' or 'dot_product' (same "
                         "keys) and it holds no config saying which; pass --mode")
    if (mode == "gaussian") == has_theta:
        raise ValueError(f"mode: {mode!r} does not fit the checkpoint, whose non-local blocks "
                         f"{'have' if has_theta else 'have no'} theta convs")
    if scale is None:
        found_scale = _config_value(config, "non_local_cfg", "use_scale")
        scale = found_scale == "True" if found_scale is not None else False
    norms = {k.split(".conv_out.")[1].split(".")[0] for k in blocks if ".conv_out." in k} - {"conv"}
    if norms - {"bn"}:
        raise ValueError(f"source: non-local conv_out norms {sorted(norms)}: only BN ('bn') or none is converted")
    options["nonlocal_options"] = {
        "mode": mode, "pool": "after", "subsample": any(".non_local_block.g.0." in k for k in blocks),
        "scale": bool(scale) if mode == "embedded_gaussian" else False, "norm": "batch" if norms else "none",
    }
    return options


_MM_TOP = {"conv1": "backbone.conv1.conv", "res_conv1_bn": "backbone.conv1.bn", "pred": "cls_head.fc_cls"}
_MM_BRANCH = {"branch2a": "conv1.conv", "branch2a_bn": "conv1.bn", "branch2b": "conv2.conv", "branch2b_bn": "conv2.bn",
              "branch2c": "conv3.conv", "branch2c_bn": "conv3.bn", "branch1": "downsample.conv",
              "branch1_bn": "downsample.bn"}
_MM_NONLOCAL = {"theta": "theta.conv", "phi": "phi{pool}.conv", "g": "g{pool}.conv", "out": "conv_out.conv",
                "norm": "conv_out.bn", "concat": "concat_project.conv"}


def _mmaction2_name(pooled: bool) -> Callable[[str, bool, str], str]:
    def name_of(module: str, is_norm: bool, param: str) -> str:
        if module in _MM_TOP:
            return f"{_MM_TOP[module]}.{param}"
        parts = module.split(".")
        layer = f"backbone.layer{int(parts[0][3:]) - 1}.{parts[1]}" if parts[0].startswith("res") else None
        if layer and len(parts) == 3 and parts[2] in _MM_BRANCH:
            return f"{layer}.{_MM_BRANCH[parts[2]]}.{param}"
        if layer and len(parts) == 4 and parts[2] == "nonlocal_block" and parts[3] in _MM_NONLOCAL:
            return f"{layer}.non_local_block.{_MM_NONLOCAL[parts[3]].format(pool='.0' if pooled else '')}.{param}"
        return f"<none: {module}.{param}>"
    return name_of


def convert_mmaction2(state: Mapping[str, torch.Tensor], model: nn.Module, *,
                      skip_classifier: bool = False) -> Conversion:
    """Map an mmaction2 recognizer state dict (``backbone.layer3.1.conv1.conv.weight`` ->
    ``res4.1.branch2a.weight``, ``backbone.layer2.1.non_local_block.phi.0.conv.weight`` ->
    ``res3.1.nonlocal_block.phi.weight``, ``cls_head.fc_cls`` -> ``pred``) onto ``model``, built
    with :func:`mmaction2_options`. Their ``conv_out`` before a BN has no bias: ours is set to 0."""
    source, dropped = _peer_source(state)
    pooled = any(".non_local_block.g.0." in k for k in source)
    return _assemble(model, source, _mmaction2_name(pooled), ("running_mean", "running_var"), dropped,
                     skip_shape=lambda key: skip_classifier and key.startswith("pred."),
                     zero=lambda key: key.endswith(".nonlocal_block.out.bias"))


def slowfast_options(state: Mapping[str, torch.Tensor], config: str = "", *, mode: str | None = None) -> dict:
    """The :class:`~nonlocalnet.models.ResNet3d` options under which a zoo model computes what a
    PySlowFast ``ResNet`` (``MODEL.ARCH`` c2d or i3d) with these weights computes: its stem
    (pool1 padded), BN epsilon 1e-5, its ``DATA.MEAN`` / ``DATA.STD``, and for its ``Nonlocal``
    blocks (pool before the convs as ours, logits x 1/sqrt(C')) ``NONLOCAL.INSTANTIATION``
    (``softmax`` or ``dot_product``; ``mode`` overrides it, and is needed without a config) and
    ``NONLOCAL.POOL`` per stage. A config of another architecture (SlowFast, X3D, C2D without
    pool2, temporal groups) is an error."""
    cfg = {}
    if config:
        try:
            cfg = yaml.safe_load(config) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"source: its 'cfg' is not YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(cfg, dict):
            raise ValueError(f"source: its 'cfg' is not a PySlowFast config (YAML of {type(cfg).__name__})")
    arch = (cfg.get("MODEL") or {}).get("ARCH", "i3d")
    if arch not in ("i3d", "c2d"):
        raise ValueError(f"source: MODEL.ARCH {arch!r}: only PySlowFast's C2D and I3D ResNets (with pool2) convert")
    data = cfg.get("DATA") or {}
    options: dict = {"stem": "slowfast", "bn_eps": PEER_BN_EPS}
    for key, name in (("MEAN", "pixel_mean"), ("STD", "pixel_std")):
        if key in data:
            options[name] = [float(v) * 255.0 for v in data[key]]
    blocks = [k for k in state if ".pathway0_nonlocal" in k]
    if not blocks:
        return options
    nonlocal_cfg = cfg.get("NONLOCAL") or {}
    instantiation = nonlocal_cfg.get("INSTANTIATION")
    if mode is None and instantiation is not None:
        if instantiation not in _SOFTMAX:
            raise ValueError(f"source: NONLOCAL.INSTANTIATION {instantiation!r}: expected 'softmax' or 'dot_product'")
        mode = _SOFTMAX[instantiation]
    if mode is None:
        raise ValueError("mode: the checkpoint holds no config with NONLOCAL.INSTANTIATION; pass --mode "
                         "(embedded_gaussian for 'softmax', or dot_product)")
    if mode not in _SOFTMAX.values():
        raise ValueError(f"mode: PySlowFast's blocks are 'embedded_gaussian' (softmax) or 'dot_product', got {mode!r}")
    if any(group != [1] and group != 1 for group in nonlocal_cfg.get("GROUP", [])):
        raise ValueError(f"source: NONLOCAL.GROUP {nonlocal_cfg['GROUP']}: temporal groups are not converted")
    options["nonlocal_options"] = {"mode": mode, "scale": True}
    stage_options = {}
    for stage, pools in zip(("res2", "res3", "res4", "res5"), nonlocal_cfg.get("POOL") or []):
        kernel = tuple(int(k) for k in pools[0])  # pathway 0
        if kernel != (1, 2, 2):
            stage_options[stage] = {"subsample": False} if kernel == (1, 1, 1) else {"pool_kernel": kernel}
    if stage_options:
        options["nonlocal_stage_options"] = stage_options
    return options


_SF_TOP = {"conv1": "s1.pathway0_stem.conv", "res_conv1_bn": "s1.pathway0_stem.bn", "pred": "head.projection"}
_SF_NONLOCAL = {"theta": "conv_theta", "phi": "conv_phi", "g": "conv_g", "out": "conv_out", "norm": "bn"}


def _slowfast_name(module: str, is_norm: bool, param: str) -> str:
    if module in _SF_TOP:
        return f"{_SF_TOP[module]}.{param}"
    parts = module.split(".")
    if parts[0].startswith("res") and len(parts) == 3 and parts[2].startswith("branch"):
        branch = parts[2]
        sub = branch if branch.startswith("branch1") else f"branch2.{branch[7:]}"  # branch2a_bn -> branch2.a_bn
        return f"s{parts[0][3:]}.pathway0_res{parts[1]}.{sub}.{param}"
    if parts[0].startswith("res") and len(parts) == 4 and parts[2] == "nonlocal_block" and parts[3] in _SF_NONLOCAL:
        return f"s{parts[0][3:]}.pathway0_nonlocal{parts[1]}.{_SF_NONLOCAL[parts[3]]}.{param}"
    return f"<none: {module}.{param}>"


def convert_slowfast(state: Mapping[str, torch.Tensor], model: nn.Module, *, skip_classifier: bool = False) -> Conversion:
    """Map a PySlowFast ``model_state`` (``s4.pathway0_res3.branch2.a_bn.running_var`` ->
    ``res4.3.branch2a_bn.running_var``, ``s3.pathway0_nonlocal1.conv_theta.weight`` ->
    ``res3.1.nonlocal_block.theta.weight``, ``...nonlocal1.bn`` -> ``...nonlocal_block.norm``,
    ``head.projection`` -> ``pred``) onto ``model``, built with :func:`slowfast_options`."""
    source, dropped = _peer_source(state)
    return _assemble(model, source, _slowfast_name, ("running_mean", "running_var"), dropped,
                     skip_shape=lambda key: skip_classifier and key.startswith("pred."))


# --------------------------------------------------------------------------------------------
# Our own checkpoints
# --------------------------------------------------------------------------------------------

def save_weights(weights: nn.Module | Mapping[str, torch.Tensor], path: str | PathLike, *, model: str | None = None,
                 meta: Mapping[str, object] | None = None, options: Mapping[str, object] | None = None,
                 classes: list[str] | None = None) -> None:
    """Write ``{"format", "model", "state_dict", "meta", "options", "classes"}`` atomically (a
    temporary file, then rename). ``options``: :class:`~nonlocalnet.models.ResNet3d` arguments over
    the zoo model's that the weights need (another library's conventions), applied by
    :func:`nonlocalnet.create_model`; ``classes``: the names of the classifier's outputs."""
    state = weights.state_dict() if isinstance(weights, nn.Module) else dict(weights)
    payload = {"format": FORMAT, "model": model, "state_dict": {k: v.detach().cpu() for k, v in state.items()},
               "meta": dict(meta or {}), "options": dict(options or {}),
               "classes": None if classes is None else [str(c) for c in classes]}
    atomic_save(payload, path)


def read_weights(path: str | PathLike, *, mmap: bool = False) -> dict:
    """The payload of a weights file (ours, or a bare state dict), read with ``weights_only=True``;
    with ``mmap`` the tensors of a zip file are mapped, not read (a look at the rest)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights: expected a weights file (.pt), no file at {path!r}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as err:  # a truncated zip, a pickle with code, ...: say which file
        raise ValueError(f"weights: {path} is not a loadable weights file ({type(err).__name__}: {err})") from None
    if isinstance(data, dict) and data.get("format") == FORMAT:
        return {"options": {}, "classes": None, **data}
    for wrapper in ("state_dict", "model"):  # common training-script layouts
        if isinstance(data, dict) and isinstance(data.get(wrapper), dict):
            data = data[wrapper]
    if not isinstance(data, dict) or not all(torch.is_tensor(v) for v in data.values()):
        raise ValueError(f"weights: expected a state dict of tensors in {path}, got {type(data).__name__}"
                         + (f" with keys {list(data)[:5]}" if isinstance(data, dict) else ""))
    return {"format": None, "model": None, "state_dict": data, "meta": {}, "options": {}, "classes": None}


def load_weights(model: nn.Module, path: str | PathLike, payload: dict | None = None) -> dict:
    """Load a weights file (or its ``payload``, already read) into ``model`` strictly; a ValueError
    lists what does not fit, with shapes."""
    payload = read_weights(path) if payload is None else payload
    state = payload["state_dict"]
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [f"{k} {tuple(v.shape)}" for k, v in state.items() if k not in own]
    wrong = [f"{k}: file {tuple(v.shape)}, model {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and v.shape != own[k].shape]
    if missing or unexpected or wrong:
        name = payload.get("model")
        parts = [f"weights: {os.fspath(path)}" + (f" (for {name})" if name else "") + " does not fit the model"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)):
            if items:
                parts.append(f"{title} ({len(items)}): " + "; ".join(items[:10]) + (" ..." if len(items) > 10 else ""))
        raise ValueError("\n".join(parts))
    model.load_state_dict(state)
    return payload

