"""hubconf.py: torch.hub builds zoo models from a local checkout."""

import importlib.util
import pathlib

import torch

from nonlocalnet import list_models
from nonlocalnet.weights import save_weights

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_hubconf_has_one_entry_per_zoo_name():
    spec = importlib.util.spec_from_file_location("hubconf", ROOT / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    # torch.hub.list's rule: public callables of hubconf
    entries = [name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith("_")]
    assert sorted(entries) == sorted(list_models())
    assert "5 non-local blocks" in hubconf.i3d_nl5_r101.__doc__


def test_hub_load_builds_and_loads_local_weights(tmp_path):
    model = torch.hub.load(str(ROOT), "c2d_nl1_r50_8x8", source="local", num_classes=3, dropout=0.0)
    assert model.pred.out_features == 3 and model.res4[4].nonlocal_block is not None and model.dropout.p == 0.0
    torch.nn.init.normal_(model.pred.weight)
    save_weights(model, tmp_path / "w.pt")
    again = torch.hub.load(str(ROOT), "c2d_nl1_r50_8x8", source="local", num_classes=3, weights=tmp_path / "w.pt")
    assert torch.equal(again.pred.weight, model.pred.weight)
