"""Training checkpoints: written atomically, read back with ``weights_only`` (no code runs).

A checkpoint holds everything a run needs to continue exactly where it stopped: model and
optimizer state, the gradient scaler, the iteration, the random number generators, the resolved
configuration and the class names (the label mapping).
"""

from __future__ import annotations

import os
import random
import tempfile

import numpy as np
import torch

__all__ = ["atomic_save", "save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state"]


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, synced, then renamed into place: a crash
    leaves the previous file intact. The file gets the permissions a plain ``open()`` would give."""
    path = os.fspath(path)
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
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` atomically (:func:`atomic_save`), creating the folder if needed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_save(state, path)


def load_checkpoint(path: str | os.PathLike, map_location="cpu", *, mmap: bool = False) -> dict:
    """The checkpoint's contents; with ``mmap`` the tensors are mapped, not read (a cheap look at
    the keys)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint: no such file {os.fspath(path)!r}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
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
