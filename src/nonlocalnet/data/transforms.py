"""The paper's spatial augmentation and test views (docs/paper.md §4.1, §4.3).

Clips are uint8 (T, H, W, 3) from :func:`~nonlocalnet.data.decode.decode_frames` in, float
(3, T, H, W) out, normalised as the official code: (pixel - 114.75) / 57.375, RGB.

- Training: shorter side scaled to an integer uniform in [256, 320] (aspect kept), a random
  224 x 224 crop, horizontal flip with p = 0.5.
- Testing: shorter side scaled to 256, then 3 crops of 256 x 256 at the start, middle and end of
  the longer side (the official release's approximation of full-frame testing), or 1 centre crop.

Both resize only the part of the frame that ends up in a crop (:func:`resized_crop`): the pixels are
those of resizing the whole frame and cropping after, but the memory and time are those of the crop,
whatever the frame's shape (a 16 x 4000 frame scaled to a shorter side of 256 would be 64000 wide).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["MEAN", "STD", "to_float", "resize_short_side", "resized_size", "resized_crop", "crop", "normalize",
           "train_transform", "spatial_views"]

MEAN, STD = 114.75, 57.375  # official MODEL.MEAN, MODEL.STD
_CHUNK = 1 << 22  # source values converted to float at once by resized_crop (16 MB)


def _check_frames(clip: torch.Tensor) -> None:
    if clip.dim() != 4 or clip.shape[-1] != 3:
        raise ValueError(f"clip: expected frames (T, H, W, 3), got shape {tuple(clip.shape)}")


def to_float(clip: torch.Tensor) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float32 (3, T, H, W), values still in [0, 255]."""
    _check_frames(clip)
    return clip.permute(3, 0, 1, 2).float()


def resized_size(h: int, w: int, size: int) -> tuple[int, int]:
    """(H, W) scaled so that the shorter side is ``size``, aspect kept (the longer side rounded)."""
    return (size, max(1, round(w * size / h))) if h <= w else (max(1, round(h * size / w)), size)


def resize_short_side(clip: torch.Tensor, size: int) -> torch.Tensor:
    """(3, T, H, W): scale so that min(H, W) == size, aspect kept (bilinear, antialiased down)."""
    h, w = clip.shape[-2:]
    if min(h, w) == size:
        return clip
    new = resized_size(h, w, size)
    frames = clip.transpose(0, 1)  # (T, 3, H, W): frames as the batch
    out = F.interpolate(frames, size=new, mode="bilinear", align_corners=False, antialias=min(new) < min(h, w))
    return out.transpose(0, 1)


def _taps(n_in: int, n_out: int, first: int, count: int, antialias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Source indices and weights, (count, taps), of outputs ``first`` .. ``first + count - 1`` of a
    linear resize of ``n_in`` samples to ``n_out``, as ``F.interpolate(mode="bilinear",
    align_corners=False)`` computes them (ATen's UpSample kernels; ``antialias``: a triangle filter
    as wide as the scale when shrinking). Padding taps have weight 0."""
    scale = float(torch.tensor(n_in, dtype=torch.float32) / n_out)  # in float32, as ATen computes it
    out = torch.arange(first, first + count, dtype=torch.float32)
    if antialias:
        support, inverse = (scale, 1 / scale) if scale >= 1 else (1.0, 1.0)
        centre = scale * (out + 0.5)
        low = (centre - support + 0.5).floor().clamp(min=0)
        high = (centre + support + 0.5).floor().clamp(max=n_in)
        index = low[:, None] + torch.arange(int((high - low).max()), dtype=torch.float32)
        weight = (1 - ((index - centre[:, None] + 0.5) * inverse).abs()).clamp(min=0) * (index < high[:, None])
        weight = weight / weight.sum(1, keepdim=True)
        index = index.clamp(max=n_in - 1)
    else:
        source = (scale * (out + 0.5) - 0.5).clamp(min=0)
        below = source.floor()
        index = torch.stack([below, torch.where(below < n_in - 1, below + 1, below)], 1)
        weight = torch.stack([1 - (source - below), source - below], 1)
    return index.long(), weight.float()


def resized_crop(frames: torch.Tensor, size: tuple[int, int], top: int, left: int,
                 crop_size: int | tuple[int, int]) -> torch.Tensor:
    """``crop(resize_short_side(to_float(frames), ...), top, left, crop_size)`` with the frames
    resized to ``size`` = (H', W'), computed from the source pixels that the crop needs alone, a
    few frames at a time: uint8 (T, H, W, 3) -> float (3, T, S, S), or (3, T, S_h, S_w) for a
    ``crop_size`` of (S_h, S_w)."""
    _check_frames(frames)
    (h, w), (new_h, new_w) = frames.shape[1:3], size
    crop_h, crop_w = (crop_size, crop_size) if isinstance(crop_size, int) else crop_size
    _check_crop(new_h, new_w, top, left, (crop_h, crop_w))
    if (new_h, new_w) == (h, w):
        return to_float(frames[:, top : top + crop_h, left : left + crop_w])
    antialias = min(new_h, new_w) < min(h, w)
    rows, row_weights = _taps(h, new_h, top, crop_h, antialias)
    cols, col_weights = _taps(w, new_w, left, crop_w, antialias)
    y0, x0 = int(rows.min()), int(cols.min())
    region = frames[:, y0 : int(rows.max()) + 1, x0 : int(cols.max()) + 1]
    # the two resizes as products with banded matrices (BLAS beats gathers even so)
    by_rows = torch.zeros(crop_h, region.shape[1]).scatter_add_(1, rows - y0, row_weights)
    by_cols = torch.zeros(crop_w, region.shape[2]).scatter_add_(1, cols - x0, col_weights).T
    out = torch.empty(3, len(frames), crop_h, crop_w)
    step = max(1, _CHUNK // region[0].numel())  # frames whose region is converted to float at once
    for t in range(0, len(frames), step):
        out[:, t : t + step] = by_rows @ to_float(region[t : t + step]) @ by_cols
    return out


def _check_crop(h: int, w: int, top: int, left: int, size: int | tuple[int, int]) -> None:
    size_h, size_w = (size, size) if isinstance(size, int) else size
    if not (0 <= top <= h - size_h and 0 <= left <= w - size_w):
        raise ValueError(f"crop: a {size_h} x {size_w} crop at ({top}, {left}) does not fit a {h} x {w} frame")


def crop(clip: torch.Tensor, top: int, left: int, size: int) -> torch.Tensor:
    _check_crop(*clip.shape[-2:], top, left, size)
    return clip[..., top : top + size, left : left + size]


def normalize(clip: torch.Tensor) -> torch.Tensor:
    return (clip - MEAN) / STD


def train_transform(frames: torch.Tensor, *, scales: tuple[int, int] = (256, 320), crop_size: int = 224,
                    flip: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """Scale jitter, random crop and flip of one training clip: uint8 (T, H, W, 3) -> (3, T, S, S)."""
    low, high = scales
    if not 0 < low <= high or crop_size > low:
        raise ValueError(f"scales, crop_size: expected 0 < low <= high and crop_size <= low, got {scales}, {crop_size}")
    _check_frames(frames)
    short = int(torch.randint(low, high + 1, (1,), generator=generator))
    h, w = resized_size(*frames.shape[1:3], short)
    top = int(torch.randint(h - crop_size + 1, (1,), generator=generator))
    left = int(torch.randint(w - crop_size + 1, (1,), generator=generator))
    clip = resized_crop(frames, (h, w), top, left, crop_size)
    if flip and bool(torch.rand((), generator=generator) < 0.5):
        clip = clip.flip(-1)
    return normalize(clip)


def spatial_views(frames: torch.Tensor, *, scale: int = 256, crop_size: int = 256, crops: int = 3) -> list[torch.Tensor]:
    """The spatial views of one test clip: ``crops`` = 3 (start / middle / end of the longer side)
    or 1 (centre). uint8 (T, H, W, 3) -> list of (3, T, S, S). ``crop_size`` 0: the whole frame
    scaled to a shorter side of ``scale`` (the paper's fully convolutional test, §4.1), one view
    (3, T, H', W')."""
    if crops not in (1, 3):
        raise ValueError(f"crops: expected 1 or 3, got {crops}")
    if crop_size > scale or crop_size < 0:
        raise ValueError(f"crop_size: expected 0 (the whole frame) up to scale={scale}, got {crop_size}")
    if crop_size == 0 and crops != 1:
        raise ValueError(f"crops: the whole frame (crop_size 0) is one view, got {crops} crops")
    _check_frames(frames)
    h, w = resized_size(*frames.shape[1:3], scale)
    if crop_size == 0:
        return [normalize(resized_crop(frames, (h, w), 0, 0, (h, w)))]
    centre = ((h - crop_size) // 2, (w - crop_size) // 2)
    if crops == 1:
        corners = [centre]
    elif w >= h:  # along the width
        corners = [(centre[0], left) for left in (0, (w - crop_size) // 2, w - crop_size)]
    else:
        corners = [(top, centre[1]) for top in (0, (h - crop_size) // 2, h - crop_size)]
    return [normalize(resized_crop(frames, (h, w), top, left, crop_size)) for top, left in corners]
