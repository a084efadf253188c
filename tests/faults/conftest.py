"""Shared pieces of the fault-injection suite: a tiny real-video set and a tiny training config.

Every test in ``tests/faults`` injects one fault (bad input, a kill, divergence, a second process)
and checks what the package does about it: a named error (one line and exit code 2 on the command
line), a counted skip, or a refusal that leaves the user's files and the last good checkpoint as
they were.
"""

import pytest

av = pytest.importorskip("av")

from .faultkit import TINY_SPEC  # noqa: E402
from nonlocalnet.data.synthetic import make_synthetic  # noqa: E402


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/faults/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.faults)


@pytest.fixture(scope="session")
def tiny_set(tmp_path_factory):
    """8 training and 4 validation videos (real H.264 files), list files and classes.txt."""
    return make_synthetic(tmp_path_factory.mktemp("faults-data") / "syn", TINY_SPEC, log=lambda *a: None)

