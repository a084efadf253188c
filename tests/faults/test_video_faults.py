"""The bad-video corpus: files a data set may hold that are not videos one can train on.

Faults injected, one file each: a zero-byte file, an mp4 cut in half, a text file named .mp4, an
audio-only file, a 2 x 2 video, a 16 x 4000 video, a path that does not exist, and a file whose
name is not UTF-8. ``probe`` and ``decode_frames`` raise a :class:`VideoError` naming the file or
return the frames as they are; :class:`VideoDataset` (train and test mode) gives a
:class:`Skipped` item with the file and the reason, never an exception and never a huge allocation.
"""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from nonlocalnet.data.datasets import Annotations, Skipped, VideoDataset, VideoRecord
from nonlocalnet.data.decode import VideoError, _av, decode_frames, probe
from nonlocalnet.data.synthetic import write_video


def _flat(height, width, frames=8):
    return np.full((frames, height, width, 3), 128, np.uint8)


def _audio_only(path):
    av = _av()
    with av.open(os.fspath(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_set):
    root = tmp_path_factory.mktemp("corpus")
    good = (tiny_set / "videos/train/00000.mp4").read_bytes()
    (root / "empty.mp4").write_bytes(b"")
    (root / "truncated.mp4").write_bytes(good[: len(good) // 2])
    (root / "text.mp4").write_text("not a video\n" * 50)
    _audio_only(root / "audio.mkv")
    write_video(root / "tiny.mp4", _flat(2, 2))  # x264 needs even sizes: 2 x 2 is its smallest
    write_video(root / "wide.mp4", _flat(16, 4000))
    Path(os.fsdecode(os.fsencode(root) + b"/\xff.mp4")).write_text("not a video either\n" * 50)
    return root


# file -> (what the dataset's Skipped says, what probe and decode_frames say: None when the frames decode)
CORPUS = {
    "empty.mp4": (r"empty file \(0 bytes\)",) * 2,
    "truncated.mp4": (r"cannot open \(.+\)|corrupt stream \(.+\)|no frames",) * 2,
    "text.mp4": (r"cannot open \(.+\)",) * 2,
    "audio.mkv": ("no video stream",) * 2,
    "tiny.mp4": (r"frame size 2 x 2: a side under 16 pixels \(MIN_SIDE\)", None),
    "wide.mp4": (r"frame size 4000 x 16: the longer side is 250\.0 times the shorter, more than 4 \(MAX_ASPECT\)",
                 None),
    "absent.mp4": ("no such file",) * 2,
    b"\xff.mp4": (r"cannot open \(.+\)",) * 2,
}


@pytest.mark.parametrize("name", CORPUS, ids=lambda n: os.fsdecode(n).encode("ascii", "backslashreplace").decode())
def test_bad_videos_are_skipped_by_name(corpus, name):
    path = os.fsdecode(os.fsencode(corpus) + b"/" + os.fsencode(name))
    skipped, decoded = CORPUS[name]
    if decoded is None:  # a real video: it decodes, small, as it is
        assert probe(path).frames == 8 and decode_frames(path, [0, 7]).shape[0] == 2
    else:
        for read in (probe, lambda p: decode_frames(p, [0, 1])):
            with pytest.raises(VideoError, match=decoded) as info:
                read(path)
            assert info.value.path == path and repr(path) in str(info.value)
    annotations = Annotations([VideoRecord(path, (0,))], ["a", "b"])
    for dataset in (VideoDataset(annotations, frames=4, rate=2),  # the paper's sizes: 256-320, 224 crops
                    VideoDataset(annotations, "test", frames=4, rate=2, clips=2, crops=3)):
        for key in ((0, 1), 0) if dataset.mode == "train" else (0, 1):
            item = dataset[key]
            assert isinstance(item, Skipped) and item.path == path, item
            assert re.fullmatch(skipped, item.reason), item.reason


@pytest.mark.slow  # a fresh interpreter: ~10 s on a loaded 2-core machine
@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in KiB is Linux's")
def test_resizing_a_wide_clip_takes_memory_for_its_crop_alone(corpus):
    """The bound lifted, the 16 x 4000 clip goes through the paper's augmentation and test views:
    resizing the whole frame first (to 256 x 64000) took 1.6 GB for 8 frames; the crop alone, MBs."""
    code = textwrap.dedent(f"""
        import resource
        from nonlocalnet.data import datasets
        from nonlocalnet.data.datasets import Annotations, VideoDataset, VideoRecord
        datasets.MAX_ASPECT, datasets.MIN_SIDE = 1000, 1
        def items(name):
            ann = Annotations([VideoRecord({str(corpus)!r} + "/" + name, (0,))], ["a"])
            return VideoDataset(ann, frames=8, rate=1)[(0, 0)], VideoDataset(ann, "test", frames=8, rate=1, clips=1)[0]
        items("tiny.mp4")  # libraries and kernels loaded
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        train, test = items("wide.mp4")
        assert train["clip"].shape == (3, 8, 224, 224) and test["clip"].shape == (3, 3, 8, 256, 256)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert int(run.stdout) < 150, f"peak memory grew by {run.stdout.strip()} MiB"
