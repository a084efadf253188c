"""Faults in the data a user gives: a folder of theirs where a generated set would go, two processes
building one generated set at once, a build killed half-way, list and CSV files with videos that
are absent, bytes that are not UTF-8, labels that leave gaps, an empty class folder, and frames of
any shape (resized from the crop's own pixels; the bad-video corpus is test_video_faults.py).

Each ends in a named error (one line and exit code 2 on the command line) or a counted entry in
``Annotations.missing``; none deletes or changes a file the package did not write.
"""

import hashlib
import json
import multiprocessing
import os
from pathlib import Path

import pytest
import torch
from .faultkit import tiny_overrides

from nonlocalnet.cli import main
from nonlocalnet.data.datasets import (AnnotationError, VideoDataset, read_charades_csv, read_class_folders,
                                       read_classes, read_kinetics_csv, read_list)
from nonlocalnet.data.synthetic import MARKER, ForeignFolderError, SyntheticSpec, build_once, make_synthetic
from nonlocalnet.data.transforms import (crop, normalize, resize_short_side, resized_crop, resized_size, to_float,
                                         train_transform)

SMALL = SyntheticSpec(train=2, val=2, height=32, width=32, frames=8)
_CONTEXT = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")


def _quiet(*_):
    pass


def _snapshot(folder):
    """Relative path -> sha256 of every file below ``folder``."""
    return {os.path.relpath(os.path.join(top, name), folder): hashlib.sha256(Path(top, name).read_bytes()).hexdigest()
            for top, _, files in os.walk(folder) for name in files}


def _user_folder(path):
    (path / "clips").mkdir(parents=True)
    (path / "clips" / "a.mp4").write_bytes(b"\x00\x01user video")
    (path / "train.txt").write_text("clips/a.mp4 0\n")
    (path / "manifest.json").write_text(json.dumps({"project": "mine", "version": 7}))  # not ours
    return _snapshot(path)


# ------------------------------------------------------------------------ generated sets (item 1)


def test_a_users_folder_with_a_foreign_manifest_is_left_byte_for_byte(tmp_path):
    before = _user_folder(tmp_path / "mine")
    with pytest.raises(ForeignFolderError, match=rf"{tmp_path / 'mine'} is not empty .*manifest.json.* was not "
                                                 r"written by nonlocalnet"):
        make_synthetic(tmp_path / "mine", SMALL, log=_quiet)
    assert _snapshot(tmp_path / "mine") == before
    assert sorted(os.listdir(tmp_path)) == ["mine"]  # no lock file, no temporary folder


def test_the_cli_refuses_a_users_data_root_in_one_line(tmp_path, capsys):
    """``data.dataset`` forgotten: the default synthetic set would have been written over the user's videos."""
    before = _user_folder(tmp_path / "mine")
    rc = main(["train", "--set", f"data.root={tmp_path / 'mine'}", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert f"data.root: {tmp_path / 'mine'} is not empty" in err and "set data.dataset to list" in err
    assert _snapshot(tmp_path / "mine") == before


def test_an_unmarked_folder_in_the_cache_is_left_too(tmp_path, monkeypatch):
    from nonlocalnet.engine import generated_set

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cached = tmp_path / "nonlocalnet" / "synthetic-2-2"
    before = _user_folder(cached)  # e.g. written by an older version, without the marker
    with pytest.raises(ForeignFolderError, match=r"the package's cache of the synthetic set: delete that folder if "
                                                 r"an older nonlocalnet wrote it"):
        generated_set("", "synthetic", SMALL, (2, 2))
    assert _snapshot(cached) == before


def test_user_files_beside_a_set_of_ours_stop_a_rebuild(tmp_path):
    root = make_synthetic(tmp_path / "syn", SMALL, log=_quiet)
    (root / "notes.txt").write_text("mine")
    (root / "train.txt").write_text((root / "train.txt").read_text() + "extra.mp4 1\n")  # edited by the user
    before = _snapshot(root)
    with pytest.raises(ForeignFolderError, match=r"files it did not write or that changed since \(notes.txt, "
                                                 r"train.txt\)"):
        make_synthetic(root, SyntheticSpec(**{**SMALL.__dict__, "seed": 1}), log=_quiet)
    assert _snapshot(root) == before


def test_a_set_of_ours_is_replaced_by_another_spec(tmp_path):
    root = make_synthetic(tmp_path / "syn", SMALL, log=_quiet)
    other = SyntheticSpec(**{**SMALL.__dict__, "train": 4})
    messages = []
    make_synthetic(root, other, log=messages.append)
    assert len(messages) == 1 and json.loads((root / "manifest.json").read_text())["train"] == 4
    assert len((root / "train.txt").read_text().splitlines()) == 4
    assert sorted(os.listdir(tmp_path)) == [".syn.lock", "syn"]  # the old set is gone, nothing else left


# --------------------------------------------------------------- concurrent and killed builds (item 5)


def _build(root, barrier):
    barrier.wait(timeout=60)
    make_synthetic(root, SMALL, log=_quiet)


def test_two_processes_building_one_set_both_succeed(tmp_path):
    barrier = _CONTEXT.Barrier(2)
    workers = [_CONTEXT.Process(target=_build, args=(tmp_path / "syn", barrier)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert [w.exitcode for w in workers] == [0, 0]
    assert sorted(os.listdir(tmp_path)) == [".syn.lock", "syn"]
    assert len((tmp_path / "syn" / "train.txt").read_text().splitlines()) == SMALL.train


def _killed_build(root):
    build_once(root, {"version": "killed"}, lambda work: os._exit(9), _quiet, "a set", kind="synthetic")


def test_a_killed_builds_folder_is_removed_by_the_next_build_and_nothing_else(tmp_path):
    killed = _CONTEXT.Process(target=_killed_build, args=(tmp_path / "syn",))
    killed.start()
    killed.join(60)
    assert killed.exitcode == 9
    (left,) = [p for p in tmp_path.iterdir() if p.name.startswith("syn.")]
    assert (left / MARKER).is_file()  # the temporary folder of the killed build, marked as ours
    similar = tmp_path / "syn.abcd1234"  # named like our temporary folders, but the user's
    similar.mkdir()
    (similar / "keep.txt").write_text("mine")
    marked = tmp_path / "syn.efgh5678"  # a marker of ours, for another set: not a build of this one
    marked.mkdir()
    (marked / MARKER).write_text(json.dumps({"writer": "nonlocalnet", "kind": "synthetic", "name": "other",
                                             "files": None}))
    make_synthetic(tmp_path / "syn", SMALL, log=_quiet)
    assert not left.exists()
    assert sorted(os.listdir(tmp_path)) == [".syn.lock", "syn", "syn.abcd1234", "syn.efgh5678"]
    assert (similar / "keep.txt").read_text() == "mine"


# ------------------------------------------------------------------- absent listed videos (item 3)


def test_listed_videos_that_are_absent_are_set_aside_by_name(tiny_set, tmp_path):
    listed = (tiny_set / "train.txt").read_text().splitlines()
    (tmp_path / "train.txt").write_text("".join(f"{tiny_set / line}\n" for line in listed) + "gone/a.mp4 0\n")
    ann = read_list(tmp_path / "train.txt", root=tmp_path, classes=tiny_set / "classes.txt")
    assert len(ann.records) == len(listed) and ann.missing == [str(tmp_path / "gone/a.mp4")]
    (tmp_path / "none.txt").write_text("gone/a.mp4 0\ngone/b.mp4 1\n")
    ann = read_list(tmp_path / "none.txt")
    assert ann.records == [] and len(ann.missing) == 2 and ann.classes == ["0", "1"]


def test_a_list_whose_videos_are_all_absent_stops_the_cli_in_one_line(tiny_set, tmp_path, capsys):
    (tmp_path / "train.txt").write_text("gone/a.mp4 0\ngone/b.mp4 1\n")
    rc = main(["train", "--out", str(tmp_path / "run"), "--set",
               *tiny_overrides(tiny_set, **{"data.train": tmp_path / "train.txt"})])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "data.train: no usable entries; none of its 2 videos was found" in err


# -------------------------------------------------------------------- text that is not UTF-8 (item 8)


def _kinetics(path, root):
    return read_kinetics_csv(path, root)


def _charades(path, root):
    return read_charades_csv(path, root)


def _list(path, root):
    return read_list(path, root, classes=["a", "b"])


def _classes(path, root):
    return read_classes(path)


@pytest.mark.parametrize("reader, head, line", [
    (_list, b"a.mp4 0\n", b"\xe9t\xe9.mp4 1\n"),
    (_kinetics, b"label,youtube_id,time_start,time_end\nabseiling,x,0,10\n", b"caf\xe9,y,0,10\n"),
    (_charades, b"id,actions\nA,c001 0 1\n", b"B,c002 0 1 \x96 x\n"),
    (_classes, b"abseiling\n", b"\xff\xfeair drumming\n"),
])
def test_bytes_that_are_not_utf8_name_the_file_and_line(tmp_path, reader, head, line):
    path = tmp_path / "latin1.txt"
    path.write_bytes(head + head.splitlines(keepends=True)[-1] + line)
    number = len(head.splitlines()) + 2
    with pytest.raises(AnnotationError, match=rf"latin1\.txt:{number}: not UTF-8 text \(byte 0x.. at column "
                                              rf"\d+\); save the file as UTF-8"):
        reader(path, tmp_path)


def test_a_byte_order_mark_does_not_hide_the_first_column(tmp_path):
    (tmp_path / "x_000000_000010.mp4").write_bytes(b"x")
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbflabel,youtube_id,time_start,time_end\nabseiling,x,0,10\n")
    ann = read_kinetics_csv(path, tmp_path)
    assert ann.classes == ["abseiling"] and ann.records[0].labels == (0,)


def test_a_non_utf8_list_stops_the_cli_with_file_and_line(tiny_set, tmp_path, capsys):
    (tmp_path / "train.txt").write_bytes((tiny_set / "train.txt").read_bytes() + b"caf\xe9.mp4 0\n")
    rc = main(["train", "--out", str(tmp_path / "run"), "--set",
               *tiny_overrides(tiny_set, **{"data.train": tmp_path / "train.txt", "data.root": tiny_set})])
    err = capsys.readouterr().err
    lines = len((tiny_set / "train.txt").read_text().splitlines()) + 1
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{tmp_path / 'train.txt'}:{lines}: not UTF-8 text (byte 0xe9 at column 4)" in err


def test_non_utf8_file_names_in_class_folders(tiny_set, tmp_path):
    video = (tiny_set / "videos/train/00000.mp4").read_bytes()
    folder = os.fsencode(tmp_path / "classes")
    for name in (b"a/\xff.mp4", b"b/ok.mp4"):
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        Path(os.fsdecode(os.path.join(folder, name))).write_bytes(video)
    ann = read_class_folders(tmp_path / "classes")
    assert ann.classes == ["a", "b"] and os.fsencode(ann.records[0].path).endswith(b"/a/\xff.mp4")
    item = VideoDataset(ann, frames=4, rate=2, scales=(32, 32), crop_size=32)[(0, 0)]
    assert item["clip"].shape == (3, 4, 32, 32)  # the file decodes under its name
    os.makedirs(os.path.join(folder, b"\xfe"))
    Path(os.fsdecode(os.path.join(folder, b"\xfe", b"v.mp4"))).write_bytes(video)
    with pytest.raises(AnnotationError, match=r"class folder '\\udcfe': the name is not UTF-8; rename it"):
        read_class_folders(tmp_path / "classes")


# ------------------------------------------------------------------- labels and classes (item 9)


@pytest.mark.parametrize("text, shown", [
    ("a.mp4 0\nb.mp4 99\n", r"labels 0, 99 leave out 1\.\.98"),
    ("a.mp4 1\nb.mp4 2\n", r"labels 1\.\.2 leave out 0"),
    ("a.mp4 0 3\nb.mp4 1\n", r"labels 0\.\.1, 3 leave out 2"),  # multi-label: the labels of all entries
])
def test_labels_with_gaps_need_class_names(tmp_path, text, shown):
    (tmp_path / "train.txt").write_text(text)
    with pytest.raises(AnnotationError, match=rf"train\.txt: {shown}, and no class names were given .*data\.classes"):
        read_list(tmp_path / "train.txt")
    assert len(read_list(tmp_path / "train.txt", classes=[str(i) for i in range(100)]).classes) == 100


def test_a_validation_list_may_use_some_of_the_training_classes(tmp_path):
    (tmp_path / "val.txt").write_text("a.mp4 2\n")
    assert read_list(tmp_path / "val.txt", classes=["x", "y", "z"]).classes == ["x", "y", "z"]


def test_an_empty_class_folder_is_named(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "v.mp4").write_bytes(b"x")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("not a video")
    with pytest.raises(AnnotationError, match=rf"{tmp_path / 'b'}: a class folder without videos .* every folder "
                                              rf"of {tmp_path} is a class"):
        read_class_folders(tmp_path)


# -------------------------------------------------------------------- resizing the crop alone (item 7)


def test_resizing_the_crop_alone_gives_the_pixels_of_resizing_the_whole_frame():
    g = torch.Generator().manual_seed(0)

    def draw(low, high):
        return int(torch.randint(low, high + 1, (1,), generator=g))

    for _ in range(40):  # up and down (antialiased), any aspect, any crop
        h, w, size = draw(2, 90), draw(2, 90), draw(1, 120)
        frames = torch.randint(0, 256, (2, h, w, 3), dtype=torch.uint8, generator=g)
        full = resize_short_side(to_float(frames), size)
        assert tuple(full.shape[-2:]) == resized_size(h, w, size)
        side = draw(1, min(full.shape[-2:]))
        top, left = draw(0, full.shape[-2] - side), draw(0, full.shape[-1] - side)
        ours = resized_crop(frames, tuple(full.shape[-2:]), top, left, side)
        torch.testing.assert_close(ours, crop(full, top, left, side), rtol=0, atol=2e-3)  # of 255: rounding only
    frames = torch.randint(0, 256, (2, 240, 320, 3), dtype=torch.uint8, generator=g)
    full = resize_short_side(to_float(frames), 288)
    shifted = resized_crop(frames, tuple(full.shape[-2:]), 10, 21, 224)
    assert (shifted - crop(full, 10, 20, 224)).abs().mean() > 10  # a pixel off is far outside that tolerance
    for seed in range(4):  # the augmentation draws scale, crop and flip as it did when it resized first
        new = train_transform(frames, generator=torch.Generator().manual_seed(seed))
        draws = torch.Generator().manual_seed(seed)
        old = resize_short_side(to_float(frames), int(torch.randint(256, 321, (1,), generator=draws)))
        top = int(torch.randint(old.shape[-2] - 224 + 1, (1,), generator=draws))
        old = crop(old, top, int(torch.randint(old.shape[-1] - 224 + 1, (1,), generator=draws)), 224)
        old = old.flip(-1) if bool(torch.rand((), generator=draws) < 0.5) else old
        torch.testing.assert_close(new, normalize(old), rtol=0, atol=1e-4)
