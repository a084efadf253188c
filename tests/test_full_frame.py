"""The paper's fully convolutional test on the whole frame (§4.1: shorter side 256, no crop)
beside the official 3-crop test, on a non-square video."""

import pytest
import torch

av = pytest.importorskip("av")

from nonlocalnet import engine  # noqa: E402
from nonlocalnet.config import load_config  # noqa: E402
from nonlocalnet.data.datasets import Annotations, VideoDataset, VideoRecord  # noqa: E402
from nonlocalnet.data.synthetic import write_video  # noqa: E402
from nonlocalnet.data.transforms import resize_short_side, spatial_views, to_float  # noqa: E402
from nonlocalnet.models import ResNet3d  # noqa: E402


def test_whole_frame_view_is_the_resized_frame():
    frames = torch.randint(0, 256, (4, 30, 50, 3), dtype=torch.uint8)
    (view,) = spatial_views(frames, scale=24, crop_size=0, crops=1)
    expected = resize_short_side(to_float(frames), 24)  # (3, T, 24, 40)
    assert view.shape == (3, 4, 24, 40)
    torch.testing.assert_close(view, (expected - 114.75) / 57.375, atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="the whole frame .* is one view"):
        spatial_views(frames, scale=24, crop_size=0, crops=3)


def test_full_frame_evaluation_of_a_non_square_video(tmp_path):
    torch.manual_seed(0)
    video = tmp_path / "wide.mp4"
    write_video(video, torch.randint(0, 256, (12, 48, 80, 3), dtype=torch.uint8).numpy())
    annotations = Annotations([VideoRecord(str(video), (1,))], ["a", "b", "c"])
    model = ResNet3d(width=4, stage_blocks=(1, 1, 1, 1), stem="8x8", num_classes=3, zero_init_residual=False).eval()
    full = VideoDataset(annotations, "test", frames=4, rate=2, test_scale=32, test_crop=0, clips=2, crops=1)
    item = full[0]
    assert item["clip"].shape == (1, 3, 4, 32, 53)  # one whole-frame view: 80 x 32 / 48 = 53.3
    result = engine.evaluate(model, full, batch_size=8, window=1)
    with torch.no_grad():  # by hand: the dense scores of each whole-frame clip, softmax, averaged
        probs = [model.forward_dense(full[k]["clip"], 1).softmax(1).mean((2, 3, 4)) for k in range(2)]
    torch.testing.assert_close(result["scores"][0].float(), torch.cat(probs).mean(0), atol=1e-6, rtol=0)
    crops = VideoDataset(annotations, "test", frames=4, rate=2, test_scale=32, test_crop=32, clips=2, crops=3)
    assert not torch.allclose(engine.evaluate(model, crops, window=1)["scores"], result["scores"])  # another test
    with pytest.raises(ValueError, match="crops: the whole frame"):
        VideoDataset(annotations, "test", test_crop=0, crops=3)


def test_config_takes_the_whole_frame_with_one_view():
    cfg = load_config(None, ["data.test_crop=0", "data.test_crops=1"])
    assert cfg.data.test_crop == 0
    with pytest.raises(ValueError, match="data.test_crops: the whole frame"):
        load_config(None, ["data.test_crop=0"])  # 3 crops by default
    with pytest.raises(ValueError, match="data.test_crop: expected an int >= 0"):
        load_config(None, ["data.test_crop=-1"])
