"""Faults in the data a user gives: a folder of theirs where a generated set would go, two processes
building one generated set at once, a build killed half-way, list and CSV files with videos that
are absent, bytes that are not UTF-8, labels that leave gaps, and an empty class folder.

Each ends in a named error (one line and exit code 2 on the command line) or a counted entry in
``Annotations.missing``; none deletes or changes a file the package did not write.
"""

import hashlib
import json
import multiprocessing
import os

import pytest

from nonlocalnet.cli import main
from nonlocalnet.data.synthetic import MARKER, ForeignFolderError, SyntheticSpec, build_once, make_synthetic

SMALL = SyntheticSpec(train=2, val=2, height=32, width=32, frames=8)
_CONTEXT = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")


def _quiet(*_):
    pass


def _snapshot(folder):
    """Relative path -> sha256 of every file below ``folder``."""
    return {os.path.relpath(os.path.join(top, name), folder):
            hashlib.sha256(open(os.path.join(top, name), "rb").read()).hexdigest()
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
