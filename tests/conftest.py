import pytest
import torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-300))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def onednn(monkeypatch):
    """Route every float32 CPU product of :mod:`nonlocalnet._gemm` through oneDNN, small ones too,
    and yield a list that collects the oneDNN products run while the test calls ``count``."""
    from nonlocalnet import _gemm

    if _gemm._onednn_linear() is None:
        pytest.skip("this PyTorch build has no oneDNN: the products run through torch.mm, tested elsewhere")
    monkeypatch.setattr(_gemm, "MIN_MACS", 0)
    return _OneDnnCalls


class _OneDnnCalls:
    """``with _OneDnnCalls() as calls:`` counts the oneDNN products run inside."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func._overloadpacket is torch.ops.mkldnn._linear_pointwise:
                    outer.count += 1
                return func(*args, **(kwargs or {}))

        self.count = 0
        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
