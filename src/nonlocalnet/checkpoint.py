"""Training checkpoints: written atomically, read back with ``weights_only`` (no code runs).

A checkpoint holds everything a run needs to continue exactly where it stopped: model and
optimizer state, the gradient scaler, the iteration, the random number generators, the resolved
configuration and the class names (the label mapping).

Writing a new checkpoint keeps the one before it as ``checkpoint.prev.pt`` (:func:`save_checkpoint`);
at every moment both names hold a complete file. A write that fails (a full disk) leaves both as
they were and says which file it could not write.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
import zipfile

import numpy as np
import torch

__all__ = ["CheckpointWriteError", "atomic_save", "save_checkpoint", "previous_path", "load_checkpoint",
           "non_finite", "remove_stale_temporaries", "rng_state", "set_rng_state"]


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, no permission); the files it would have
    replaced are kept. ``errno`` is the cause's, ``filename`` the checkpoint's."""


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, synced, then renamed into place: a crash
    leaves the previous file intact. The file gets the permissions a plain ``open()`` would give."""
    _replace_with(_temporary(obj, os.fspath(path)), os.fspath(path))


def _temporary(obj, path: str) -> str:
    """``obj`` saved and synced into a new ``<name>.XXXXXXXX.tmp`` beside ``path``; its name."""
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp",
                               dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # not mkstemp's 0600
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return tmp


def _replace_with(tmp: str, path: str, before=None) -> None:
    """Rename ``tmp`` to ``path`` (after ``before()``, if given); ``tmp`` is removed on failure."""
    try:
        if before is not None:
            before()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def previous_path(path: str | os.PathLike) -> str:
    """Where :func:`save_checkpoint` keeps the checkpoint a new one replaces: ``checkpoint.prev.pt``
    beside ``checkpoint.pt``."""
    root, ext = os.path.splitext(os.fspath(path))
    return f"{root}.prev{ext}"


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` atomically (:func:`atomic_save`), creating the folder if needed. Once the new
    file is complete, an existing file at ``path`` becomes :func:`previous_path` (a hard link renamed
    into place, so that ``path`` is never absent), then the new one takes its place. An ``OSError``
    (a full disk) is a :class:`CheckpointWriteError` naming ``path``; both files are then as they were."""
    path = os.fspath(path)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = _temporary(state, path)
        _replace_with(tmp, path, before=lambda: _keep_previous(path) if os.path.exists(path) else None)
    except OSError as err:
        raise CheckpointWriteError(err.errno, f"cannot be written ({err.strerror or err}); the previous checkpoint "
                                              f"is kept", path) from err


def _keep_previous(path: str) -> None:
    previous = previous_path(path)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(previous) + ".", suffix=".tmp", dir=os.path.dirname(previous))
    os.close(fd)
    os.unlink(tmp)
    try:
        try:
            os.link(path, tmp)  # the same file under a second name: no copy, nothing to go wrong half-way
        except OSError:  # a file system without hard links
            shutil.copy2(path, tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _replace_with(tmp, previous)


_TEMPORARY = re.compile(r"checkpoint(\.prev)?\.pt\.[a-z0-9_]{8}\.tmp")


def remove_stale_temporaries(folder: str | os.PathLike) -> list[str]:
    """Delete the temporary files a killed :func:`save_checkpoint` left in ``folder``
    (``checkpoint.pt.XXXXXXXX.tmp``, ``checkpoint.prev.pt.XXXXXXXX.tmp``: that naming only);
    returns their names. Only safe while no other process writes there (hold the run's lock)."""
    if not os.path.isdir(folder):
        return []
    stale = sorted(name for name in os.listdir(folder) if _TEMPORARY.fullmatch(name))
    for name in stale:
        os.unlink(os.path.join(folder, name))
    return stale


def non_finite(tensors) -> list[str]:
    """The names of the floating-point tensors holding a NaN or an infinity in ``tensors`` (a
    possibly nested dict / list of tensors: a state dict, an optimizer state), as ``a.b.0`` paths."""
    bad = []

    def visit(value, name: str) -> None:
        if torch.is_tensor(value):
            if (value.is_floating_point() or value.is_complex()) and not torch.isfinite(value).all():
                bad.append(name)
        elif isinstance(value, dict):
            for key, item in value.items():
                visit(item, f"{name}.{key}" if name else str(key))
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                visit(item, f"{name}.{i}" if name else str(i))

    visit(tensors, "")
    return bad


def load_checkpoint(path: str | os.PathLike, map_location="cpu", *, mmap: bool = False) -> dict:
    """The checkpoint's contents; with ``mmap`` the tensors are mapped, not read (a cheap look at
    the keys). A legacy (non-zip) torch file cannot be mapped: it is read whole instead."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint: no such file {os.fspath(path)!r}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as err:  # torch raises several types for a damaged file
        raise ValueError(f"checkpoint {os.fspath(path)!r}: cannot be read ({type(err).__name__}: {err})") from None


def rng_state() -> dict:
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss],
             "numpy": [keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
