"""Malicious checkpoint files: pickles whose ``__reduce__`` would call ``os.system`` (a raw ``.pkl``
and a ``torch.save`` zip file) and pickle "bombs" whose numpy array declares a terabyte in a file of
a few hundred bytes.

Each goes through ``nonlocalnet convert --from caffe2|mmaction2|slowfast`` and
``create_model(weights=...)``: nothing runs, nothing is allocated, and the answer is one line naming
the file and the refused global (or the declared size), exit code 2 on the command line.
"""

import os
import pickle
import re

import numpy as np
import pytest
import torch

from nonlocalnet import create_model
from nonlocalnet.cli import main

SYSTEM = r"(posix|os|nt)\.system"


class _RunsCode:
    """Unpickling this calls os.system (touching a marker file) where globals resolve freely."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Bomb:
    """Unpickling this asks numpy for an empty int8 array of 2**40 elements (1 TiB)."""

    def __reduce__(self):
        reconstruct = np.zeros(0).__reduce__()[0]  # numpy's own array-pickling function, whatever its module
        return reconstruct, (np.ndarray, (2**40,), b"b")


def _convert(path, peer, tmp_path, capsys):
    rc = main(["convert", str(path), str(tmp_path / "out.pt"), "--from", peer, "--model", "i3d_nl5_r50"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out.pt").exists()
    return err


@pytest.mark.parametrize("protocol", [2, 4])
def test_pkl_that_would_run_code(tmp_path, capsys, protocol):
    marker = tmp_path / "ran"
    path = tmp_path / "i3d_nonlocal.pkl"
    path.write_bytes(pickle.dumps({"blobs": {"conv1_w": _RunsCode(marker)}}, protocol=protocol))
    err = _convert(path, "caffe2", tmp_path, capsys)
    assert str(path) in err and re.search(rf"refusing to load global {SYSTEM}", err)
    with pytest.raises(ValueError, match=rf"weights: .*i3d_nonlocal.pkl is not a loadable weights file \(it names "
                                         rf"{SYSTEM}, which a weights file needs only to run code\)"):
        create_model("i3d_nl5_r50", weights=path)
    assert not marker.exists()


@pytest.mark.parametrize("peer", ["mmaction2", "slowfast"])
def test_torch_file_that_would_run_code(tmp_path, capsys, peer):
    marker = tmp_path / "ran"
    path = tmp_path / "checkpoint.pth"
    # the code hides in the metadata beside real weights, where a lenient reader would look last
    torch.save({"state_dict": {"backbone.conv1.conv.weight": torch.zeros(1)}, "model_state": {},
                "meta": {"hook": _RunsCode(marker)}}, path)
    err = _convert(path, peer, tmp_path, capsys)
    assert f"source: {path} names " in err and "needs only to run code; not loaded" in err
    assert re.search(SYSTEM, err)
    with pytest.raises(ValueError, match=rf"checkpoint.pth is not a loadable weights file \(it names {SYSTEM}"):
        create_model("i3d_nl5_r50", weights=path)
    assert not marker.exists()


def test_pkl_bomb_is_refused_before_allocation(tmp_path, capsys):
    path = tmp_path / "bomb.pkl"
    path.write_bytes(pickle.dumps({"blobs": {"conv1_w": _Bomb()}}, protocol=2))
    assert path.stat().st_size < 1000
    err = _convert(path, "caffe2", tmp_path, capsys)
    assert f"{path}: not loaded: an array declaring 1099511627776 bytes" in err and "far more than the file" in err
    with pytest.raises(ValueError, match="bomb.pkl is not a loadable weights file"):
        create_model("i3d_nl5_r50", weights=path)


@pytest.mark.parametrize("peer", ["mmaction2", "slowfast"])
def test_torch_file_bomb_is_refused_before_allocation(tmp_path, capsys, peer):
    path = tmp_path / "bomb.pth"
    torch.save({"state_dict": {"backbone.conv1.conv.weight": torch.zeros(1)}, "model_state": {},
                "meta": {"history": _Bomb()}}, path)
    err = _convert(path, peer, tmp_path, capsys)
    assert f"source: {path} is not a readable checkpoint" in err and "an array declaring 1099511627776 bytes" in err
    with pytest.raises(ValueError, match="bomb.pth is not a loadable weights file"):
        create_model("i3d_nl5_r50", weights=path)


def test_damaged_pickles_are_one_line_errors(tmp_path, capsys):
    """A truncated pickle and a truncated zip: named, not a traceback."""
    good = pickle.dumps({"blobs": {"conv1_w": np.zeros((2, 3), np.float32)}}, protocol=2)
    (tmp_path / "cut.pkl").write_bytes(good[: len(good) // 2])
    assert "not a readable Caffe2 checkpoint" in _convert(tmp_path / "cut.pkl", "caffe2", tmp_path, capsys)
    torch.save({"state_dict": {"a": torch.zeros(100)}}, tmp_path / "cut.pth")
    data = (tmp_path / "cut.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) - 200])
    err = _convert(tmp_path / "cut.pth", "mmaction2", tmp_path, capsys)
    assert str(tmp_path / "cut.pth") in err
