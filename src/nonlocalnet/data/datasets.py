"""Annotation readers and the map-style :class:`VideoDataset`.

Readers turn an annotation file into :class:`Annotations`: a list of :class:`VideoRecord` (path,
label or labels) and the class names, whose order is the label mapping (saved with every
checkpoint). A malformed line, or one that is not UTF-8, is an :class:`AnnotationError` naming the
file and the line. Entries whose video file is absent are set aside in ``Annotations.missing``.

- :func:`read_list`: ``path label [label ...]`` per line (mmaction2 / PySlowFast / official lists;
  whitespace or a comma between fields; 0-based labels); several labels make it multi-label.
- :func:`read_kinetics_csv`: ``label,youtube_id,time_start,time_end[,split][,is_cc]`` over a folder
  of clips named as the official downloaders name them, ``<youtube_id>_<start:06d>_<end:06d>.<ext>``
  anywhere below the root (class folders with spaces or underscores, any container).
- :func:`read_class_folders`: one folder per class, the classes in sorted order.
- :func:`read_charades_csv`: Charades v1 (``id, ..., actions, length``), multi-label over 157
  classes, each action kept with its time span.

:class:`VideoDataset` in ``"train"`` mode gives one clip per video (paper's sampling and
augmentation); in ``"test"`` mode item k is clip k % clips of video k // clips, with all its spatial
crops stacked: (crops, 3, T, S, S). A video that fails to decode, or whose frames are out of
bounds (:data:`MIN_SIDE`, :data:`MAX_ASPECT`), gives a :class:`Skipped` item, which
:func:`collate` sets aside so that the batch, and the epoch, go on.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import Dataset, default_collate

from .decode import VideoError, VideoInfo, decode_frames, probe
from .sampling import train_clip_indices, uniform_clip_indices
from .transforms import spatial_views, train_transform

__all__ = ["AnnotationError", "VideoRecord", "Annotations", "read_list", "read_classes", "read_kinetics_csv",
           "read_class_folders", "read_charades_csv", "VideoDataset", "Skipped", "collate", "VIDEO_EXTENSIONS",
           "MAX_ASPECT", "MIN_SIDE"]

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".mpg", ".mpeg", ".m4v")


class AnnotationError(ValueError):
    def __init__(self, path, line: int | None, reason: str):
        where = f"{os.fspath(path)}:{line}" if line else os.fspath(path)
        super().__init__(f"{where}: {reason}")
        self.path, self.line, self.reason = os.fspath(path), line, reason


@dataclass(frozen=True)
class VideoRecord:
    path: str
    labels: tuple[int, ...]  # one label, several (multi-label) or none (unlabelled test set)
    segments: tuple[tuple[int, float, float], ...] = ()  # (class, start s, end s): Charades actions

    @property
    def label(self) -> int:
        return self.labels[0] if self.labels else -1


@dataclass
class Annotations:
    records: list[VideoRecord]
    classes: list[str]
    multilabel: bool = False
    missing: list[str] = field(default_factory=list)  # entries whose video file was not found

    def __len__(self) -> int:
        return len(self.records)


def _text(path):
    """The lines of a UTF-8 text file with their ends (a leading byte order mark dropped): bytes
    that are not UTF-8 are an :class:`AnnotationError` naming the line."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(path, None, "no such annotation file")
    for number, raw in enumerate(path.read_bytes().splitlines(keepends=True), 1):
        try:
            yield raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as err:
            raise AnnotationError(path, number, f"not UTF-8 text (byte {raw[err.start]:#04x} at column "
                                                f"{err.start + 1}); save the file as UTF-8") from None


def _lines(path):
    """Numbered lines without blank ones and ``#`` comments, stripped."""
    for number, line in enumerate(_text(path), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            yield number, line


def read_classes(path) -> list[str]:
    """Class names, one per line (``name``, or ``index name`` as UCF101's classInd / Charades)."""
    names = []
    for number, line in _lines(path):
        head, _, rest = line.partition(" ")
        names.append(rest.strip() if rest and (head.isdigit() or re.fullmatch(r"c\d+", head)) else line)
    if not names:
        raise AnnotationError(path, None, "no class names")
    if len(set(names)) != len(names):
        raise AnnotationError(path, None, "class names repeat")
    return names


def _class_names(classes: Sequence[str] | str | os.PathLike | None) -> list[str] | None:
    """Names given as a list or a file (:func:`read_classes`); None when not given."""
    if isinstance(classes, (str, os.PathLike)):
        return read_classes(classes)
    return list(classes) if classes else None


_LIST_LINE = re.compile(r"^(?P<path>.+?)(?:\s+|\s*,\s*)(?P<labels>-?\d+(?:(?:\s+|\s*,\s*)-?\d+)*)$")


def _spans(values) -> str:
    """Sorted ints as ranges: ``0..5, 9, 12..13``."""
    spans = []
    for v in sorted(values):
        if spans and v == spans[-1][1] + 1:
            spans[-1][1] = v
        else:
            spans.append([v, v])
    return ", ".join(f"{a}..{b}" if b > a else f"{a}" for a, b in spans)


def read_list(path, root: str | os.PathLike | None = None, classes: Sequence[str] | str | None = None) -> Annotations:
    """``path label [label ...]`` per line; paths are relative to ``root`` (default: the list's
    folder). Entries whose video is not a file go to ``missing``. ``classes``: names or a file of
    names; without them the labels (of all entries, found or not) must be 0..K-1 without gaps,
    which makes K classes named ``"0"`` .. ``"K-1"``."""
    root = Path(root) if root is not None else Path(path).parent
    names = _class_names(classes)
    records, missing, used, multilabel = [], [], set(), False
    for number, line in _lines(path):
        match = _LIST_LINE.match(line)
        if not match:
            raise AnnotationError(path, number, f"expected 'path label [label ...]' with integer labels, got {line!r}")
        labels = tuple(int(v) for v in re.split(r"\s*,\s*|\s+", match["labels"]))
        if min(labels) < 0 or (names is not None and max(labels) >= len(names)):
            limit = f"0..{len(names) - 1}" if names is not None else ">= 0"
            raise AnnotationError(path, number, f"expected labels in {limit}, got {list(labels)}")
        multilabel |= len(labels) > 1
        used.update(labels)
        video = str(root / match["path"])
        if os.path.isfile(video):
            records.append(VideoRecord(video, labels))
        else:
            missing.append(video)
    if not used:
        raise AnnotationError(path, None, "no entries")
    if names is None:
        if len(used) != max(used) + 1:
            absent = _spans(set(range(max(used))) - used)
            raise AnnotationError(path, None, f"labels {_spans(used)} leave out {absent}, and no class names were "
                                              f"given to say how many classes there are: pass the class names "
                                              f"(data.classes: a file with one name per line)")
        names = [str(i) for i in range(len(used))]
    return Annotations(records, names, multilabel, missing)


def _index_videos(root: Path) -> dict[str, str]:
    """File stem (without every extension) -> path, for every video file below ``root``."""
    found = {}
    for folder, _, files in os.walk(root):
        for name in files:
            if name.lower().endswith(VIDEO_EXTENSIONS):
                found.setdefault(name.split(".", 1)[0], os.path.join(folder, name))
    return found


_KINETICS_COLUMNS = ("label", "youtube_id", "time_start", "time_end")


def read_kinetics_csv(path, root, classes: Sequence[str] | str | None = None, split: str | None = None) -> Annotations:
    """The Kinetics CSV over a folder of downloaded clips. ``classes`` (names or a file) fixes the
    mapping, e.g. the training set's for validation; default: the CSV's labels sorted. Rows whose
    clip is not below ``root`` are listed in ``missing``. ``split`` keeps only rows of that split."""
    path = Path(path)
    reader = csv.reader(_text(path))
    header = next(reader, None)
    if header is None or not set(_KINETICS_COLUMNS[1:]) <= {h.strip() for h in header}:
        raise AnnotationError(path, 1, f"expected a header with columns {','.join(_KINETICS_COLUMNS)}"
                                       f"[,split][,is_cc], got {header}")
    header = [h.strip() for h in header]
    rows = []
    for row in reader:
        number = reader.line_num
        if not row or not "".join(row).strip():
            continue
        if len(row) != len(header):
            raise AnnotationError(path, number, f"expected {len(header)} fields, got {len(row)}: {row}")
        entry = dict(zip(header, (v.strip() for v in row)))
        try:
            start, end = int(float(entry["time_start"])), int(float(entry["time_end"]))
        except ValueError:
            raise AnnotationError(path, number, f"time_start, time_end: expected seconds, got "
                                                f"{entry['time_start']!r}, {entry['time_end']!r}") from None
        if split is None or entry.get("split") == split:
            rows.append((number, entry.get("label", ""), f"{entry['youtube_id']}_{start:06d}_{end:06d}"))
    names = _class_names(classes) or sorted({label for _, label, _ in rows if label})
    lookup = {name: i for i, name in enumerate(names)}
    lookup.update({name.replace(" ", "_"): i for i, name in enumerate(names)})
    videos = _index_videos(Path(root))
    records, missing = [], []
    for number, label, stem in rows:
        if label and label not in lookup:
            raise AnnotationError(path, number, f"label {label!r} is not one of the {len(names)} classes")
        if stem not in videos:
            missing.append(stem)
            continue
        records.append(VideoRecord(videos[stem], (lookup[label],) if label else ()))
    return Annotations(records, names, False, missing)


def read_class_folders(root) -> Annotations:
    """``root/<class>/<video>``: classes are the sorted folder names. A class folder without videos,
    or whose name is not UTF-8 (it names the class in reports), is an :class:`AnnotationError`."""
    root = Path(root)
    if not root.is_dir():
        raise AnnotationError(root, None, "no such folder")
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not names:
        raise AnnotationError(root, None, "no class folders (one folder of videos per class)")
    records = []
    for i, name in enumerate(names):
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise AnnotationError(root, None, f"class folder {name!r}: the name is not UTF-8; rename it") from None
        videos = sorted(p for p in (root / name).iterdir() if p.name.lower().endswith(VIDEO_EXTENSIONS))
        if not videos:
            raise AnnotationError(root / name, None, f"a class folder without videos ({', '.join(VIDEO_EXTENSIONS)}): "
                                                     f"every folder of {os.fspath(root)} is a class; add its videos "
                                                     f"or move the folder out")
        records += [VideoRecord(str(p), (i,)) for p in videos]
    return Annotations(records, names)


CHARADES_CLASSES = 157


def read_charades_csv(path, root, classes: Sequence[str] | str | None = None, extension: str = ".mp4") -> Annotations:
    """Charades v1 CSV: video ``root/<id><extension>``, labels = the classes of its actions (``c092
    11.90 21.20;c147 0.00 12.60``), spans kept in ``segments``. ``classes``: names or
    ``Charades_v1_classes.txt``; default ``c000`` .. ``c156``."""
    path = Path(path)
    names = _class_names(classes) or [f"c{i:03d}" for i in range(CHARADES_CLASSES)]
    records, missing = [], []
    reader = csv.DictReader(_text(path))
    if reader.fieldnames is None or not {"id", "actions"} <= set(reader.fieldnames):
        raise AnnotationError(path, 1, f"expected a Charades header with id and actions, got {reader.fieldnames}")
    for row in reader:
        number = reader.line_num
        if None in row or any(v is None for v in row.values()):
            raise AnnotationError(path, number, "expected as many fields as the header")
        segments = []
        for action in filter(None, (a.strip() for a in row["actions"].split(";"))):
            parts = action.split()
            if len(parts) != 3 or not re.fullmatch(r"c\d{3}", parts[0]):
                raise AnnotationError(path, number, f"actions: expected 'cNNN start end', got {action!r}")
            index = int(parts[0][1:])
            if index >= len(names):
                raise AnnotationError(path, number, f"actions: class {parts[0]} is not one of {len(names)}")
            try:
                segments.append((index, float(parts[1]), float(parts[2])))
            except ValueError:
                raise AnnotationError(path, number, f"actions: expected seconds in {action!r}") from None
        video = Path(root) / f"{row['id'].strip()}{extension}"
        if not video.is_file():
            missing.append(str(video))
            continue
        records.append(VideoRecord(str(video), tuple(sorted({s[0] for s in segments})), tuple(segments)))
    return Annotations(records, names, True, missing)


#: frames whose longer side is more than MAX_ASPECT times the shorter, or whose shorter side is
#: under MIN_SIDE pixels, are not read: no camera makes them, and scaling such a frame's shorter side
#: to the clip size makes a huge or an empty picture (a 16 x 4000 frame would be 256 x 64000)
MAX_ASPECT, MIN_SIDE = 4, 16


def _check_size(path, width: int, height: int) -> None:
    """A :class:`VideoError` when a frame of width x height is out of bounds (0: not known yet)."""
    if not (width and height):
        return
    if min(width, height) < MIN_SIDE:
        raise VideoError(path, f"frame size {width} x {height}: a side under {MIN_SIDE} pixels (MIN_SIDE)")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise VideoError(path, f"frame size {width} x {height}: the longer side is "
                               f"{max(width, height) / min(width, height):.1f} times the shorter, more than "
                               f"{MAX_ASPECT} (MAX_ASPECT)")


def _decode(path, indices) -> torch.Tensor:
    frames = decode_frames(path, indices)
    _check_size(path, frames.shape[2], frames.shape[1])
    return frames


@dataclass(frozen=True)
class Skipped:
    """Stands for an item whose video could not be read."""

    path: str
    reason: str


class VideoDataset(Dataset):
    """Clips of the videos in ``annotations`` (module docstring).

    Keys are item indices, or ``(index, seed)`` pairs (what :class:`~nonlocalnet.engine.ClipSampler`
    yields) that make the random clip and augmentation a function of the seed alone, whatever the
    worker: a resumed run or another process count then sees the same clips.
    """

    def __init__(self, annotations: Annotations, mode: str = "train", *, frames: int = 32, rate: int = 2,
                 scales: tuple[int, int] = (256, 320), crop_size: int = 224, flip: bool = True,
                 test_scale: int = 256, test_crop: int = 256, clips: int = 10, crops: int = 3):
        if mode not in ("train", "test"):
            raise ValueError(f"mode: expected 'train' or 'test', got {mode!r}")
        if mode == "test" and test_crop == 0 and crops != 1:
            raise ValueError(f"crops: the whole frame (test_crop 0) is one view per clip, got {crops} crops")
        self.annotations, self.mode = annotations, mode
        self.records = annotations.records
        self.num_classes, self.multilabel = len(annotations.classes), annotations.multilabel
        self.frames, self.rate, self.scales, self.crop_size, self.flip = frames, rate, tuple(scales), crop_size, flip
        self.test_scale, self.test_crop, self.clips, self.crops = test_scale, test_crop, clips, crops
        self._infos: dict[int, VideoInfo] = {}

    def __len__(self) -> int:
        return len(self.records) * (self.clips if self.mode == "test" else 1)

    def target(self, video: int) -> torch.Tensor:
        record = self.records[video]
        if not self.multilabel:
            return torch.tensor(record.label)
        target = torch.zeros(self.num_classes)
        target[list(record.labels)] = 1.0
        return target

    def _length(self, video: int) -> int:
        """Frames of the video, probed once; a frame size out of bounds is a :class:`VideoError`."""
        if video not in self._infos:
            self._infos[video] = probe(self.records[video].path)
        info = self._infos[video]
        _check_size(info.path, info.width, info.height)
        return info.frames

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        video, clip = divmod(index, self.clips) if self.mode == "test" else (index, 0)
        path = self.records[video].path
        try:
            length = self._length(video)
            if length < 1:
                raise VideoError(path, "no frames")
            if self.mode == "train":
                generator = torch.Generator().manual_seed(seed) if seed is not None else None
                indices = train_clip_indices(length, self.frames, self.rate, generator)
                data = train_transform(_decode(path, indices), scales=self.scales, crop_size=self.crop_size,
                                       flip=self.flip, generator=generator)
            else:
                indices = uniform_clip_indices(length, self.frames, self.rate, self.clips)[clip]
                data = torch.stack(spatial_views(_decode(path, indices), scale=self.test_scale,
                                                 crop_size=self.test_crop, crops=self.crops))
        except VideoError as err:
            return Skipped(path, err.reason)
        return {"clip": data, "target": self.target(video), "video": video, "view": clip}


def collate(items: list) -> dict:
    """Batch the readable items; unreadable ones go to ``batch["skipped"]`` as :class:`Skipped`."""
    good = [item for item in items if not isinstance(item, Skipped)]
    batch = default_collate(good) if good else {}
    batch["skipped"] = [item for item in items if isinstance(item, Skipped)]
    return batch
