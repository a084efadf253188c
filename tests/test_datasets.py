"""Annotation readers (Kinetics CSV, list files, class folders, Charades), the VideoDataset with
unreadable videos among good ones, and the built-in synthetic set."""

import json

import pytest
import torch

av = pytest.importorskip("av")
np = pytest.importorskip("numpy")

from nonlocalnet.data.datasets import (  # noqa: E402
    AnnotationError, Skipped, VideoDataset, VideoRecord, collate, read_charades_csv, read_class_folders,
    read_classes, read_kinetics_csv, read_list,
)
from nonlocalnet.data.synthetic import CLASSES, SyntheticSpec, make_synthetic, render_video, write_video  # noqa: E402


def small_video(path, frames=12, seed=0):
    rng = np.random.default_rng(seed)
    write_video(path, rng.integers(0, 255, (frames, 32, 40, 3), dtype=np.uint8), fps=8)
    return path


# ------------------------------------------------------------------------------------------- readers


def test_list_file_single_and_multi_label(tmp_path):
    for name in ("x.mp4", "y z.mp4", "w.mp4", "v1.mp4"):
        (tmp_path / "clips").mkdir(exist_ok=True)
        (tmp_path / "clips" / name).write_bytes(b"x")
    (tmp_path / "a.txt").write_text("# comment\nclips/x.mp4 3\n\nclips/y z.mp4 0\nclips/w.mp4,2\nclips/gone.mp4 1\n")
    ann = read_list(tmp_path / "a.txt")
    assert [r.path for r in ann.records] == [str(tmp_path / "clips/x.mp4"), str(tmp_path / "clips/y z.mp4"),
                                             str(tmp_path / "clips/w.mp4")]
    assert [r.label for r in ann.records] == [3, 0, 2] and ann.missing == [str(tmp_path / "clips/gone.mp4")]
    assert ann.classes == ["0", "1", "2", "3"] and not ann.multilabel  # label 1 counts, though its video is absent
    (tmp_path / "m.txt").write_text("v1.mp4 1 3 5\nv2.mp4 0\n")
    multi = read_list(tmp_path / "m.txt", root=tmp_path / "clips", classes=[f"c{i}" for i in range(6)])
    assert multi.multilabel and multi.records[0].labels == (1, 3, 5)
    assert multi.records[0].path == str(tmp_path / "clips/v1.mp4") and multi.missing == [str(tmp_path / "clips/v2.mp4")]


@pytest.mark.parametrize("text, line, reason", [
    ("a.mp4 1\nb.mp4\n", 2, "expected 'path label"),
    ("a.mp4 1\nb.mp4 x\n", 2, "expected 'path label"),
    ("a.mp4 7\n", 1, r"expected labels in 0..2, got \[7\]"),
])
def test_malformed_list_line_names_file_and_line(tmp_path, text, line, reason):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(AnnotationError, match=rf"bad\.txt:{line}: {reason}"):
        read_list(path, classes=["a", "b", "c"])


def test_classes_file_formats(tmp_path):
    (tmp_path / "plain.txt").write_text("air drumming\nabseiling\n")
    (tmp_path / "ucf.txt").write_text("1 ApplyEyeMakeup\n2 ApplyLipstick\n")
    (tmp_path / "charades.txt").write_text("c000 Holding some clothes\nc001 Putting clothes somewhere\n")
    assert read_classes(tmp_path / "plain.txt") == ["air drumming", "abseiling"]
    assert read_classes(tmp_path / "ucf.txt") == ["ApplyEyeMakeup", "ApplyLipstick"]
    assert read_classes(tmp_path / "charades.txt") == ["Holding some clothes", "Putting clothes somewhere"]


def test_kinetics_csv_over_downloader_names(tmp_path):
    root = tmp_path / "kinetics"
    for rel in ("train/air_drumming/_dbcJuKJQNs_000040_000050.mp4", "train/abseiling/-3B32lodo2M_000059_000069.mkv",
                "val/air drumming/Abc_000001_000011.mp4.webm"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    csv_path = tmp_path / "train.csv"
    csv_path.write_text("label,youtube_id,time_start,time_end,split,is_cc\n"
                        '"air drumming",_dbcJuKJQNs,40,50,train,0\n'
                        "abseiling,-3B32lodo2M,59,69,train,0\n"
                        '"air drumming",Abc,1,11,val,0\n'
                        "abseiling,gone,0,10,train,0\n")
    ann = read_kinetics_csv(csv_path, root)
    assert ann.classes == ["abseiling", "air drumming"]  # sorted: a stable mapping
    assert [(r.path.split("/")[-1], r.label) for r in ann.records] == [
        ("_dbcJuKJQNs_000040_000050.mp4", 1), ("-3B32lodo2M_000059_000069.mkv", 0), ("Abc_000001_000011.mp4.webm", 1)]
    assert ann.missing == ["gone_000000_000010"]
    assert len(read_kinetics_csv(csv_path, root, split="val")) == 1
    # Kinetics-600/700 have no is_cc; a test split has no label
    test_csv = tmp_path / "test.csv"
    test_csv.write_text("youtube_id,time_start,time_end,split\n_dbcJuKJQNs,40,50,test\n")
    assert read_kinetics_csv(test_csv, root, classes=ann.classes).records[0].labels == ()


def test_kinetics_csv_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("label,youtube_id\nx,y\n")
    with pytest.raises(AnnotationError, match=r"bad\.csv:1: expected a header with columns"):
        read_kinetics_csv(bad, tmp_path)
    bad.write_text("label,youtube_id,time_start,time_end,split\nx,y,1,11,train\nx,y,one,11,train\n")
    with pytest.raises(AnnotationError, match=r"bad\.csv:3: time_start, time_end: expected seconds"):
        read_kinetics_csv(bad, tmp_path)
    bad.write_text("label,youtube_id,time_start,time_end,split\nx,y,1,11\n")
    with pytest.raises(AnnotationError, match=r"bad\.csv:2: expected 5 fields, got 4"):
        read_kinetics_csv(bad, tmp_path)
    bad.write_text("label,youtube_id,time_start,time_end,split\nnew,y,1,11,val\n")
    with pytest.raises(AnnotationError, match=r"bad\.csv:2: label 'new' is not one of the 1 classes"):
        read_kinetics_csv(bad, tmp_path, classes=["old"])


def test_class_folders(tmp_path):
    for rel in ("b/2.mp4", "b/1.avi", "a/x.mkv", "a/notes.txt"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    ann = read_class_folders(tmp_path)
    assert ann.classes == ["a", "b"]
    assert [(r.path.split("/")[-1], r.label) for r in ann.records] == [("x.mkv", 0), ("1.avi", 1), ("2.mp4", 1)]


def test_charades_csv(tmp_path):
    (tmp_path / "46GP8.mp4").write_bytes(b"x")
    (tmp_path / "N11GT.mp4").write_bytes(b"x")
    path = tmp_path / "Charades_v1_train.csv"
    path.write_text("id,subject,scene,quality,relevance,verified,script,objects,descriptions,actions,length\n"
                    '46GP8,HR43,Kitchen,6,7,Yes,"A person cooks.",food;stove,"They cook.",'
                    '"c092 11.90 21.20;c147 0.00 12.60;c092 30.0 31.5",24.83\n'
                    "N11GT,KMIX,Hallway,5,7,Yes,walks,door,walks,,12.00\n"
                    "ABSENT,KMIX,Hallway,5,7,Yes,walks,door,walks,c001 0 1,12.00\n")
    ann = read_charades_csv(path, tmp_path)
    assert ann.multilabel and len(ann.classes) == 157
    assert ann.records[0].labels == (92, 147)
    assert ann.records[0].segments == ((92, 11.9, 21.2), (147, 0.0, 12.6), (92, 30.0, 31.5))
    assert ann.records[1].labels == () and ann.missing == [str(tmp_path / "ABSENT.mp4")]
    path.write_text("id,actions,length\n46GP8,c092 11.90,24\n")
    with pytest.raises(AnnotationError, match=r"Charades_v1_train\.csv:2: actions: expected 'cNNN start end'"):
        read_charades_csv(path, tmp_path)


# ------------------------------------------------------------------------------------------- dataset


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    for i in range(4):
        small_video(root / f"good{i}.mp4", seed=i)
    (root / "empty.mp4").write_bytes(b"")
    data = (root / "good0.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 3])
    (root / "garbage.mp4").write_bytes(np.random.default_rng(0).integers(0, 255, 5000, dtype=np.uint8).tobytes())
    names = ["good0", "empty", "good1", "missing", "good2", "truncated", "garbage", "good3"]
    (root / "list.txt").write_text("".join(f"{n}.mp4 {i % 3}\n" for i, n in enumerate(names)))
    return root


def test_train_items_are_a_function_of_the_seed(clips):
    ds = VideoDataset(read_list(clips / "list.txt"), frames=4, rate=2, scales=(32, 40), crop_size=28)
    a, b, c = ds[(0, 7)], ds[(0, 7)], ds[(0, 8)]
    assert a["clip"].shape == (3, 4, 28, 28) and a["target"].item() == 0
    assert torch.equal(a["clip"], b["clip"])
    assert not torch.equal(a["clip"], c["clip"])


def test_unreadable_videos_are_skipped_and_named(clips, tmp_path):
    ann = read_list(clips / "list.txt")
    assert ann.missing == [str(clips / "missing.mp4")]
    ds = VideoDataset(ann, frames=4, rate=2, scales=(32, 40), crop_size=28)
    items = [ds[(i, i)] for i in range(len(ds))]
    bad = {item.path.split("/")[-1]: item.reason for item in items if isinstance(item, Skipped)}
    assert set(bad) >= {"empty.mp4", "garbage.mp4"} and "missing.mp4" not in bad  # read_list set it aside
    assert bad["empty.mp4"] == "empty file (0 bytes)"
    ds.records.append(VideoRecord(str(tmp_path / "gone.mp4"), (0,)))  # deleted after the list was read
    assert ds[(len(ds) - 1, 0)] == Skipped(str(tmp_path / "gone.mp4"), "no such file")
    batch = collate(items)
    good = len(items) - len(batch["skipped"])
    assert good >= 4 and batch["clip"].shape[0] == good and len(batch["target"]) == good
    empty = collate([items[1]])
    assert "clip" not in empty and len(empty["skipped"]) == 1


def test_test_items_are_video_by_clip_with_stacked_crops(clips):
    ann = read_list(clips / "list.txt")
    ds = VideoDataset(ann, "test", frames=4, rate=2, test_scale=32, test_crop=32, clips=3, crops=3)
    assert len(ds) == 3 * len(ann)
    item = ds[2 * 3 + 1]  # video 2, clip 1
    assert item["video"] == 2 and item["view"] == 1 and item["clip"].shape == (3, 3, 4, 32, 32)
    assert not torch.equal(item["clip"][0], item["clip"][2])  # left and right crops of a 40-wide frame


def test_multilabel_targets_are_multi_hot(tmp_path):
    small_video(tmp_path / "v.mp4")
    (tmp_path / "m.txt").write_text("v.mp4 0 2\n")
    ds = VideoDataset(read_list(tmp_path / "m.txt", classes=["a", "b", "c"]), frames=2, scales=(32, 32), crop_size=32)
    assert ds[(0, 1)]["target"].tolist() == [1.0, 0.0, 1.0]


def test_bad_mode():
    with pytest.raises(ValueError, match="mode: expected 'train' or 'test', got 'val'"):
        VideoDataset(None, "val")


# ---------------------------------------------------------------------------------------- synthetic


def test_synthetic_videos_carry_the_relation():
    rng = np.random.default_rng(0)
    video = render_video(rng, True, height=72, width=80, frames=16)
    assert video.shape == (16, 72, 80, 3) and video.dtype == np.uint8
    middle = video[6:10].astype(float)
    # the square is on the left in the first frames, the disc on the right in the last, nothing between
    assert video[:6, :, :40].std() > middle[:, :, :40].std() + 5
    assert video[10:, :, 40:].std() > middle[:, :, 40:].std() + 5
    colours = []
    for part in (video[:6, :, :40], video[10:, :, 40:]):
        pixels = part.reshape(-1, 3).astype(float)
        centre = pixels.mean(0)
        far = pixels[np.linalg.norm(pixels - centre, axis=1) > 60]
        colours.append(far.mean(0))
    assert np.abs(colours[0] - colours[1]).max() < 25  # same colour
    video = render_video(np.random.default_rng(1), False)
    first = video[:6, :, :40].reshape(-1, 3).astype(float)
    last = video[10:, :, 40:].reshape(-1, 3).astype(float)
    first = first[np.linalg.norm(first - first.mean(0), axis=1) > 60].mean(0)
    last = last[np.linalg.norm(last - last.mean(0), axis=1) > 60].mean(0)
    assert np.abs(first - last).max() > 60  # different colours


def test_make_synthetic_writes_once_and_reads_back(tmp_path):
    spec = SyntheticSpec(train=6, val=4, height=32, width=40, frames=8)
    root = make_synthetic(tmp_path / "syn", spec, log=lambda *a: None)
    train = read_list(root / "train.txt", classes=root / "classes.txt")
    assert train.classes == list(CLASSES) and [r.label for r in train.records] == [0, 1, 0, 1, 0, 1]
    assert json.loads((root / "manifest.json").read_text())["train"] == 6
    stamp = (root / "videos/train/00000.mp4").stat().st_mtime_ns
    messages = []
    make_synthetic(tmp_path / "syn", spec, log=messages.append)
    assert not messages and (root / "videos/train/00000.mp4").stat().st_mtime_ns == stamp  # cached
    ds = VideoDataset(train, frames=4, rate=2, scales=(32, 36), crop_size=32)
    assert ds[(1, 0)]["clip"].shape == (3, 4, 32, 32)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty .* and was not written by nonlocalnet"):
        make_synthetic(tmp_path / "other", spec)



def test_synthetic_frames_are_a_function_of_the_seed():
    # the frames are; x264's bytes are not always (README), so the set is built once and cached
    a = [render_video(np.random.default_rng(5), i % 2 == 0, height=48, width=64, frames=8) for i in range(3)]
    b = [render_video(np.random.default_rng(5), i % 2 == 0, height=48, width=64, frames=8) for i in range(3)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
