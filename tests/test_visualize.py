"""Attention pictures: on a planted input the arrows land where an independent computation of the
affinity says; automatic queries, coordinates, the PNG/GIF files and the CLI."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

pytest.importorskip("matplotlib")
Image = pytest.importorskip("PIL.Image")

from nonlocalnet import NonLocalBlock  # noqa: E402
from nonlocalnet import visualize as vis  # noqa: E402

SHAPE = (4, 6, 7)  # T, H, W of the planted map
QUERY, PARTNERS = (0, 1, 2), [(3, 4, 5), (2, 0, 6)]


def planted():
    """A block whose affinity is x_i . x_j and an input in which the query position and two
    partners (other frames, far away) share a strong feature that nothing else has."""
    block = NonLocalBlock(6, inner_channels=6, mode="embedded_gaussian", subsample=False, scale=False)
    with torch.no_grad():
        for conv in (block.theta, block.phi):
            conv.weight.copy_(torch.eye(6).view(6, 6, 1, 1, 1))
            conv.bias.zero_()
    generator = torch.Generator().manual_seed(1)
    x = 0.3 * torch.randn(1, 6, *SHAPE, generator=generator)
    feature = torch.tensor([3.0, -2.0, 2.5, 0.0, 1.0, -1.5])
    for t, h, w in [QUERY, *PARTNERS]:
        x[0, :, t, h, w] = feature + 0.05 * torch.randn(6, generator=generator)
    return block, x


def test_arrows_point_where_an_independent_affinity_says(tmp_path):
    block, x = planted()
    model = nn.Sequential(block)
    frames = (np.random.default_rng(0).random((*SHAPE, 3)) * 255).astype(np.uint8)
    result = vis.visualize_clip(model, x, frames, "0", tmp_path / "att.png", queries=[QUERY], top=3)
    targets = [(t["frame"], round(t["y"]), round(t["x"])) for t in result["queries"][0]["targets"]]
    assert set(targets) == {QUERY, *PARTNERS}  # the query itself and its two partners
    # independently: the full affinity row of the query, softmax, its top 3
    flat = x[0].flatten(1)
    row = torch.softmax(flat[:, np.ravel_multi_index(QUERY, SHAPE)] @ flat, 0)
    expected = [np.unravel_index(int(i), SHAPE) for i in row.topk(3).indices]
    assert targets == [tuple(int(v) for v in e) for e in expected]
    weights = [t["weight"] for t in result["queries"][0]["targets"]]
    assert weights == pytest.approx(row.topk(3).values.tolist(), rel=1e-5)
    with Image.open(result["png"]) as png:
        assert png.format == "PNG" and png.size[0] > png.size[1]
    with Image.open(result["gif"]) as gif:
        assert gif.format == "GIF" and gif.n_frames == 1


def test_drawn_arrows_start_at_the_query_and_end_at_its_keys():
    from matplotlib.patches import ConnectionPatch

    block, x = planted()
    frames = np.zeros((*SHAPE, 3), np.uint8)
    attention = vis.query_attention(block, x, [np.ravel_multi_index(QUERY, SHAPE)], SHAPE, top=3)
    figure = vis.draw(frames, attention)
    arrows = [a for a in figure.artists if isinstance(a, ConnectionPatch)]
    assert len(arrows) == 3
    assert {tuple(a.xy1) for a in arrows} == {(QUERY[2], QUERY[1])}  # (x, y) in the query's frame
    assert {(a.axesB, tuple(a.xy2)) for a in arrows} == {(figure.axes[t], (w, h)) for t, h, w in [QUERY, *PARTNERS]}
    strongest, top = max(arrows, key=lambda a: a.get_linewidth()), attention[0].targets[0]
    assert strongest.axesB is figure.axes[top.frame] and tuple(strongest.xy2) == (top.x, top.y)  # widest: largest


def test_automatic_queries_are_the_largest_residual_responses():
    block, x = planted()
    torch.nn.init.normal_(block.norm.weight)  # a block that does something (BN scale starts at 0)
    block.eval()
    with torch.no_grad():
        response = (block(x) - x)[0].flatten(1).norm(dim=0)
    assert vis.strongest_queries(block, x, 4) == response.topk(4).indices.tolist()


def test_coordinates_map_cells_and_pixels_both_ways():
    map_shape, clip_shape = (4, 7, 7), (32, 224, 224)
    for t, h, w in [(0, 0, 0), (3, 6, 6), (2, 3, 5)]:
        frame, y, x = vis.pixel_of((t, h, w), map_shape, clip_shape)
        assert vis.cell_of(frame, y, x, map_shape, clip_shape) == np.ravel_multi_index((t, h, w), map_shape)
    assert vis.pixel_of((0, 0, 0), map_shape, clip_shape) == (4, 15.5, 15.5)
    with pytest.raises(ValueError, match=r"queries: y 300 is outside the clip \(0..223\)"):
        vis.cell_of(0, 300, 10, map_shape, clip_shape)
    with pytest.raises(ValueError, match=r"block: expected one of the model's non-local blocks \['0'\], got 'res9.9'"):
        vis.find_block(nn.Sequential(planted()[0]), "res9.9")


def test_heatmap_mode_and_a_resnet_block(tmp_path):
    from nonlocalnet.models import ResNet3d

    torch.manual_seed(0)
    model = ResNet3d(50, "c2d", "8x8", nonlocal_blocks={"res3": [1]}, width=8, stage_blocks=[1, 2, 1, 1])
    torch.nn.init.normal_(model.res3[1].nonlocal_block.norm.weight)
    clip = torch.randn(1, 3, 4, 64, 64)
    frames = np.zeros((4, 64, 64, 3), np.uint8)
    result = vis.visualize_clip(model, clip, frames, "res3.1", tmp_path / "heat.png", count=2, top=5, mode="heatmap")
    assert len(result["queries"]) == 2 and all(len(q["targets"]) == 5 for q in result["queries"])
    with Image.open(result["gif"]) as gif:
        assert gif.n_frames == 2
    for query in result["queries"]:  # res3 of a 64 x 64 input is 8 x 8: pixel centres of 8-pixel cells
        assert (query["y"] - 3.5) % 8 == 0 and (query["x"] - 3.5) % 8 == 0


def test_cli_visualize_writes_the_pictures(tmp_path):
    pytest.importorskip("av")
    from nonlocalnet.data.synthetic import write_video

    video = tmp_path / "clip.mp4"
    write_video(video, (np.random.default_rng(0).random((20, 72, 96, 3)) * 255).astype(np.uint8), 8)
    env = {**os.environ, "PYTHONPATH": str(Path(vis.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "pics" / "a.png"
    done = subprocess.run([sys.executable, "-m", "nonlocalnet", "visualize", str(video), "--model", "c2d_nl5_r50_8x8",
                           "--block", "res4.3", "--size", "64", "--queries", "2,10,50", "--top", "4", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "query 1: frame 3 (8, 56) -> " in done.stdout  # the centre of the res4 cell (4 x 4 x 4 map) and out.exists() and out.with_suffix(".gif").exists()
    bad = subprocess.run([sys.executable, "-m", "nonlocalnet", "visualize", str(video), "--model", "c2d_nl5_r50_8x8",
                          "--block", "res2.0", "--size", "64"], env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "block: expected one of the model's non-local blocks" in bad.stderr
