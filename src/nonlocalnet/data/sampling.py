"""Which frames a clip takes (docs/paper.md §4.1, §4.3; official ``DecodeClipFromVideoFileFlex``).

A clip is ``frames`` indices ``rate`` apart. Training starts it uniformly at random so that its
span of frames x rate fits; testing takes ``clips`` clips starting at int(k * n / clips). A
video shorter than the span loops: indices wrap modulo its length, as the official decoder does.
"""

from __future__ import annotations

import torch

__all__ = ["train_clip_indices", "uniform_clip_indices"]


def _check(num_frames: int, frames: int, rate: int) -> None:
    if num_frames < 1:
        raise ValueError(f"num_frames: expected a video with at least 1 frame, got {num_frames}")
    if frames < 1 or rate < 1:
        raise ValueError(f"frames, rate: expected positive ints, got frames={frames}, rate={rate}")


def _clip(start: int, num_frames: int, frames: int, rate: int) -> list[int]:
    return [(start + k * rate) % num_frames for k in range(frames)]


def train_clip_indices(num_frames: int, frames: int = 32, rate: int = 2, generator: torch.Generator | None = None,
                       ) -> list[int]:
    """One training clip: start uniform in [0, num_frames - frames * rate] (0 when it does not fit)."""
    _check(num_frames, frames, rate)
    last_start = max(num_frames - frames * rate, 0)
    start = int(torch.randint(last_start + 1, (1,), generator=generator))
    return _clip(start, num_frames, frames, rate)


def uniform_clip_indices(num_frames: int, frames: int = 32, rate: int = 2, clips: int = 10) -> list[list[int]]:
    """``clips`` test clips, clip k starting at frame int(k * num_frames / clips) (paper: 10)."""
    _check(num_frames, frames, rate)
    if clips < 1:
        raise ValueError(f"clips: expected a positive int, got {clips}")
    return [_clip(int(k * num_frames / clips), num_frames, frames, rate) for k in range(clips)]
