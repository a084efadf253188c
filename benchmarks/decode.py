"""Video reading speed: our PyAV reader against pytorchvideo's, and against the training step it feeds.

Cases (videos written here with PyAV, H.264):
- ``builtin``: the built-in job's videos (80x72, 16 frames at 8 fps); an 8x2 training clip, as the
  default job reads it, and the default job's NL network's training step on a batch of 16.
- ``kinetics``: a Kinetics-like clip (340x256, 10 s at 30 fps, keyframe every 60 frames); a
  random 32x2 training clip, and the 10 clips of the paper's test.

Rows: ``ours`` (``decode_frames``, one FFmpeg thread: the default), ``ours_ffmpeg_threads``
(FFmpeg's own threading, ``threads=0``), ``ours_item`` (the whole VideoDataset item: decode,
scale jitter, crop, flip, normalise), ``pytorchvideo`` (``EncodedVideo`` with its PyAV decoder,
``get_clip`` over the clip's time span; it decodes every frame of the span). Median of ``--repeats``
passes over ``--videos`` files, in ms per clip.

    python benchmarks/decode.py --out benchmarks/results-decode.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch

from nonlocalnet.data.datasets import Annotations, VideoDataset, VideoRecord
from nonlocalnet.data.decode import decode_frames, probe
from nonlocalnet.data.synthetic import render_video, write_video


def write_kinetics_like(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    frames, height, width = 300, 256, 340
    yy, xx = np.mgrid[0:height, 0:width]
    phase = rng.uniform(0, 6.28, 3)
    video = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):  # moving colour waves and noise: motion the encoder has to code
        image = np.stack([127 + 100 * np.sin(xx / 23.0 + t / 9.0 + phase[c] + yy / 31.0) for c in range(3)], -1)
        video[t] = np.clip(image + rng.normal(0, 6, image.shape), 0, 255)
    write_video(path, video, fps=30, crf=23, gop=60)


def timed(fn, items, repeats: int) -> float:
    """Median over passes of the mean ms per item."""
    fn(items[0])  # warm-up
    passes = []
    for _ in range(repeats):
        start = time.perf_counter()
        for item in items:
            fn(item)
        passes.append((time.perf_counter() - start) * 1000 / len(items))
    return statistics.median(passes)


def pytorchvideo_clip(path: str, start_s: float, end_s: float):
    from pytorchvideo.data.encoded_video import EncodedVideo

    video = EncodedVideo.from_path(path, decoder="pyav", decode_audio=False)
    clip = video.get_clip(start_s, end_s)["video"]
    video.close()
    return clip


def run_case(name, files, fps, frames, rate, repeats, rng, extra):
    lengths = {f: probe(f).frames for f in files}
    starts = {f: int(rng.integers(0, max(1, lengths[f] - frames * rate) + 1)) for f in files}

    def indices(f):
        return [(starts[f] + k * rate) % lengths[f] for k in range(frames)]

    rows = {
        "ours": timed(lambda f: decode_frames(f, indices(f)), files, repeats),
        "ours_ffmpeg_threads": timed(lambda f: decode_frames(f, indices(f), threads=0), files, repeats),
    }
    try:
        rows["pytorchvideo"] = timed(lambda f: pytorchvideo_clip(f, starts[f] / fps, (starts[f] + frames * rate) / fps),
                                     files, repeats)
    except ImportError:
        rows["pytorchvideo"] = None
    dataset = VideoDataset(Annotations([VideoRecord(f, (0,)) for f in files], ["x"]), frames=frames, rate=rate,
                           **extra)
    rows["ours_item"] = timed(lambda i: dataset[(i, i)], list(range(len(files))), repeats)
    return rows


def model_step_ms(repeats: int) -> float:
    """One training step (forward + backward + SGD) of the default job's NL network, batch 16."""
    from nonlocalnet.cli import _recipe
    from nonlocalnet.config import load_config
    from nonlocalnet.engine import build_model

    cfg = load_config(_recipe(None))
    model = build_model(cfg.model, 2).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(16, 3, 8, 64, 64), torch.randint(0, 2, (16,))

    def step(_):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    return timed(step, list(range(5)), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a data-loader worker's setting
    rng = np.random.default_rng(0)
    results = {"env": {"python": platform.python_version(), "torch": torch.__version__, "av": av.__version__,
                       "ffmpeg": ".".join(map(str, av.library_versions["libavcodec"])),
                       "machine": platform.processor() or platform.machine()}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        builtin = []
        for i in range(args.videos):
            builtin.append(str(tmp / f"b{i}.mp4"))
            write_video(builtin[-1], render_video(rng, bool(i % 2)), fps=8)
        kinetics = []
        for i in range(max(4, args.videos // 4)):
            kinetics.append(str(tmp / f"k{i}.mp4"))
            write_kinetics_like(Path(kinetics[-1]), i)
        results["builtin 8x2"] = run_case("builtin", builtin, 8, 8, 2, args.repeats, rng,
                                          {"scales": (64, 80), "crop_size": 64})
        results["kinetics 32x2"] = run_case("kinetics", kinetics, 30, 32, 2, args.repeats, rng, {})
        test = VideoDataset(Annotations([VideoRecord(f, (0,)) for f in kinetics], ["x"]), "test")
        results["kinetics test view (10 clips x 3 crops, per clip)"] = {
            "ours_item": timed(lambda i: test[i], list(range(len(test))), 1)}
    torch.set_num_threads(2)
    results["default NL model training step, batch 16 (2 threads)"] = {"ms": model_step_ms(args.repeats)}
    for case, rows in results.items():
        if case == "env":
            print("env:", ", ".join(f"{k} {v}" for k, v in rows.items()))
            continue
        print(f"{case}: " + ", ".join(f"{k} {'n/a' if v is None else f'{v:.2f} ms'}" for k, v in rows.items()))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
