"""Video backbones of the paper (§4) and the model zoo: ``create_model(name)``, ``list_models()``.

Zoo names and what they build: :mod:`nonlocalnet.models.zoo`.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Mapping
from os import PathLike

from .resnet3d import NONLOCAL_PRESETS, Affine3d, Bottleneck3d, ResNet3d, inflated_blocks
from .zoo import CARDS, DEFAULT_INPUT, ModelCard

__all__ = ["NONLOCAL_PRESETS", "Affine3d", "Bottleneck3d", "ResNet3d", "inflated_blocks", "create_model", "list_models", "model_card",
           "ModelCard", "merge_options"]


def list_models(pattern: str | None = None) -> list[str]:
    """Zoo names, optionally filtered by a shell pattern (``"i3d_nl5_*"``). The default input
    setting (32x2) has no suffix; ``<name>_32x2`` is accepted as well."""
    names = list(CARDS)
    return names if pattern is None else [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def model_card(name: str) -> ModelCard:
    """The :class:`~nonlocalnet.models.zoo.ModelCard` of a zoo name; a ValueError lists the known ones."""
    key = name.removesuffix(f"_{DEFAULT_INPUT}") if isinstance(name, str) else name
    if key in CARDS:
        return CARDS[key]
    close = difflib.get_close_matches(str(name), list(CARDS), n=5, cutoff=0.5)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    raise ValueError(f"name: unknown model {name!r}.{hint} Known models: {', '.join(CARDS)}")


def create_model(name: str, num_classes: int = 400, *, weights: str | PathLike | None = None,
                 **overrides) -> ResNet3d:
    """Build a zoo model, e.g. ``create_model("i3d_nl5_r50")`` or ``create_model("c2d_r101_8x8")``.

    Args:
        name: a name of :func:`list_models`.
        num_classes: outputs of the classifier.
        weights: a local checkpoint (:func:`nonlocalnet.weights.save_weights` or
            ``nonlocalnet convert`` output) loaded strictly; nothing is downloaded. Options saved
            with it (another library's conventions, e.g. ``stem="mmaction2"``) are applied first.
        **overrides: :class:`ResNet3d` arguments replacing the card's, e.g. ``inflation="3x3x3"``
            or ``dropout=0.0``; ``nonlocal_options`` / ``nonlocal_stage_options`` are merged into
            the card's (``{"mode": "dot_product"}`` keeps a frozen-BN model's ``norm=False``). A
            misspelt argument raises TypeError.
    """
    card = model_card(name)
    payload = None
    if weights is not None:
        from ..weights import read_weights

        payload = read_weights(weights)
        overrides = merge_options(payload["options"], overrides)
    kwargs = merge_options(card.model_kwargs(), overrides)
    model = ResNet3d(**{**kwargs, "num_classes": num_classes})
    if payload is not None:
        from ..weights import load_weights

        load_weights(model, weights, payload)
    return model


def merge_options(base: Mapping[str, object], extra: Mapping[str, object]) -> dict:
    """:class:`ResNet3d` arguments ``extra`` over ``base``; ``nonlocal_options`` are merged key by
    key and ``nonlocal_stage_options`` stage by stage, so that one setting does not drop the rest."""
    merged = {**base, **extra}
    for key in ("nonlocal_options", "nonlocal_stage_options"):
        if key in base and key in extra:
            low, high = base[key] or {}, extra[key] or {}
            merged[key] = ({**low, **high} if key == "nonlocal_options" else
                           {s: {**low.get(s, {}), **high.get(s, {})} for s in {*low, *high}})
    return merged
