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
and ``classes.txt``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .decode import _av

__all__ = ["CLASSES", "SyntheticSpec", "render_video", "write_video", "make_synthetic"]

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
                      f"the synthetic set ({spec.train} train + {spec.val} val videos)")


def build_once(root: str | os.PathLike, manifest: dict, build, log, what: str) -> Path:
    """Make a generated data set under ``root`` once: reused while ``root/manifest.json`` equals
    ``manifest``, otherwise built by ``build(folder)`` in a temporary folder beside ``root`` and
    renamed into place (an interrupted build leaves nothing half-written). Returns ``root``."""
    root = Path(root)
    try:
        if json.loads((root / "manifest.json").read_text()) == manifest:
            return root
    except (OSError, ValueError):
        pass
    if root.exists() and any(root.iterdir()):
        if not (root / "manifest.json").exists():
            raise ValueError(f"root: {root} is not empty and holds no generated set; choose an empty folder")
        shutil.rmtree(root)  # an older or different generated set
    root.parent.mkdir(parents=True, exist_ok=True)
    log(f"writing {what} to {root} (once)")
    work = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    try:
        build(work)
        (work / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        if root.exists():
            root.rmdir()
        os.replace(work, root)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return root
