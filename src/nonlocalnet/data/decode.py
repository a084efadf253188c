"""Video decoding with PyAV (the ``video`` extra): probe a file, decode frames by index.

Frames are numbered from 0 in presentation order at the stream's average rate. A request
decodes forward once from the nearest keyframe before its first index, so a clip of consecutive
frames costs one seek. Every failure is a :class:`VideoError` that names the file and the reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction
from os import PathLike
from typing import Sequence

import torch

__all__ = ["VideoError", "VideoInfo", "probe", "decode_frames"]

_SEQUENTIAL_BELOW = 48  # first index under which decoding from the start beats a seek


class VideoError(ValueError):
    """A video that cannot be read: missing, empty, corrupt, without a video stream."""

    def __init__(self, path, reason: str):
        super().__init__(f"video {os.fspath(path)!r}: {reason}")
        self.path, self.reason = os.fspath(path), reason


def _av():
    try:
        import av
    except ImportError:  # pragma: no cover - the message is the test
        raise ImportError("video decoding needs PyAV: pip install 'nonlocalnet[video]'") from None
    return av


@dataclass(frozen=True)
class VideoInfo:
    path: str
    frames: int  # frames that decode
    fps: float
    width: int
    height: int

    @property
    def duration(self) -> float:
        return self.frames / self.fps if self.fps else 0.0


def _open(path):
    av = _av()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise VideoError(path, "no such file")
    if os.path.getsize(path) == 0:
        raise VideoError(path, "empty file (0 bytes)")
    try:
        container = av.open(path)
    except av.FFmpegError as err:
        raise VideoError(path, f"cannot open ({err})") from None
    if not container.streams.video:
        container.close()
        raise VideoError(path, "no video stream")
    return container


def _rate(stream) -> Fraction:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return Fraction(rate) if rate else Fraction(30)


def probe(path: str | PathLike) -> VideoInfo:
    """Frame count, rate and size. The count is that of the packets that carry a frame (no
    decoding), which is exact for the usual codecs; ``decode_frames`` still stops at the real end."""
    container = _open(path)
    try:
        stream = container.streams.video[0]
        try:
            frames = sum(1 for packet in container.demux(stream) if packet.size)
        except _av().FFmpegError as err:
            raise VideoError(path, f"corrupt stream ({err})") from None
        if frames == 0:
            raise VideoError(path, "no frames")
        return VideoInfo(os.fspath(path), frames, float(_rate(stream)), stream.codec_context.width,
                         stream.codec_context.height)
    finally:
        container.close()


def decode_frames(path: str | PathLike, indices: Sequence[int], *, threads: int = 1) -> torch.Tensor:
    """RGB frames at the given indices (any order, repeats allowed) as uint8 (T, H, W, 3).

    Indices past the last frame that decodes take the last frame (a stream can end early, e.g.
    a truncated file); negative indices are an error. ``threads``: FFmpeg decoding threads; 1 by
    default, because data loaders decode in parallel workers and FFmpeg's own threads then compete
    with them and with the training step for the same cores (on an idle 2-core machine they saved
    3-17% per clip, BENCHMARKS.md); 0: FFmpeg's choice (frame and slice threads, one per core).
    """
    if threads < 0:
        raise ValueError(f"threads: expected 0 (FFmpeg's choice) or a positive count, got {threads}")
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError("indices: expected at least one frame index, got none")
    if min(indices) < 0:
        raise ValueError(f"indices: expected frame indices >= 0, got {min(indices)}")
    wanted = sorted(set(indices))
    container = _open(path)
    try:
        stream = container.streams.video[0]
        if threads != 1:
            stream.thread_type = "AUTO"
        stream.codec_context.thread_count = threads
        frames = _decode_sorted(container, stream, wanted, path)
    finally:
        container.close()
    if not frames:
        raise VideoError(path, "no frame decodes")
    sizes = sorted({tuple(f.shape[:2]) for f in frames.values()})
    if len(sizes) > 1:
        raise VideoError(path, f"the frame size changes within the clip ({' and '.join(f'{w} x {h}' for h, w in sizes)})")
    return torch.stack([frames[i] for i in indices])


def _rgb(reformatter, frame) -> torch.Tensor:
    return torch.from_numpy(reformatter.reformat(frame, format="rgb24").to_ndarray())


def _decode_sorted(container, stream, wanted: list[int], path) -> dict[int, torch.Tensor]:
    av = _av()
    from av.video.reformatter import VideoReformatter

    reformatter = VideoReformatter()  # one conversion context per clip, not one per frame (a third faster)
    rate, time_base = _rate(stream), stream.time_base
    start = stream.start_time or 0
    first, last = wanted[0], wanted[-1]
    if first >= _SEQUENTIAL_BELOW and time_base:
        target = start + int(Fraction(first) / rate / time_base)
        try:
            container.seek(target, stream=stream, backward=True, any_frame=False)
        except av.FFmpegError as err:
            raise VideoError(path, f"cannot seek to frame {first} ({err})") from None
    out, pending, index, previous = {}, set(wanted), None, None
    try:
        for frame in container.decode(stream):
            if index is None:  # after a seek, place the first frame by its timestamp
                index = 0 if first < _SEQUENTIAL_BELOW or frame.pts is None else round(
                    (frame.pts - start) * time_base * rate)
            else:
                index += 1
            previous = frame
            if index in pending:
                out[index] = _rgb(reformatter, frame)
                pending.discard(index)
            if index >= last or not pending:
                break
    except av.FFmpegError as err:
        if previous is None:
            raise VideoError(path, f"corrupt stream ({err})") from None
    if pending and previous is not None:  # the stream ended early: repeat its last frame
        tail = _rgb(reformatter, previous)
        out.update({i: tail for i in pending})
    return out
