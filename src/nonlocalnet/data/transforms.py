"""The paper's spatial augmentation and test views (shared/PAPER.md §3.1, §3.4).

Clips are uint8 (T, H, W, 3) from :func:`~nonlocalnet.data.decode.decode_frames` in, float
(3, T, H, W) out, normalised as the official code: (pixel - 114.75) / 57.375, RGB.

- Training: shorter side scaled to an integer uniform in [256, 320] (aspect kept), a random
  224 x 224 crop, horizontal flip with p = 0.5.
- Testing: shorter side scaled to 256, then 3 crops of 256 x 256 at the start, middle and end of
  the longer side (the official release's approximation of full-frame testing), or 1 centre crop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["MEAN", "STD", "to_float", "resize_short_side", "crop", "normalize", "train_transform", "spatial_views"]

MEAN, STD = 114.75, 57.375  # official MODEL.MEAN, MODEL.STD


def to_float(clip: torch.Tensor) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float32 (3, T, H, W), values still in [0, 255]."""
    if clip.dim() != 4 or clip.shape[-1] != 3:
        raise ValueError(f"clip: expected frames (T, H, W, 3), got shape {tuple(clip.shape)}")
    return clip.permute(3, 0, 1, 2).float()


def resize_short_side(clip: torch.Tensor, size: int) -> torch.Tensor:
    """(3, T, H, W): scale so that min(H, W) == size, aspect kept (bilinear, antialiased down)."""
    h, w = clip.shape[-2:]
    if min(h, w) == size:
        return clip
    new = (size, max(1, round(w * size / h))) if h <= w else (max(1, round(h * size / w)), size)
    frames = clip.transpose(0, 1)  # (T, 3, H, W): frames as the batch
    out = F.interpolate(frames, size=new, mode="bilinear", align_corners=False, antialias=min(new) < min(h, w))
    return out.transpose(0, 1)


def crop(clip: torch.Tensor, top: int, left: int, size: int) -> torch.Tensor:
    h, w = clip.shape[-2:]
    if not (0 <= top <= h - size and 0 <= left <= w - size):
        raise ValueError(f"crop: a {size} x {size} crop at ({top}, {left}) does not fit a {h} x {w} frame")
    return clip[..., top : top + size, left : left + size]


def normalize(clip: torch.Tensor) -> torch.Tensor:
    return (clip - MEAN) / STD


def train_transform(frames: torch.Tensor, *, scales: tuple[int, int] = (256, 320), crop_size: int = 224,
                    flip: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """Scale jitter, random crop and flip of one training clip: uint8 (T, H, W, 3) -> (3, T, S, S)."""
    low, high = scales
    if not 0 < low <= high or crop_size > low:
        raise ValueError(f"scales, crop_size: expected 0 < low <= high and crop_size <= low, got {scales}, {crop_size}")
    short = int(torch.randint(low, high + 1, (1,), generator=generator))
    clip = resize_short_side(to_float(frames), short)
    h, w = clip.shape[-2:]
    top = int(torch.randint(h - crop_size + 1, (1,), generator=generator))
    left = int(torch.randint(w - crop_size + 1, (1,), generator=generator))
    clip = crop(clip, top, left, crop_size)
    if flip and bool(torch.rand((), generator=generator) < 0.5):
        clip = clip.flip(-1)
    return normalize(clip)


def spatial_views(frames: torch.Tensor, *, scale: int = 256, crop_size: int = 256, crops: int = 3) -> list[torch.Tensor]:
    """The spatial views of one test clip: ``crops`` = 3 (start / middle / end of the longer side)
    or 1 (centre). uint8 (T, H, W, 3) -> list of (3, T, S, S)."""
    if crops not in (1, 3):
        raise ValueError(f"crops: expected 1 or 3, got {crops}")
    if crop_size > scale:
        raise ValueError(f"crop_size: expected at most scale={scale}, got {crop_size}")
    clip = normalize(resize_short_side(to_float(frames), scale))
    h, w = clip.shape[-2:]
    centre = ((h - crop_size) // 2, (w - crop_size) // 2)
    if crops == 1:
        return [crop(clip, *centre, crop_size)]
    if w >= h:  # along the width
        return [crop(clip, centre[0], left, crop_size) for left in (0, (w - crop_size) // 2, w - crop_size)]
    return [crop(clip, top, centre[1], crop_size) for top in (0, (h - crop_size) // 2, h - crop_size)]
