"""torch.hub entry points: one per zoo name (``nonlocalnet models`` lists them).

    model = torch.hub.load("/path/to/nonlocalnet", "i3d_nl5_r50", source="local", num_classes=400)
    model = torch.hub.load(..., "i3d_nl5_r50", weights="i3d_nl5_r50.pt")  # a local weights file

Each entry takes ``num_classes``, ``weights`` (a local file written by ``nonlocalnet convert`` /
``inflate`` or :func:`nonlocalnet.weights.save_weights`; nothing is downloaded) and any
:class:`nonlocalnet.models.ResNet3d` argument as an override.
"""

import os
import sys

dependencies = ["torch", "numpy"]

_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "src")
if os.path.isdir(_SRC) and _SRC not in sys.path:
    sys.path.insert(0, _SRC)

from nonlocalnet.models import create_model as _create_model  # noqa: E402
from nonlocalnet.models import list_models as _list_models  # noqa: E402
from nonlocalnet.models import model_card as _model_card  # noqa: E402


def _entry(name):
    card = _model_card(name)

    def build(num_classes=400, weights=None, **overrides):
        return _create_model(name, num_classes=num_classes, weights=weights, **overrides)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (f"{name}: R{card.depth} {card.arch.upper()} with {card.nonlocal_count} non-local blocks, "
                     f"{card.frames} frames at stride {card.rate}. Arguments: num_classes=400, weights=None "
                     "(a local file), ResNet3d overrides.")
    return build


globals().update({_name: _entry(_name) for _name in _list_models()})
