from .faultkit import tiny_config


def test_tiny_config_trains(tiny_set, tmp_path):
    from nonlocalnet import engine

    result = engine.fit(tiny_config(tiny_set), tmp_path / "run")
    assert (tmp_path / "run" / "checkpoint.pt").exists() and "top1" in result
