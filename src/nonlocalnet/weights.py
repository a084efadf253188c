"""Weights: official Caffe2 checkpoints, 2-D ImageNet inflation, and our own checkpoints.

- :func:`load_caffe2_blobs` reads an official ``.pkl`` (a pickled ``{'blobs': {name: array}}``,
  docs/paper.md §5) with an unpickler that resolves only the globals numpy arrays need: a
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
- :func:`read_peer_checkpoint` reads mmaction2 / PySlowFast files with torch's weights-only
  unpickler; their training state that is not weights (mmengine's message hub) becomes inert
  :class:`Placeholder` objects, a global that serves only to run code is refused by name, and
  numpy arrays declaring far more bytes than the file holds are refused before allocation.
  Their config text is read without running it (:mod:`ast` for mmengine's Python, YAML for
  PySlowFast), with the library's defaults where it is silent.
- :func:`save_weights` writes atomically; :func:`load_weights` reads with
  ``torch.load(weights_only=True)``.

A conversion fills a complete state dict: entries the source lacks keep the model's current
(initial) values and are reported, so the result always loads strictly.
"""

from __future__ import annotations

import ast
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


_BOMB_MARGIN = 4  # an array may declare at most this many times the file's size (plus 1 MiB)


def _checked_reconstruct(limit: int) -> Callable:
    """numpy's ``_reconstruct``, refusing a declared size over ``limit`` bytes. numpy's own pickles
    declare an empty array and fill it from bytes in the file; a "bomb" declares terabytes."""
    reconstruct = _numpy_core("multiarray")._reconstruct

    def checked(subtype, shape, dtype):
        try:
            size = int(np.prod([int(n) for n in shape], dtype=object)) * np.dtype(dtype).itemsize
        except (TypeError, ValueError, OverflowError) as err:
            raise _Refused(f"an array of shape {shape!r} and dtype {dtype!r} ({err})") from None
        if size > limit:
            raise _Refused(f"an array declaring {size} bytes (shape {tuple(shape)}), far more than the file holds")
        return reconstruct(subtype, shape, dtype)

    return checked


def _empty_bytes(*args) -> bytes:
    """``bytes()``, as protocol 2 pickles an empty bytes object (the data of an empty array); with
    arguments (``bytes(10**12)``) it would allocate, so those are refused."""
    if args:
        raise _Refused(f"bytes{args!r}: only bytes() is unpickled")
    return b""


def _allowed_globals(limit: int = 1 << 62) -> dict:
    """The globals numpy arrays need, by (module, name); ``_reconstruct`` refuses more than ``limit`` bytes."""
    multiarray, numeric = _numpy_core("multiarray"), _numpy_core("numeric")
    import _codecs
    import collections

    table = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("builtins", "bytes"): _empty_bytes,
             ("__builtin__", "bytes"): _empty_bytes, ("_codecs", "encode"): _codecs.encode,
             ("collections", "OrderedDict"): collections.OrderedDict}
    reconstruct = _checked_reconstruct(limit)
    for package in ("numpy.core", "numpy._core"):
        table[package + ".multiarray", "_reconstruct"] = reconstruct
        table[package + ".multiarray", "scalar"] = multiarray.scalar
        if hasattr(numeric, "_frombuffer"):
            table[package + ".numeric", "_frombuffer"] = numeric._frombuffer
    return table


def _size_limit(path: str) -> int:
    return _BOMB_MARGIN * os.path.getsize(path) + (1 << 20)


class _Refused(pickle.UnpicklingError):
    pass


class _ArraysOnly(pickle.Unpickler):
    """Resolves only the globals numpy arrays need; anything else is refused before it is looked up."""

    def __init__(self, file, *, limit: int, **kwargs):
        super().__init__(file, **kwargs)
        self._allowed = _allowed_globals(limit)

    def find_class(self, module: str, name: str):
        allowed = self._allowed
        if (module, name) not in allowed:
            raise _Refused(
                f"refusing to load global {module}.{name}: an official checkpoint holds only numpy arrays"
            )
        return allowed[module, name]


def load_caffe2_blobs(path: str | PathLike) -> dict[str, np.ndarray]:
    """The named arrays of an official Caffe2 checkpoint (``{'blobs': {...}}`` or a flat dict).

    Read without running code: only numpy's array globals resolve, and an array declaring far more
    bytes than the file holds (a pickle "bomb") is refused before anything is allocated."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: expected an official Caffe2 .pkl checkpoint, no file at {path!r}")
    try:
        with open(path, "rb") as f:
            data = _ArraysOnly(f, limit=_size_limit(path), encoding="latin1").load()
    except _Refused as err:
        raise ValueError(f"{path}: not loaded: {err}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError, RecursionError, OverflowError) as err:
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


# Globals a checkpoint's pickle may name only to run code: refused by name. Every other global outside
# the tensor and numpy allowlists (mmengine's HistoryBuffer, ConfigDict, ``getattr`` for a method of
# one, ...) becomes an inert placeholder: nothing is imported or called, and a placeholder found
# among the weights is refused.
_CODE_MODULES = frozenset({"os", "posix", "nt", "subprocess", "sys", "shutil", "importlib", "runpy", "socket", "ctypes",
                           "pty", "code", "codeop", "webbrowser", "multiprocessing", "pickle", "marshal", "commands",
                           "popen2"})
_CODE_BUILTINS = frozenset({"eval", "exec", "compile", "__import__", "open", "input", "breakpoint", "exit", "quit",
                            "__builtins__", "globals", "locals", "vars", "setattr", "delattr"})


class Placeholder:
    """What a checkpoint's pickle built from a global that is not a tensor, number, string or numpy
    array (another library's training state): the global's name, the arguments and state it was given."""

    global_name = "?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.global_name} (not loaded)>"


def _placeholder(name: str) -> type:
    return type("Placeholder", (Placeholder,), {"global_name": name, "__qualname__": f"Placeholder[{name}]"})


def _code_global(name: str) -> bool:
    module, _, attribute = name.rpartition(".")
    root = module.split(".")[0]
    return root in _CODE_MODULES or (module in ("builtins", "__builtin__") and attribute in _CODE_BUILTINS)


def _type_name(value: object) -> str:
    if isinstance(value, Placeholder):
        return value.global_name
    return f"{type(value).__module__}.{type(value).__qualname__}".removeprefix("builtins.")


def _pickle_globals(path: str) -> set[str]:
    """The ``module.name`` globals a pickle file (or a torch zip file's pickle) names, read without
    unpickling; an empty set where it cannot be read."""
    import pickletools

    try:
        if zipfile.is_zipfile(path):
            return set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        with open(path, "rb") as f:
            found, strings, memo, pushed = set(), [], {}, None  # pushed: the string the last op pushed
            for op, arg, _ in pickletools.genops(f):
                string = None
                if op.name == "GLOBAL":
                    found.add(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:  # protocol 4: module, name pushed before
                    found.add(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str) and ("UNICODE" in op.name or "STRING" in op.name):
                    string = arg
                elif op.name == "MEMOIZE":
                    memo[len(memo)] = string = pushed
                elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
                    memo[arg] = string = pushed
                elif op.name in ("BINGET", "LONG_BINGET", "GET"):
                    string = memo.get(arg)
                if string is not None and op.name not in ("MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"):
                    strings.append(string)
                pushed = string
            return found
    except Exception:  # a damaged file: the caller's error stands
        return set()


def _torch_load(path: str, what: str) -> object:
    """A ``torch.save`` zip file read without running code: tensors, containers, numbers, strings and
    numpy arrays are loaded; objects of other classes (mmengine's message hub) become :class:`Placeholder`\\ s;
    a global that only serves to run code (``os.system``) is refused by name."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"source: expected {what}, no file at {path!r}")
    if not zipfile.is_zipfile(path):
        hint = " (a Caffe2 pickle, as PySlowFast's I3D_NLN_8x8_R50.pkl: convert it with --from caffe2)" \
            if path.endswith(".pkl") else ""
        raise ValueError(f"source: expected {what} (a torch.save zip file), got {path}{hint}")
    numpy_globals = {f"{module}.{name}": value for (module, name), value in _allowed_globals(_size_limit(path)).items()}
    numpy_globals.update({f"numpy.dtypes.{name}": getattr(np.dtypes, name) for name in dir(getattr(np, "dtypes", None))
                          if name.endswith("DType") and isinstance(getattr(np.dtypes, name), type)})  # dtype states
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as err:  # a truncated zip, a damaged pickle
        raise ValueError(f"source: {path} is not a readable checkpoint ({type(err).__name__}: {err})") from None
    refused = sorted(name for name in names if _code_global(name))
    if refused:
        raise ValueError(f"source: {path} names {', '.join(refused)}, which a checkpoint needs only to run code; "
                         f"not loaded")
    allowed = [(value, name) for name, value in numpy_globals.items()]
    allowed += [(_placeholder(name), name) for name in names if name not in numpy_globals]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # MemoryError, numpy's ValueError, a damaged file: one line naming the file
        raise ValueError(f"source: {path} is not a readable checkpoint ({type(err).__name__}: {_reason(err)})") \
            from None


def _reason(err: BaseException) -> str:
    """The sentence of an exception's message that says what went wrong (torch's weights-only
    errors wrap it in paragraphs of advice)."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(err)).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            rest = line.split("WeightsUnpickler error:", 1)[1].strip() or "".join(lines[i + 1:i + 2])
            return rest.split(". Please use")[0]
    said = [line for line in lines if not line.startswith(("Weights only load failed", "Check the documentation",
                                                            "(1)", "(2)"))]
    return said[0] if said else lines[0] if lines else ""


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
    if not isinstance(data, dict) or not data:
        got = _type_name(data) if not isinstance(data, dict) else "an empty dict"
        raise ValueError(f"source: expected a state dict of tensors (or one under '{wrapper}') in {path}, got {got}")
    odd = next(((k, v) for k, v in data.items() if not (isinstance(k, str) and torch.is_tensor(v))), None)
    if odd is not None:
        raise ValueError(f"source: expected a state dict of tensors (or one under '{wrapper}') in {path}, got "
                         f"{odd[0]!r}: {_type_name(odd[1])} among its {len(data)} entries ({list(data)[:4]} ...)")
    state = {k.removeprefix("module."): v for k, v in data.items()}
    return state, config


def _peer_source(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    source = {k: v.float() for k, v in state.items() if not k.endswith("num_batches_tracked")}
    return source, [k for k in state if k.endswith("num_batches_tracked")]


class _Unread:
    """A config value that is not a literal (a name, an expression): its source text."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _literal(node: ast.AST, source: str) -> object:
    """A config expression as Python values without running it: literals, ``dict(...)`` calls,
    ``[...]``, ``(...)``, ``{...}``; anything else becomes :class:`_Unread`."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        return {k.arg: _literal(k.value, source) for k in node.keywords if k.arg is not None}
    if isinstance(node, ast.Dict):
        return {_literal(k, source): _literal(v, source) for k, v in zip(node.keys, node.values) if k is not None}
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_literal(e, source) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    try:
        return ast.literal_eval(node)
    except ValueError:
        return _Unread(ast.get_source_segment(source, node) or type(node).__name__)


def _python_config(text: str) -> dict:
    """The top-level assignments of an mmengine / mmcv config's ``pretty_text`` (Python source), read
    with :mod:`ast`, never executed; {} for text that is not Python."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return {}
    values = {}
    for statement in tree.body:
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1 \
                and isinstance(statement.targets[0], ast.Name):
            values[statement.targets[0].id] = _literal(statement.value, text)
    return values


# mmaction2 1.2's ResNet3d arguments that change the function, with its signature's default and the
# value our "mmaction2" stem and bottlenecks compute (None: any value, checked elsewhere).
_MM_BACKBONE = {
    "conv1_stride_s": (2, 2), "conv1_stride_t": (1, 2), "pool1_stride_s": (2, 2), "pool1_stride_t": (1, 2),
    "with_pool1": (True, True), "with_pool2": (True, True), "style": ("pytorch", "pytorch"),
    "spatial_strides": ((1, 2, 2, 2), (1, 2, 2, 2)), "temporal_strides": ((1, 1, 1, 1), (1, 1, 1, 1)),
    "dilations": ((1, 1, 1, 1), (1, 1, 1, 1)), "inflate_style": ("3x1x1", "3x1x1"), "num_stages": (4, 4),
    "out_indices": ((3,), (3,)), "in_channels": (3, 3),
}
# mmcv's _NonLocalNd / NonLocal3d defaults for the keys of ResNet3d's non_local_cfg (default dict())
_MM_NONLOCAL_DEFAULTS = {"mode": "embedded_gaussian", "use_scale": True, "sub_sample": False, "norm_cfg": None}


def _same(value: object, expected: object) -> bool:
    if isinstance(expected, tuple) and isinstance(value, (list, tuple)):
        return len(value) == len(expected) and all(_same(v, e) for v, e in zip(value, expected))
    return type(value) is type(expected) and value == expected or (
        isinstance(value, (int, float)) and not isinstance(value, bool) and not isinstance(expected, bool)
        and isinstance(expected, (int, float)) and value == expected)


def _mm_model(config: str) -> dict | None:
    """The ``model`` dict of an mmaction2 config text, or None where the text has none."""
    model = _python_config(config).get("model") if config else None
    return model if isinstance(model, dict) and isinstance(model.get("backbone"), dict) else None


def _mm_type(part: dict, where: str, accepted: tuple[str, ...]) -> None:
    kind = part.get("type")
    if str(kind).split(".")[-1] not in accepted:
        raise ValueError(f"source: its config's {where}.type is {kind!r}: only {' / '.join(accepted)} converts")


def _mm_checked_backbone(backbone: dict) -> float:
    """Refuse the ResNet3d arguments under which mmaction2 computes another function than ours
    (each named, with the default where the config leaves it out); the BN epsilon it uses."""
    _mm_type(backbone, "model.backbone", ("ResNet3d",))
    for key, (default, ours) in _MM_BACKBONE.items():
        value = backbone.get(key, default)
        if not _same(value, ours):
            said = "" if key in backbone else f" (mmaction2's default: the config leaves it out)"
            raise ValueError(f"source: its config's model.backbone.{key} is {value!r}{said}; only {ours!r} converts "
                             f"(the network it gives differs from ours)")
    for key, accepted in (("conv_cfg", ("Conv3d", "Conv")), ("act_cfg", ("ReLU",)),
                          ("norm_cfg", ("BN3d", "SyncBN", "BN", "MMSyncBN"))):
        if key in backbone:
            part = backbone[key]
            if not isinstance(part, dict):
                raise ValueError(f"source: its config's model.backbone.{key} is {part!r}: expected a dict")
            _mm_type(part, f"model.backbone.{key}", accepted)
    norm = backbone.get("norm_cfg") if isinstance(backbone.get("norm_cfg"), dict) else {}
    eps = norm.get("eps", PEER_BN_EPS)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps <= 0:
        raise ValueError(f"source: its config's model.backbone.norm_cfg.eps is {eps!r}: expected a positive number")
    return float(eps)


def _mm_pixels(model: dict, config: str) -> tuple[list[float], list[float]]:
    """The input normalisation mmaction2 applies: its ``data_preprocessor`` (mmaction2 1.x; mean / std
    None, the defaults, normalise nothing), else ``img_norm_cfg`` (0.x), else ImageNet's."""
    preprocessor = model.get("data_preprocessor")
    if isinstance(preprocessor, dict):
        _mm_type(preprocessor, "model.data_preprocessor", ("ActionDataPreprocessor",))
        for key, default in (("to_rgb", False), ("format_shape", "NCTHW")):
            if preprocessor.get(key, default) != default:
                raise ValueError(f"source: its config's model.data_preprocessor.{key} is {preprocessor[key]!r}: "
                                 f"only {default!r} converts")
        mean, std = preprocessor.get("mean"), preprocessor.get("std")
        mean = [0.0, 0.0, 0.0] if mean is None else mean
        std = [1.0, 1.0, 1.0] if std is None else std
    else:
        norm = _python_config(config).get("img_norm_cfg")
        if not isinstance(norm, dict):
            return list(IMAGENET_PIXELS[0]), list(IMAGENET_PIXELS[1])
        if norm.get("to_bgr", False) or not norm.get("to_rgb", True):
            raise ValueError(f"source: its config's img_norm_cfg {norm!r} feeds BGR frames: only RGB converts")
        mean, std = norm.get("mean"), norm.get("std")
    try:
        values = [[float(v) for v in vector] for vector in (mean, std)]
    except (TypeError, ValueError):
        values = []
    if len(values) != 2 or any(len(v) != 3 for v in values):
        raise ValueError(f"source: its config's input mean / std are {mean!r} / {std!r}: expected 3 numbers each")
    return values[0], values[1]


def _positions(state: Mapping[str, torch.Tensor], pattern: str, offset: int, model: str | None) -> dict:
    """``{"nonlocal_blocks": ...}`` where the checkpoint's non-local blocks (found by ``pattern``: stage
    number + ``offset``, block index) sit elsewhere than in ``model``'s card (PySlowFast's R101 NLN has
    them at res4 blocks 1, 3, 5, the official R101 at 6, 13, 20), so that the model built carries
    them where they are; {} where they agree, or where the model has another number of blocks in a
    stage (then the conversion reports what does not fit)."""
    found: dict[str, set[int]] = {}
    for key in state:
        match = re.match(pattern, key)
        if match:
            found.setdefault(f"res{int(match[1]) + offset}", set()).add(int(match[2]))
    if model is None or not found:
        return {}
    from .models import model_card

    card = model_card(model).model_kwargs().get("nonlocal_blocks") or {}
    card = {stage: sorted(blocks) for stage, blocks in card.items() if blocks}
    ours = {stage: sorted(blocks) for stage, blocks in sorted(found.items())}
    same_counts = {stage: len(blocks) for stage, blocks in card.items()} == {s: len(b) for s, b in ours.items()}
    return {"nonlocal_blocks": ours} if same_counts and ours != card else {}


def mmaction2_options(state: Mapping[str, torch.Tensor], config: str = "", *, mode: str | None = None,
                      scale: bool | None = None, model: str | None = None) -> dict:
    """The :class:`~nonlocalnet.models.ResNet3d` options under which a zoo model computes what an
    mmaction2 ``ResNet3d`` + ``I3DHead`` recognizer with these weights computes.

    Its stem (pool1 [1,3,3] padded, stride 2 in time: ``conv1_stride_t=2, pool1_stride_t=2``), BN
    epsilon and input normalisation; its ``NonLocal3d`` blocks: the key/value max-pool after the
    phi / g convs when ``sub_sample`` (``g.0.conv`` keys), the norm of ``conv_out`` (BN, or none),
    ``mode`` and ``use_scale``. The config text saved with the weights (mmengine's ``meta['cfg']``)
    is read without running it; where it leaves an argument out, mmaction2's and mmcv's defaults
    hold (``use_scale=True``, ``mode='embedded_gaussian'``, ``conv1_stride_t=1``, ...), and an
    argument under which mmaction2 computes another function than ours (``style='caffe'``,
    strides, dilations, ``with_pool2=False``, ...) is a ``ValueError`` naming it. Without a config:
    mmaction2's I3D recipe, ImageNet normalisation, ``mode`` and ``scale`` from the arguments
    (Gaussian blocks, which have no theta, are recognised by their keys; embedded Gaussian and dot
    product have the same keys, so ``mode`` is needed) and ``use_scale=False``, the value of all
    mmaction2's non-local configs. ``mode`` / ``scale`` given override the config. ``model``: the
    zoo model converted into; where its non-local blocks sit elsewhere than the checkpoint's, the
    options place them as the checkpoint does.
    """
    config_model = _mm_model(config)
    eps, pixels = PEER_BN_EPS, (list(IMAGENET_PIXELS[0]), list(IMAGENET_PIXELS[1]))
    nonlocal_cfg: dict | None = None
    if config_model is not None:
        backbone = config_model["backbone"]
        eps = _mm_checked_backbone(backbone)
        head = config_model.get("cls_head")
        if isinstance(head, dict):
            _mm_type(head, "model.cls_head", ("I3DHead",))
            if head.get("spatial_type", "avg") != "avg":
                raise ValueError(f"source: its config's model.cls_head.spatial_type is {head['spatial_type']!r}: "
                                 f"only 'avg' converts")
        pixels = _mm_pixels(config_model, config)
        nonlocal_cfg = backbone.get("non_local_cfg", {})
        if not isinstance(nonlocal_cfg, dict):
            raise ValueError(f"source: its config's model.backbone.non_local_cfg is {nonlocal_cfg!r}: expected a dict")
    options: dict = {"stem": "mmaction2", "bn_eps": eps, "pixel_mean": pixels[0], "pixel_std": pixels[1]}
    blocks = [k for k in state if ".non_local_block." in k]
    if not blocks:
        return options
    has_theta = any(".non_local_block.theta." in k for k in blocks)
    from_keys = "gaussian" if not has_theta else "concatenation" if any(".concat_project." in k for k in blocks) \
        else None
    pooled = any(".non_local_block.g.0." in k for k in blocks)
    norms = {k.split(".conv_out.")[1].split(".")[0] for k in blocks if ".conv_out." in k} - {"conv"}
    if nonlocal_cfg is not None:
        said = {**_MM_NONLOCAL_DEFAULTS, **nonlocal_cfg}
        mode = mode or said["mode"]
        scale = said["use_scale"] if scale is None else scale
        if bool(said["sub_sample"]) != pooled or (said["norm_cfg"] is None) != (not norms):
            raise ValueError(f"source: its config's model.backbone.non_local_cfg {nonlocal_cfg!r} (sub_sample "
                             f"{said['sub_sample']!r}, norm_cfg {said['norm_cfg']!r} with mmcv's defaults) does not "
                             f"fit its weights, whose blocks are {'' if pooled else 'not '}subsampled and have "
                             f"{'a norm' if norms else 'no norm'}")
        if not isinstance(mode, str) or not isinstance(scale, bool):
            raise ValueError(f"source: its config's non_local_cfg mode / use_scale are {mode!r} / {scale!r}: "
                             f"expected a mode name and True or False")
    mode = mode or from_keys
    if mode is None:
        raise ValueError("mode: the checkpoint's non-local blocks may be 'embedded_gaussian' or 'dot_product' (same "
                         "keys) and it holds no config saying which; pass --mode")
    if (mode == "gaussian") == has_theta:
        raise ValueError(f"mode: {mode!r} does not fit the checkpoint, whose non-local blocks "
                         f"{'have' if has_theta else 'have no'} theta convs")
    if norms - {"bn"}:
        raise ValueError(f"source: non-local conv_out norms {sorted(norms)}: only BN ('bn') or none is converted")
    options["nonlocal_options"] = {
        "mode": mode, "pool": "after", "subsample": pooled,
        "scale": bool(scale) if mode == "embedded_gaussian" else False, "norm": "batch" if norms else "none",
    }
    options.update(_positions(state, r"backbone\.layer(\d)\.(\d+)\.non_local_block\.", 1, model))
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


# PySlowFast's config keys (slowfast/config/defaults.py) that change a C2D / I3D ResNet's function:
# its default, where a config leaves the key out, and the value our "slowfast" stem and bottlenecks compute.
_SF_FIXED = {
    ("RESNET", "STRIDE_1X1"): (False, False), ("RESNET", "SPATIAL_STRIDES"): ([[1], [2], [2], [2]],) * 2,
    ("RESNET", "SPATIAL_DILATIONS"): ([[1], [1], [1], [1]],) * 2,
    ("RESNET", "TRANS_FUNC"): ("bottleneck_transform", "bottleneck_transform"), ("RESNET", "NUM_GROUPS"): (1, 1),
    ("DATA", "REVERSE_INPUT_CHANNEL"): (False, False), ("DETECTION", "ENABLE"): (False, False),
    ("BN", "NORM_TYPE"): ("batchnorm", ("batchnorm", "sync_batchnorm")),
}


def _sf_checked(cfg: dict) -> None:
    """Refuse the keys of a PySlowFast config under which its network computes another function
    than ours, each named (with its default where the config leaves it out)."""
    arch = (cfg.get("MODEL") or {}).get("ARCH", "slowfast")
    if arch not in ("i3d", "c2d"):
        said = "" if "ARCH" in (cfg.get("MODEL") or {}) else " (PySlowFast's default: the config leaves it out)"
        raise ValueError(f"source: its config's MODEL.ARCH is {arch!r}{said}: only PySlowFast's C2D and I3D ResNets "
                         f"(with pool2) convert")
    for (section, key), (default, ours) in _SF_FIXED.items():
        part = cfg.get(section) or {}
        value = part.get(key, default)
        accepted = ours if isinstance(ours, tuple) else (ours,)
        if not any(_same(_tuples(value), _tuples(a)) for a in accepted):
            said = "" if key in part else " (PySlowFast's default: the config leaves it out)"
            raise ValueError(f"source: its config's {section}.{key} is {value!r}{said}; only "
                             f"{' or '.join(repr(a) for a in accepted)} converts (the network it gives differs from "
                             f"ours)")


def _tuples(value: object) -> object:
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def slowfast_options(state: Mapping[str, torch.Tensor], config: str = "", *, mode: str | None = None,
                     model: str | None = None) -> dict:
    """The :class:`~nonlocalnet.models.ResNet3d` options under which a zoo model computes what a
    PySlowFast ``ResNet`` (``MODEL.ARCH`` c2d or i3d) with these weights computes: its stem
    (pool1 padded), BN epsilon 1e-5, its ``DATA.MEAN`` / ``DATA.STD``, and for its ``Nonlocal``
    blocks (pool before the convs as ours, logits x 1/sqrt(C')) ``NONLOCAL.INSTANTIATION``
    (``softmax`` or ``dot_product``; ``mode`` overrides it) and ``NONLOCAL.POOL`` per stage.

    The config (its ``cfg``, YAML) is read with PySlowFast's defaults where it leaves a key out
    (``MODEL.ARCH`` slowfast, ``NONLOCAL.INSTANTIATION`` dot_product, ...); a key under which its
    network computes another function than ours (another architecture, ``RESNET.STRIDE_1X1``,
    ``SPATIAL_STRIDES``, ``SPATIAL_DILATIONS``, groups, BGR input, a detection head) is a
    ``ValueError`` naming it. Without a config, ``mode`` is needed. ``model``: the zoo model
    converted into; where its non-local blocks sit elsewhere than the checkpoint's (PySlowFast's
    R101 NLN: res4 blocks 1, 3, 5), the options place them as the checkpoint does."""
    cfg = None
    if config:
        try:
            cfg = yaml.safe_load(config) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"source: its 'cfg' is not YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(cfg, dict):
            raise ValueError(f"source: its 'cfg' is not a PySlowFast config (YAML of {type(cfg).__name__})")
        _sf_checked(cfg)
    data = (cfg or {}).get("DATA") or {}
    options: dict = {"stem": "slowfast", "bn_eps": PEER_BN_EPS}
    if cfg is not None:
        for key, name, default in (("MEAN", "pixel_mean", 0.45), ("STD", "pixel_std", 0.225)):
            options[name] = [float(v) * 255.0 for v in data.get(key, [default] * 3)]
    blocks = [k for k in state if ".pathway0_nonlocal" in k]
    if not blocks:
        return options
    nonlocal_cfg = (cfg or {}).get("NONLOCAL") or {}
    if mode is None and cfg is not None:
        instantiation = nonlocal_cfg.get("INSTANTIATION", "dot_product")
        if instantiation not in _SOFTMAX:
            raise ValueError(f"source: its config's NONLOCAL.INSTANTIATION is {instantiation!r}: expected 'softmax' or "
                             f"'dot_product'")
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
    options.update(_positions(state, r"s(\d)\.pathway0_nonlocal(\d+)\.", 0, model))
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
        code = sorted(name for name in _pickle_globals(path) if _code_global(name))
        reason = f"it names {', '.join(code)}, which a weights file needs only to run code" if code else \
            f"{type(err).__name__}: {_reason(err)}"
        raise ValueError(f"weights: {path} is not a loadable weights file ({reason})") from None
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

