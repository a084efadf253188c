"""The built-in data set of the default job: real H.264 mp4 files whose label needs a relation far
apart in space and time.

Each video shows, over a plain textured background, a square on the left side in its first frames,
nothing in the middle frames, and a disc on the right side in its last frames. The label says
whether the two shapes have the **same colour** (class ``same``) or not (``different``). Both
colours are uniform over the palette in both classes, so no single frame says anything about the
label: it takes comparing the start of the clip with its end.

Why a C2D cannot, and a non-local network can: a C2D network has no temporal kernel, so its
logits are a sum over frames of a function of each frame (the head is linear after the average
pool). For colours a != b, logit(a, a) + logit(b, b) and logit(a, b) + logit(b, a) are then the
same sum, so no C2D separates "same" from "different" better than chance. A non-local block
compares every position with every other, first frames with last ones included (paper §3).

:func:`make_synthetic` writes the set once per parameters under a root folder and reuses it
(``manifest.json`` records them): ``videos/{train,val}/NNNNN.mp4``, list files ``train.txt`` and
``val.txt`` (``path label`` per line, the format of :func:`~nonlocalnet.data.datasets.read_list`)
and ``classes.txt``. :func:`build_once`, which also writes the detection shapes set, never removes
or overwrites a folder it did not write (its ``.nonlocalnet-generated`` marker says what it wrote).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..lock import exclusive
from .decode import _av

__all__ = ["CLASSES", "SyntheticSpec", "render_video", "write_video", "make_synthetic", "ForeignFolderError"]

CLASSES = ("different", "same")
PALETTE = np.array([[230, 40, 40], [40, 200, 60], [50, 80, 240], [240, 220, 40], [220, 60, 220], [40, 220, 230]],
                   np.float32)
_VERSION = 2  # bump when the rendering changes, so that cached sets are rebuilt


@dataclass(frozen=True)
class SyntheticSpec:
    train: int = 960  # videos per split, half of each class
    val: int = 200
    height: int = 72
    width: int = 80
    frames: int = 16  # first 3/8: the square; last 3/8: the disc; between: background only
    fps: int = 8
    seed: int = 0

    def check(self) -> None:
        for name in ("train", "val"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name}: expected at least 2 videos (one per class), got {getattr(self, name)}")
        if self.height < 32 or self.width < 32 or self.height % 2 or self.width % 2:
            raise ValueError(f"height, width: expected even sizes >= 32, got {self.height} x {self.width}")
        if self.frames < 8:
            raise ValueError(f"frames: expected at least 8, got {self.frames}")


def render_video(rng: np.random.Generator, same: bool, *, height: int = 72, width: int = 80,
                 frames: int = 16) -> np.ndarray:
    """One video as uint8 (T, H, W, 3). ``same``: the disc takes the square's colour."""
    a = int(rng.integers(len(PALETTE)))
    b = a if same else (a + int(rng.integers(1, len(PALETTE)))) % len(PALETTE)
    yy, xx = np.mgrid[0:height, 0:width]
    background = rng.uniform(70, 150, 3).astype(np.float32) + rng.uniform(-30, 30, 3).astype(np.float32) * (
        xx / width)[..., None]
    video = np.repeat(background[None], frames, 0)
    side, radius, margin = (height // 5) * 3 // 2, (height // 9) * 3 // 2, height // 9
    top = int(rng.integers(margin, height - margin - side))
    left = int(rng.integers(int(0.08 * width), int(0.45 * width) - side + 1))
    cy = int(rng.integers(margin + radius, height - margin - radius))
    cx = int(rng.integers(int(0.55 * width) + radius, int(0.92 * width) - radius + 1))
    shown = frames * 3 // 8
    video[:shown, top : top + side, left : left + side] = PALETTE[a]
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius * radius
    video[frames - shown :, disc] = PALETTE[b]
    video += rng.normal(0.0, 10.0, video.shape).astype(np.float32)
    return np.clip(video, 0, 255).astype(np.uint8)


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: int = 8, *, crf: int = 18,
                gop: int | None = None) -> None:
    """Encode uint8 (T, H, W, 3) RGB frames (even H, W) as H.264 in an mp4 (PyAV, ``video`` extra);
    ``gop``: frames between keyframes (default: x264's)."""
    av = _av()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames: expected uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    with av.open(os.fspath(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast"}
        stream.codec_context.thread_count = 1  # fewer, not no, run-to-run differences in x264's output
        if gop:
            stream.codec_context.gop_size = gop
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


def make_synthetic(root: str | os.PathLike, spec: SyntheticSpec | None = None, *, log=print) -> Path:
    """Write the set under ``root`` unless a complete one with the same spec is already there.

    The set is built in a temporary folder beside ``root`` and renamed into place, so an
    interrupted build leaves nothing half-written. Returns ``root``.
    """
    spec = spec or SyntheticSpec()
    spec.check()

    def build(work: Path) -> None:
        rng = np.random.default_rng(spec.seed)
        for split, count in (("train", spec.train), ("val", spec.val)):
            (work / "videos" / split).mkdir(parents=True)
            lines = []
            for i in range(count):
                label = i % 2
                name = f"videos/{split}/{i:05d}.mp4"
                write_video(work / name, render_video(rng, bool(label), height=spec.height, width=spec.width,
                                                      frames=spec.frames), spec.fps)
                lines.append(f"{name} {label}\n")
            (work / f"{split}.txt").write_text("".join(lines))
        (work / "classes.txt").write_text("".join(f"{name}\n" for name in CLASSES))

    return build_once(root, {"version": _VERSION, **asdict(spec)}, build, log,
                      f"the synthetic set ({spec.train} train + {spec.val} val videos)", kind="synthetic")


class ForeignFolderError(ValueError):
    """The folder of a generated set holds files the package did not write; nothing was changed."""


MARKER = ".nonlocalnet-generated"  # written by build_once only: a folder without it is never removed or replaced


def _read_marker(folder: Path) -> dict | None:
    """The marker of a folder build_once wrote (kind, the root's name, the files it wrote), or None."""
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("writer") == "nonlocalnet" else None


def _write_marker(folder: Path, kind: str, name: str, files: dict[str, int] | None, retired: bool = False) -> None:
    """``files``: relative path -> size of what the build wrote; None while it is being built."""
    marker = {"writer": "nonlocalnet", "kind": kind, "name": name, "files": files, "retired": retired}
    (folder / MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")


def _listing(folder: Path) -> dict[str, int]:
    """Relative path -> size of every file below ``folder`` but the marker (links count as files)."""
    found = {}
    for top, dirs, files in os.walk(folder):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(top, d))]:
            path = os.path.join(top, name)
            found[Path(os.path.relpath(path, folder)).as_posix()] = os.lstat(path).st_size
    found.pop(MARKER, None)
    return found


def _check_replaceable(root: Path) -> None:
    """Raise :class:`ForeignFolderError` unless ``root`` is absent, empty, or a set build_once wrote
    that still holds only its own files, unchanged in size."""
    if not root.exists():
        return
    if not root.is_dir():
        raise ForeignFolderError(f"{root} is a file, not a folder; choose a folder for the generated set")
    entries = sorted(p.name for p in root.iterdir())
    if not entries:
        return
    marker = _read_marker(root)
    if marker is None or not isinstance(marker.get("files"), dict):
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise ForeignFolderError(f"{root} is not empty ({shown}) and was not written by nonlocalnet, so it is left "
                                 f"as it is; choose an empty or new folder for the generated set")
    own = marker["files"]
    foreign = sorted(path for path, size in _listing(root).items() if path not in own or own[path] != size)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ForeignFolderError(f"{root} holds a set written by nonlocalnet and files it did not write or that "
                                 f"changed since ({shown}), so it is left as it is; move those files out, or choose "
                                 f"another folder for the generated set")


def _remove_stale(root: Path) -> None:
    """Remove the temporary folders of builds of ``root`` that were killed: named as build_once
    names them and marked as ours, for ``root``, unfinished or retired. Call with the lock held."""
    name = re.compile(re.escape(root.name) + r"\.[a-z0-9_]{8}")
    for entry in root.parent.iterdir():
        if name.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
            marker = _read_marker(entry)
            if marker and marker.get("name") == root.name and (marker.get("files") is None or marker.get("retired")):
                shutil.rmtree(entry, ignore_errors=True)


def build_once(root: str | os.PathLike, manifest: dict, build, log, what: str, *, kind: str) -> Path:
    """Make a generated data set under ``root`` once: reused while ``root/manifest.json`` equals
    ``manifest``, otherwise built by ``build(folder)`` in a temporary folder beside ``root`` and
    renamed into place (an interrupted build leaves nothing half-written). Returns ``root``.

    Only a set this function wrote (its :data:`MARKER` file lists the files) is replaced, and only
    while it holds nothing else: any other non-empty ``root`` is a :class:`ForeignFolderError`
    that leaves it as it was. Builders of one ``root`` take turns on a lock file beside it
    (``.<name>.lock``); the one holding it removes what killed builds left behind.
    """
    root = Path(root)

    def built() -> bool:
        try:
            return json.loads((root / "manifest.json").read_text(encoding="utf-8")) == manifest
        except (OSError, ValueError):
            return False

    if built():
        return root
    _check_replaceable(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(root.parent / f".{root.name}.lock", what=f"{root}", wait=True):
        if built():  # another process built it while this one waited
            return root
        _check_replaceable(root)
        _remove_stale(root)
        log(f"writing {what} to {root} (once)")
        work = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
        try:
            _write_marker(work, kind, root.name, None)
            build(work)
            (work / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
            _write_marker(work, kind, root.name, _listing(work))
            if root.exists() and any(root.iterdir()):  # an older set of ours: retire it, then swap
                _write_marker(root, kind, root.name, _read_marker(root)["files"], retired=True)
                old = tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent)
                os.replace(root, old)
                os.replace(work, root)
                shutil.rmtree(old, ignore_errors=True)
            else:
                if root.exists():
                    root.rmdir()
                os.replace(work, root)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    return root
