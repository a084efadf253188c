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
from dataclasses import dataclass, field
from os import PathLike
from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn as nn

from .checkpoint import atomic_save
from .models.resnet3d import Affine3d

__all__ = ["Conversion", "load_caffe2_blobs", "convert_caffe2", "inflate_torchvision", "save_weights",
           "read_weights", "load_weights", "caffe2_name", "FORMAT"]

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
    mismatched: list[tuple[str, str, tuple, tuple]] = field(default_factory=list)  # name, key, source, model shape

    @property
    def complete(self) -> bool:
        """Every source entry used and every model entry set from it, shapes agreeing."""
        return not (self.unmatched or self.missing or self.mismatched)

    def report(self, limit: int = 20) -> str:
        lines = [f"matched {len(self.matched)} (inflated 2-D -> 3-D: {len(self.inflated)}, folded into affine: "
                 f"{len(self.folded)}), dropped training state {len(self.dropped)}"]
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
              ) -> Conversion:
    """Fill the model's state dict from ``source`` entries named by ``name_of(module, is_norm, param)``.

    ``stats`` are the param names under which ``name_of`` finds BN mean and variance, used to fold
    into an :class:`Affine3d`. ``skip_shape(key)``: a shape mismatch there counts as missing (a
    classifier for another number of classes).
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
# Our own checkpoints
# --------------------------------------------------------------------------------------------

def save_weights(weights: nn.Module | Mapping[str, torch.Tensor], path: str | PathLike, *, model: str | None = None,
                 meta: Mapping[str, object] | None = None) -> None:
    """Write ``{"format", "model", "state_dict", "meta"}`` atomically (a temporary file, then rename)."""
    state = weights.state_dict() if isinstance(weights, nn.Module) else dict(weights)
    payload = {"format": FORMAT, "model": model, "state_dict": {k: v.detach().cpu() for k, v in state.items()},
               "meta": dict(meta or {})}
    atomic_save(payload, path)


def read_weights(path: str | PathLike) -> dict:
    """The payload of a weights file (ours, or a bare state dict), read with ``weights_only=True``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights: expected a weights file (.pt), no file at {path!r}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated zip, a pickle with code, ...: say which file
        raise ValueError(f"weights: {path} is not a loadable weights file ({type(err).__name__}: {err})") from None
    if isinstance(data, dict) and data.get("format") == FORMAT:
        return data
    for wrapper in ("state_dict", "model"):  # common training-script layouts
        if isinstance(data, dict) and isinstance(data.get(wrapper), dict):
            data = data[wrapper]
    if not isinstance(data, dict) or not all(torch.is_tensor(v) for v in data.values()):
        raise ValueError(f"weights: expected a state dict of tensors in {path}, got {type(data).__name__}"
                         + (f" with keys {list(data)[:5]}" if isinstance(data, dict) else ""))
    return {"format": None, "model": None, "state_dict": data, "meta": {}}


def load_weights(model: nn.Module, path: str | PathLike) -> dict:
    """Load a weights file into ``model`` strictly; a ValueError lists what does not fit, with shapes."""
    payload = read_weights(path)
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

