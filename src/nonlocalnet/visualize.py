"""What a non-local block attends to: the paper's Figures 1 and 3 for a clip (``nonlocalnet
visualize``; pictures need the ``plot`` extra).

For chosen query positions of a block's input map, :meth:`NonLocalBlock.attention_map` gives their
rows of f(x_i, .)/C(x) over the key map without forming the N x N matrix. Each query and its
``top`` highest-weighted keys are mapped to frame and pixel coordinates of the clip (the centre of
their feature cell) and drawn on the frames side by side: the query as a ring, arrows to its keys
with the weight shown by colour and width (``arrows``), or the query's weights over each frame as
a heat map (``heatmap``). Queries are given as (frame, y, x) pixels of the clip, or picked
automatically: the positions where the block changes its input the most (the largest norm of its
residual output).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from .block import NonLocalBlock

__all__ = ["Target", "QueryAttention", "find_block", "block_input", "strongest_queries", "query_attention",
           "pixel_of", "cell_of", "draw", "visualize_clip", "load_clip"]


@dataclass
class Target:
    frame: int
    y: float
    x: float
    weight: float


@dataclass
class QueryAttention:
    """One query (frame and pixel of the clip) with its highest-weighted keys, strongest first."""

    frame: int
    y: float
    x: float
    targets: list[Target]


def find_block(model: nn.Module, name: str) -> NonLocalBlock:
    """The non-local block called ``name``: a residual block that carries one (``res3.1``, the
    paper's naming in :class:`~nonlocalnet.models.ResNet3d`) or the block module itself."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        module = None
    module = getattr(module, "nonlocal_block", module)
    if not isinstance(module, NonLocalBlock):
        names = [n.removesuffix(".nonlocal_block") for n, m in model.named_modules() if isinstance(m, NonLocalBlock)]
        raise ValueError(f"block: expected one of the model's non-local blocks {names}, got {name!r}")
    return module


@torch.no_grad()
def block_input(model: nn.Module, block: NonLocalBlock, clip: torch.Tensor) -> torch.Tensor:
    """The block's input when ``model`` runs on ``clip`` (eval mode)."""
    seen = []
    handle = block.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    try:
        model.eval()(clip)
    finally:
        handle.remove()
    if not seen:
        raise ValueError("block: the model's forward pass never reached the block")
    return seen[0]


@torch.no_grad()
def strongest_queries(block: NonLocalBlock, x: torch.Tensor, count: int) -> list[int]:
    """Flat positions (of the first clip) where the block's residual output z - x is largest."""
    response = (block.eval()(x[:1]) - x[:1]).flatten(2).norm(dim=1)[0]
    return response.topk(min(count, response.numel())).indices.tolist()


def pixel_of(position: Sequence[int], map_shape: Sequence[int], clip_shape: Sequence[int]) -> tuple[int, float, float]:
    """The clip frame and pixel (y, x) at the centre of a feature cell (t, h, w) of a map."""
    (t, h, w), (mt, mh, mw), (ct, ch, cw) = position, map_shape, clip_shape
    frame = min(ct - 1, int((t + 0.5) * ct / mt))
    return frame, (h + 0.5) * ch / mh - 0.5, (w + 0.5) * cw / mw - 0.5


def cell_of(frame: int, y: float, x: float, map_shape: Sequence[int], clip_shape: Sequence[int]) -> int:
    """The flat index of the feature cell that covers a clip pixel."""
    (mt, mh, mw), (ct, ch, cw) = map_shape, clip_shape
    for value, size, name in ((frame, ct, "frame"), (y, ch, "y"), (x, cw, "x")):
        if not 0 <= value < size:
            raise ValueError(f"queries: {name} {value} is outside the clip (0..{size - 1})")
    t, h, w = int(frame * mt / ct), int(y * mh / ch), int(x * mw / cw)
    return (t * mh + h) * mw + w


def _spatial3(shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(shape)
    return (1,) * (3 - len(shape)) + shape  # 2-D maps are one frame


@torch.no_grad()
def query_attention(block: NonLocalBlock, x: torch.Tensor, queries: Sequence[int], clip_shape: Sequence[int],
                    top: int = 20) -> list[QueryAttention]:
    """For flat query positions of the block input ``x`` (first clip), the ``top`` keys with the
    largest weights, in clip coordinates ``clip_shape`` = (frames, height, width)."""
    weights = block.eval().attention_map(x[:1], list(queries))[0]  # (Q, M)
    query_map, key_map = _spatial3(x.shape[2:]), _spatial3(block.key_shape(x.shape))
    out = []
    for q, row in zip(queries, weights):
        values, keys = row.float().topk(min(top, row.numel()))
        frame, y, xx = pixel_of(np.unravel_index(int(q), query_map), query_map, clip_shape)
        targets = [Target(*pixel_of(np.unravel_index(int(k), key_map), key_map, clip_shape), float(v))
                   for v, k in zip(values, keys)]
        out.append(QueryAttention(frame, y, xx, targets))
    return out


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - the message is the test
        raise ImportError("attention pictures need matplotlib: pip install 'nonlocalnet[plot]'") from None
    return plt


def draw(frames: np.ndarray, attentions: list[QueryAttention], *, mode: str = "arrows", show: Sequence[int] | None = None,
         heat: list[np.ndarray] | None = None, title: str = ""):
    """A matplotlib figure: ``frames`` (T, H, W, 3) uint8 side by side (those in ``show``), the
    queries as rings and, per ``mode``, arrows to their keys (colour and width by weight) or
    ``heat`` maps (one (T, H, W) array per query, shown for the first query)."""
    if mode not in ("arrows", "heatmap"):
        raise ValueError(f"mode: expected 'arrows' or 'heatmap', got {mode!r}")
    plt = _pyplot()
    from matplotlib.patches import ConnectionPatch

    show = list(range(len(frames))) if show is None else list(show)
    height, width = frames.shape[1:3]
    figure, axes = plt.subplots(1, len(show), figsize=(2.2 * len(show) * width / height, 2.6), squeeze=False)
    axes = axes[0]
    column = {frame: i for i, frame in enumerate(show)}
    colours = plt.get_cmap("plasma")
    strongest = max((t.weight for a in attentions for t in a.targets), default=1.0) or 1.0
    for i, frame in enumerate(show):
        axes[i].imshow(frames[frame])
        if mode == "heatmap" and heat:
            axes[i].imshow(heat[0][frame], cmap="jet", alpha=0.45, extent=(-0.5, width - 0.5, height - 0.5, -0.5),
                           vmin=0, vmax=float(heat[0].max()) or 1.0)
        axes[i].set_title(f"frame {frame}", fontsize=8)
        axes[i].axis("off")
    for k, attention in enumerate(attentions):
        if attention.frame not in column:
            continue
        source = axes[column[attention.frame]]
        if mode == "arrows":
            for target in sorted(attention.targets, key=lambda t: t.weight):  # the strongest drawn last
                if target.frame not in column:
                    continue
                share = target.weight / strongest
                figure.add_artist(ConnectionPatch(
                    (attention.x, attention.y), (target.x, target.y), "data", "data", axesA=source,
                    axesB=axes[column[target.frame]], arrowstyle="-|>", color=colours(share), linewidth=0.5 + 2 * share,
                    mutation_scale=6 + 6 * share, alpha=0.85))
        source.plot(attention.x, attention.y, "o", markersize=9, markerfacecolor="none", markeredgecolor="lime",
                    markeredgewidth=2)
        source.annotate(str(k + 1), (attention.x, attention.y), color="lime", fontsize=8, xytext=(4, 4),
                        textcoords="offset points")
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    return figure


@torch.no_grad()
def _heat(block: NonLocalBlock, x: torch.Tensor, query: int, clip_shape: Sequence[int]) -> np.ndarray:
    """One query's weights over the key map, spread over the clip's frames and pixels."""
    row = block.attention_map(x[:1], [query])[0, 0].float()
    key_map = _spatial3(block.key_shape(x.shape))
    grid = row.reshape(1, 1, *key_map)
    return torch.nn.functional.interpolate(grid, size=tuple(clip_shape), mode="nearest")[0, 0].numpy()


def _image(figure) -> "PIL.Image.Image":  # noqa: F821
    from PIL import Image

    figure.canvas.draw()
    return Image.fromarray(np.asarray(figure.canvas.buffer_rgba())[..., :3].copy())


def visualize_clip(model: nn.Module, clip: torch.Tensor, frames: np.ndarray, block_name: str, out: str | os.PathLike,
                   *, queries: Sequence[tuple[int, float, float]] | None = None, count: int = 3, top: int = 20,
                   mode: str = "arrows", show: int = 8) -> dict:
    """Pictures of ``block_name``'s attention for one clip: ``clip`` the model input (1, 3, T, H, W),
    ``frames`` the same frames as uint8 (T, H, W, 3). Writes ``out`` as PNG (up to ``show`` frames)
    and beside it a GIF with one picture per query. Returns the queries and targets drawn."""
    if mode not in ("arrows", "heatmap"):
        raise ValueError(f"mode: expected 'arrows' or 'heatmap', got {mode!r}")
    if count < 1 or top < 1:
        raise ValueError(f"count / top: expected positive ints, got {count} / {top}")
    plt = _pyplot()
    block = find_block(model, block_name)
    x = block_input(model, block, clip)
    clip_shape = tuple(clip.shape[2:])
    query_map = _spatial3(x.shape[2:])
    if queries:
        flat = [cell_of(int(f), y, xx, query_map, clip_shape) for f, y, xx in queries]
    else:
        flat = strongest_queries(block, x, count)
    attentions = query_attention(block, x, flat, clip_shape, top)
    # the frames to show: the queries' and their strongest keys' first, then evenly spread ones
    wanted = [a.frame for a in attentions] + [t.frame for a in attentions for t in a.targets[:3]]
    chosen = list(dict.fromkeys(wanted))[:show]
    for frame in np.linspace(0, len(frames) - 1, show).round().astype(int).tolist():
        if len(chosen) < min(show, len(frames)) and frame not in chosen:
            chosen.append(frame)
    chosen.sort()
    heat = [_heat(block, x, q, clip_shape) for q in flat] if mode == "heatmap" else None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    title = f"{block_name}: {len(attentions)} queries, top {top} keys ({mode})"
    figure = draw(frames, attentions, mode=mode, show=chosen, heat=heat, title=title)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    pictures = []
    for k, attention in enumerate(attentions):
        figure = draw(frames, [attention], mode=mode, show=chosen, heat=heat[k:k + 1] if heat else None,
                      title=f"{block_name}: query {k + 1} of {len(attentions)}")
        pictures.append(_image(figure))
        plt.close(figure)
    gif = out.with_suffix(".gif")
    size = pictures[0].size
    pictures = [p.resize(size) for p in pictures]
    pictures[0].save(gif, save_all=True, append_images=pictures[1:], duration=1200, loop=0)
    return {"png": str(out), "gif": str(gif), "queries": [a.__dict__ | {"targets": [t.__dict__ for t in a.targets]}
                                                         for a in attentions]}


def load_clip(path: str | os.PathLike, frames: int, rate: int, size: int = 224) -> tuple[torch.Tensor, np.ndarray]:
    """The centre clip of a video as the model input (1, 3, T, size, size) (shorter side scaled to
    ``size``, centre crop, the official normalisation) and as uint8 frames for drawing."""
    from .data.decode import decode_frames, probe
    from .data.sampling import uniform_clip_indices
    from .data.transforms import MEAN, STD, spatial_views

    info = probe(path)
    indices = uniform_clip_indices(info.frames, frames, rate, clips=1)[0]
    decoded = decode_frames(path, indices)
    view = spatial_views(decoded, scale=size, crop_size=size, crops=1)[0]
    pixels = (view * STD + MEAN).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0).numpy()
    return view.unsqueeze(0), pixels
