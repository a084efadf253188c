"""Video data: decoding real H.264 files written here with PyAV, clip sampling, augmentation."""

import pytest
import torch

av = pytest.importorskip("av")
np = pytest.importorskip("numpy")

from nonlocalnet.data import (  # noqa: E402
    VideoError, decode_frames, probe, uniform_clip_indices, spatial_views, train_clip_indices, train_transform,
)
from nonlocalnet.data.transforms import MEAN, STD, resize_short_side, to_float  # noqa: E402


def write_indexed_video(path, frames=120, width=96, height=64, fps=25, gop=12):
    """An H.264 file (B-frames, keyframe every ``gop``) whose frames show their index in 8 bit blocks."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop
        stream.options = {"crf": "10", "preset": "ultrafast", "bf": "2"}
        for i in range(frames):
            image = np.zeros((height, width, 3), np.uint8)
            for bit in range(8):
                if (i >> bit) & 1:
                    image[:16, bit * 12 : (bit + 1) * 12] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def shown_index(frame):
    return sum(1 << bit for bit in range(8) if frame[:16, bit * 12 + 3 : bit * 12 + 9].float().mean() > 127)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return write_indexed_video(tmp_path_factory.mktemp("videos") / "indexed.mp4")


def test_probe(video):
    info = probe(video)
    assert (info.frames, info.fps, info.width, info.height) == (120, 25.0, 96, 64)
    assert info.duration == pytest.approx(4.8)


@pytest.mark.parametrize("indices", [[0, 1, 2, 3], [5, 100, 42, 119, 0, 77, 77], list(range(60, 124, 2)), [119, 50]])
def test_decode_returns_the_requested_frames(video, indices):
    frames = decode_frames(video, indices)
    assert frames.shape == (len(indices), 64, 96, 3) and frames.dtype == torch.uint8
    assert [shown_index(f) for f in frames] == [min(i, 119) for i in indices]  # past the end: the last frame


def test_bad_videos_are_named_with_the_reason(tmp_path, video):
    with pytest.raises(VideoError, match=r"missing\.mp4'?: no such file"):
        decode_frames(tmp_path / "missing.mp4", [0])
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoError, match="empty file"):
        probe(tmp_path / "empty.mp4")
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(VideoError, match="noise.mp4"):
        decode_frames(tmp_path / "noise.mp4", [0])
    data = video.read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoError, match="truncated.mp4"):
        probe(tmp_path / "truncated.mp4")
    with pytest.raises(ValueError, match="indices: expected frame indices >= 0, got -1"):
        decode_frames(video, [3, -1])


def test_training_clips_fit_the_video_or_loop():
    g = torch.Generator().manual_seed(0)
    starts = set()
    for _ in range(400):
        clip = train_clip_indices(100, frames=8, rate=4, generator=g)
        assert clip == list(range(clip[0], clip[0] + 32, 4))
        starts.add(clip[0])
    assert min(starts) == 0 and max(starts) == 100 - 32  # uniform over every start that fits
    assert train_clip_indices(10, frames=4, rate=4, generator=g) == [0, 4, 8, 2]  # too short: wraps


def test_test_clips_are_spread_uniformly():
    clips = uniform_clip_indices(300, frames=4, rate=2, clips=10)
    assert [c[0] for c in clips] == [30 * k for k in range(10)] and clips[3] == [90, 92, 94, 96]
    assert uniform_clip_indices(7, frames=3, rate=2, clips=2) == [[0, 2, 4], [3, 5, 0]]
    with pytest.raises(ValueError, match="clips: expected a positive int"):
        uniform_clip_indices(7, clips=0)
    with pytest.raises(ValueError, match="num_frames: expected a video with at least 1 frame, got 0"):
        train_clip_indices(0)


def test_training_augmentation():
    frames = torch.randint(0, 256, (4, 240, 320, 3), dtype=torch.uint8)
    flipped = 0
    for seed in range(40):  # the same draws of scale and crop, with and without the flip
        clip = train_transform(frames, generator=torch.Generator().manual_seed(seed))
        plain = train_transform(frames, flip=False, generator=torch.Generator().manual_seed(seed))
        assert clip.shape == (3, 4, 224, 224)
        assert torch.equal(clip, plain) or torch.equal(clip, plain.flip(-1))
        flipped += int(not torch.equal(clip, plain))
    assert 10 <= flipped <= 30  # p = 0.5
    still = torch.full((2, 240, 320, 3), 114, dtype=torch.uint8)
    assert torch.allclose(train_transform(still), torch.full((3, 2, 224, 224), (114 - MEAN) / STD))
    resized = resize_short_side(to_float(frames), 256)
    assert resized.shape == (3, 4, 256, 341)
    with pytest.raises(ValueError, match=r"clip: expected frames \(T, H, W, 3\)"):
        train_transform(frames[..., :2])


def test_three_test_crops_cover_the_longer_side():
    frames = torch.randint(0, 256, (2, 240, 320, 3), dtype=torch.uint8)
    views = spatial_views(frames)
    full = (resize_short_side(to_float(frames), 256) - MEAN) / STD  # (3, 2, 256, 341)
    assert [tuple(v.shape) for v in views] == [(3, 2, 256, 256)] * 3
    for view, left in zip(views, (0, 42, 85)):  # resized from the crop's own pixels: the same up to rounding
        torch.testing.assert_close(view, full[..., left : left + 256], rtol=0, atol=1e-4)
    portrait = spatial_views(frames.transpose(1, 2), crops=1)
    assert len(portrait) == 1 and portrait[0].shape == (3, 2, 256, 256)
